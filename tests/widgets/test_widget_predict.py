"""The Predict whole volume dock widget, in a real headless viewer: the output fills a
lazy layer block by block and ends equal to ``predict_volume`` run directly; Stop leaves
a partial output that Run resumes; an existing output is not replaced unless the user
says so; closing the widget stops the job."""

import time

import numpy as np
import pytest
import zarr

pytestmark = pytest.mark.gui

BLOCK = (16, 32, 32)  # rounded up to (24, 48, 48): 2 x 2 x 3 = 12 blocks
SCALE = (2.0, 0.5, 0.5)
TRANSLATE = (1.0, 2.0, 3.0)


def _image(shape=(40, 90, 100), air=True):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 8, shape).astype(np.float32)
    for z, y, x in [(10, 20, 20), (20, 45, 50), (30, 70, 80), (20, 48, 96), (8, 80, 10)]:
        image[max(0, z - 4):z + 4, max(0, y - 6):y + 6, max(0, x - 6):x + 6] += 80
    if air:
        image[:, :, 44:] = 0.0  # air: the blocks at x >= 48 (halo 4) are empty
    return image


@pytest.fixture(scope="module")
def trained():
    """A tiny foundation and a quick segmentation model trained on it, and the image to
    predict (with air)."""
    import torch

    from napari_lsmfm.model import Foundation, FoundationSpec
    from napari_lsmfm.tasks.segment import Segmenter

    torch.manual_seed(0)
    fm = Foundation(FoundationSpec("unet", embed_dim=8, channels=(8, 16), strides=(2,),
                                   num_res_units=0, variant="image_only"))
    crop = (slice(12, 28), slice(30, 62), slice(40, 72))  # one window: fits in 0.1 s
    image = _image(air=False)[crop]
    brushes = np.zeros(image.shape, np.uint8)
    brushes[8, 11:19, 6:14] = 2  # the object at (20, 45, 50)
    brushes[8, :4, :4] = 1
    seg = Segmenter(fm, steps=5, seed=0, tile=(16, 32, 32), candidate="foundation")
    seg.fit(image, brushes)
    return seg, _image()


@pytest.fixture(scope="module")
def expected(trained, tmp_path_factory):
    """The class map ``predict_volume`` writes when called directly."""
    from napari_lsmfm.scale import predict_volume

    seg, image = trained
    out = tmp_path_factory.mktemp("direct") / "direct.zarr"
    summary = predict_volume(seg, image, out, block=BLOCK, skip_empty=True)
    return zarr.open_array(str(out / "0"))[:], summary


def _setup(make_napari_viewer, trained, out):
    from napari_lsmfm.widgets.state import foundation_slot

    seg, image = trained
    viewer = make_napari_viewer()
    viewer.add_image(image, name="vol", scale=SCALE, translate=TRANSLATE)
    foundation_slot(viewer).share_task_model("segment", seg, "vol")  # as Segment does
    _, widget = viewer.window.add_plugin_dock_widget(plugin_name="napari-lsmfm",
                                                     widget_name="Predict whole volume")
    widget.image_combo.setCurrentText("vol")
    for spin, size in zip(widget.block_spins, BLOCK, strict=True):
        spin.setValue(size)
    widget.out_edit.setText(str(out))
    return viewer, widget


def _answer(monkeypatch, answers):
    """The user's answers to "the output exists" (the real box is tested below)."""
    from napari_lsmfm.widgets import predict_parts

    asked = []

    def ask(parent, paths, resumable):
        asked.append(resumable)
        return answers.pop(0)

    monkeypatch.setattr(predict_parts, "ask_existing", ask)
    return asked


def _wait(widget, qtbot, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=timeout)


def test_run_shows_a_layer_that_fills_and_ends_equal(make_napari_viewer, qtbot, trained,
                                                     expected, tmp_path):
    from napari_lsmfm.io.output import partial_info

    out = tmp_path / "vol_segmentation.zarr"
    viewer, widget = _setup(make_napari_viewer, trained, out)
    assert widget.model_combo.currentText() == "Segmentation (on 'vol')"
    added, seen = [], []
    viewer.layers.events.inserted.connect(
        lambda e: added.append((e.value.name, widget.runner.running)))

    def probe(update):  # what the layer shows as the blocks finish
        layer = (widget.run_state or {}).get("layer")
        if layer is not None and "block" in update.values:
            seen.append((update.values["block"], int(np.count_nonzero(layer.data[:]))))

    widget.runner.updated.connect(probe)
    t0 = time.perf_counter()
    widget.run_btn.click()
    assert widget.run_btn.text() == "Stop"
    _wait(widget, qtbot)
    seconds = time.perf_counter() - t0
    want, summary = expected
    assert added[0] == ("vol prediction", True), added  # appeared while running
    layer = viewer.layers["vol prediction"]
    assert layer.__class__.__name__ == "Labels"
    assert not layer.multiscale  # one level: smaller than a pyramid's smallest level
    np.testing.assert_array_equal(np.asarray(layer.data), want)
    np.testing.assert_allclose(layer.scale, SCALE)
    np.testing.assert_allclose(layer.translate, TRANSLATE)
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"))[:], want)
    assert partial_info(out) is None and summary["skipped"] > 0
    counts = [c for _, c in seen]
    assert counts == sorted(counts) and 0 < len(set(counts)) and counts[-1] > 0
    assert any(0 < c < np.count_nonzero(want) for c in counts), seen  # filled in steps
    text = widget.status.text()
    assert text.startswith("Done: 12 blocks") and f"{summary['skipped']} skipped" in text
    assert "M voxels/s" in text, text
    print(f"widget run: {seconds:.2f} s, direct: {summary['seconds']:.2f} s")


def test_stop_leaves_a_partial_output_that_run_resumes(make_napari_viewer, qtbot, trained,
                                                       expected, tmp_path, monkeypatch):
    from napari_lsmfm.io.output import partial_info

    out = tmp_path / "cut.zarr"
    viewer, widget = _setup(make_napari_viewer, trained, out)
    widget.run_btn.click()
    qtbot.waitUntil(lambda: (widget.run_state or {}).get("block", 0) >= 1, timeout=60_000)
    widget.run_btn.click()  # Stop
    _wait(widget, qtbot)
    assert partial_info(out)["partial"]
    status = widget.status.text()
    assert "partial" in status and "Resume" in status, status
    layer = viewer.layers["vol prediction"]  # stays, showing what finished
    assert not layer.multiscale

    asked = _answer(monkeypatch, ["resume"])
    widget.run_btn.click()
    _wait(widget, qtbot)
    assert asked == [True]  # offered to resume
    want, _ = expected
    assert partial_info(out) is None
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"))[:], want)
    assert "from before" in widget.status.text(), widget.status.text()
    assert [lyr.name for lyr in viewer.layers] == ["vol", "vol prediction"]
    np.testing.assert_array_equal(np.asarray(viewer.layers["vol prediction"].data), want)


def test_an_existing_output_is_kept_unless_replaced(make_napari_viewer, qtbot, trained,
                                                    expected, tmp_path, monkeypatch):
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    out = tmp_path / "old.zarr"
    old = zarr.open_group(str(out), mode="w", zarr_format=2)
    old.create_array("0", shape=(2, 2, 2), dtype="uint8")
    viewer, widget = _setup(make_napari_viewer, trained, out)

    questions = []

    def decline():  # the real question box: read it, answer Cancel
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox):
            QTimer.singleShot(20, decline)
            return
        questions.append(box.text())
        next(b for b in box.buttons() if "Cancel" in b.text()).click()

    QTimer.singleShot(0, decline)
    widget.run_btn.click()
    assert questions and "replace" in questions[0], questions
    assert not widget.runner.running and "Not started" in widget.status.text()
    assert zarr.open_array(str(out / "0")).shape == (2, 2, 2)  # untouched
    assert "vol prediction" not in viewer.layers

    asked = _answer(monkeypatch, ["replace"])
    widget.run_btn.click()
    _wait(widget, qtbot)
    assert asked == [False]  # complete, not resumable: replace or cancel
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"))[:], expected[0])


def test_closing_the_widget_stops_the_job(make_napari_viewer, qtbot, trained, tmp_path):
    from napari_lsmfm.io.output import partial_info

    out = tmp_path / "closed.zarr"
    viewer, widget = _setup(make_napari_viewer, trained, out)
    widget.run_btn.click()
    qtbot.waitUntil(lambda: (widget.run_state or {}).get("block", 0) >= 1, timeout=60_000)
    ctx = widget.runner.context
    viewer.window.remove_dock_widget(widget)
    assert widget.runner.wait(30)
    assert ctx.cancelled and partial_info(out)["partial"]


def test_default_output_beside_the_source_or_home(tmp_path, make_napari_viewer):
    from pathlib import Path

    from napari_lsmfm.widgets.predict_parts import default_output, output_paths

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((2, 4, 4)), name="my vol/1",
                             metadata={"path": str(tmp_path / "stack.ome.tif")})
    assert default_output(layer, "segment") == tmp_path / "stack_segmentation.zarr"
    bare = viewer.add_image(np.zeros((2, 4, 4)), name="bare: one")
    assert default_output(bare, "deblur") == Path.home() / "bare_one_deblurred.zarr"
    paths = output_paths(tmp_path / "a.zarr", instances=True)
    assert paths["instances"] == tmp_path / "a_instances.zarr"


def test_the_finished_layer_becomes_the_pyramid(make_napari_viewer, tmp_path):
    from napari_lsmfm.io.write import create_zarr
    from napari_lsmfm.scale.pyramid import write_pyramid
    from napari_lsmfm.widgets.predict_parts import live_layer, show_pyramid

    out = tmp_path / "p.zarr"
    create_zarr(out, (8, 64, 64), "uint8", voxel_size=SCALE, kind="labels", name="p")
    viewer = make_napari_viewer()
    source = viewer.add_image(np.zeros((8, 64, 64)), name="vol", scale=SCALE,
                              translate=TRANSLATE)
    viewer.add_points(name="on top")
    layer = live_layer(viewer, out, source, "segment")
    assert np.count_nonzero(layer.data[:]) == 0  # not written yet: zeros
    zarr.open_array(str(out / "0"), mode="r+")[:4, :32, :32] = 3  # a block finishes
    layer.refresh()
    assert np.count_nonzero(layer.data[:]) == 4 * 32 * 32  # read from disk, no copy
    viewer.layers.move(viewer.layers.index(layer), 1)
    assert write_pyramid(out, kind="labels", voxel_size=SCALE, smallest=16) > 1
    new = show_pyramid(viewer, layer, out)
    assert new.multiscale and len(new.data) > 1 and viewer.layers.index(new) == 1
    assert new.name == "vol prediction" and layer not in viewer.layers
    np.testing.assert_allclose(new.scale, SCALE)
    np.testing.assert_allclose(new.translate, TRANSLATE)
    np.testing.assert_array_equal(np.asarray(new.data[0]), zarr.open_array(str(out / "0"))[:])
    # a later run into another store keeps this layer and names its own "… [2]"
    other = tmp_path / "q.zarr"
    create_zarr(other, (8, 64, 64), "uint8", voxel_size=SCALE, kind="labels", name="q")
    assert live_layer(viewer, other, source, "segment").name == "vol prediction [2]"


def test_a_saved_model_folder(make_napari_viewer, qtbot, trained, expected,
                                             tmp_path):
    from napari_lsmfm.io.output import partial_info
    from napari_lsmfm.widgets import predict_parts
    from napari_lsmfm.widgets.state import foundation_slot

    seg, _ = trained
    folder = seg.save(tmp_path / "seg")
    out = tmp_path / "from_folder.zarr"
    viewer, widget = _setup(make_napari_viewer, trained, out)
    foundation_slot(viewer).set(seg.foundation)  # the viewer's foundation: the model's
    widget.model_combo.setCurrentIndex(2)
    assert widget.model_combo.currentText() == predict_parts.FOLDER_MODEL
    assert widget.folder_row.isVisibleTo(widget) and widget.device_combo.isVisibleTo(widget)
    widget.run_btn.click()  # no folder yet: says what to do
    assert "choose a saved model folder" in widget.status.text()
    widget.folder_edit.setText(str(folder))
    widget.device_combo.setCurrentText("cpu")
    widget.run_btn.click()
    _wait(widget, qtbot)
    assert widget.status.text().startswith("Done"), widget.status.text()
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"))[:], expected[0])
    assert partial_info(out) is None
    assert len(widget.models) == 1  # loaded once, kept for the next run
    widget.model_combo.setCurrentIndex(1)  # the default deblur model: no instances
    assert not widget.instances_box.isEnabled()
