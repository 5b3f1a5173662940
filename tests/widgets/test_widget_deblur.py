"""The Deblur dock widget and the one-click Layers > Filter command, in a real headless viewer."""

import time

import numpy as np
import pytest

pytestmark = pytest.mark.gui

SCALE = (2.0, 0.5, 0.5)
TRANSLATE = (1.0, 2.0, 3.0)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A tiny deblur model (untrained: the widget's plumbing is under test, not quality)."""
    import torch

    from napari_lsmfm.model import Foundation, FoundationSpec
    from napari_lsmfm.tasks.deblur import DEBLUR_SPEC, Deblurrer

    torch.manual_seed(0)
    spec = {**DEBLUR_SPEC, "channels": [8, 16, 32], "embed_dim": 8, "num_res_units": 1}
    fm = Foundation(FoundationSpec.from_dict(spec), source="memory")
    model = Deblurrer(fm, patch_size=(16, 32, 32), batch_size=2, hidden=8, eval_every=5,
                      device="cpu")
    return model.save(tmp_path_factory.mktemp("deblur") / "small")


@pytest.fixture(scope="module")
def volume():
    from napari_lsmfm.tasks.deblur import synthetic_pair

    return synthetic_pair("nuclei", (24, 48, 48), (1, 1, 1), psf_sigma_vox=(2, 0.8, 0.8),
                          photons=500, seed=1).image


def _setup(make_napari_viewer, qtbot, volume, model=None):
    viewer = make_napari_viewer()
    viewer.add_image(volume, name="vol", scale=SCALE, translate=TRANSLATE)
    _, widget = viewer.window.add_plugin_dock_widget(plugin_name="napari-lsmfm",
                                                     widget_name="Deblur")
    widget.image_combo.setCurrentText("vol")
    widget.device_combo.setCurrentText("cpu")
    if model is not None:
        widget.load_model(str(model))
        qtbot.waitUntil(lambda: not widget.runner.running, timeout=30_000)
        assert widget.model_combo.currentText() == "small", widget.status.text()
    return viewer, widget


def _press(widget, qtbot, button=None):
    (button or widget.deblur_button).click()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)


def test_deblur_adds_new_layers_and_keeps_the_original(make_napari_viewer, qtbot, volume,
                                                       small_model, monkeypatch, tmp_path):
    import dask.array as da
    import tifffile

    from napari_lsmfm.tasks.deblur import gaussian_psf
    from napari_lsmfm.widgets import deblur as module

    viewer, widget = _setup(make_napari_viewer, qtbot, volume, small_model)
    _press(widget, qtbot)
    out = viewer.layers["vol deblurred"]
    assert out.data.shape == volume.shape and out.data.dtype == volume.dtype
    np.testing.assert_allclose(out.scale, SCALE)
    np.testing.assert_allclose(out.translate, TRANSLATE)
    lo, hi = out.contrast_limits
    assert out.data.min() <= lo < hi <= out.data.max()
    np.testing.assert_array_equal(viewer.layers["vol"].data, volume)  # untouched
    first = out.data

    # a second run keeps the first result; the known PSF goes to the model (this small
    # one is blind and ignores it, so the result is the same)
    seen = []
    real = module.deblur_job
    monkeypatch.setattr(module, "deblur_job",
                        lambda image, ctx, **o: seen.append(o) or real(image, ctx, **o))
    widget.psf_known_box.setChecked(True)
    for spin, value in zip(widget.model_sigma_spins, (2.0, 0.8, 0.8), strict=True):
        spin.setValue(value)
    _press(widget, qtbot)
    assert seen and seen[-1]["psf_sigma"] == (2.0, 0.8, 0.8)
    assert "vol deblurred [2]" in viewer.layers
    assert viewer.layers["vol deblurred"].data is first
    np.testing.assert_array_equal(viewer.layers["vol deblurred [2]"].data, first)

    # Richardson-Lucy: a sigma in voxels, and the same PSF in µm via the layer's scale
    widget.method_combo.setCurrentText("Richardson-Lucy")
    assert widget.rl_box.isVisibleTo(widget) and not widget.model_box.isVisibleTo(widget)
    for spin, value in zip(widget.sigma_spins, (2.0, 0.8, 0.8), strict=True):
        spin.setValue(value)
    widget.iterations_spin.setValue(5)
    _press(widget, qtbot)
    rl = viewer.layers["vol deblurred [3]"].data
    assert rl.shape == volume.shape and rl.dtype == volume.dtype
    assert not np.array_equal(rl, volume)
    widget.unit_combo.setCurrentText("µm")
    for spin, value in zip(widget.sigma_spins, (4.0, 0.4, 0.4), strict=True):
        spin.setValue(value)
    _press(widget, qtbot)
    np.testing.assert_array_equal(viewer.layers["vol deblurred [4]"].data, rl)
    psf_file = tmp_path / "psf.tif"  # the same Gaussian PSF, measured-PSF style
    tifffile.imwrite(psf_file, gaussian_psf((2.0, 0.8, 0.8)))
    widget.psf_combo.setCurrentText("PSF file (TIFF)")
    widget.psf_edit.setText(str(psf_file))
    _press(widget, qtbot)
    np.testing.assert_allclose(viewer.layers["vol deblurred [5]"].data, rl, atol=1)

    # lazy multiscale input: the finest level, deblurred tile by tile into a temporary zarr
    monkeypatch.setattr(module, "ZARR_OUTPUT_BYTES", 0)
    lazy = da.from_array(volume, chunks=(12, 24, 24))
    viewer.add_image([lazy, lazy[::2, ::2, ::2]], multiscale=True, name="big", scale=SCALE)
    widget.image_combo.setCurrentText("big")
    _press(widget, qtbot)
    result = viewer.layers["big deblurred"]
    assert isinstance(result.data, da.Array) and result.data.shape == volume.shape
    assert "zarr" in result.metadata
    np.testing.assert_array_equal(np.asarray(result.data), rl)


def test_finetune_stops_quickly_keeps_the_model_and_ui_responsive(make_napari_viewer, qtbot,
                                                                  volume, small_model,
                                                                  tmp_path):
    from test_widget_foundation import TickRecorder

    viewer, widget = _setup(make_napari_viewer, qtbot, volume, small_model)
    widget.steps_spin.setValue(100_000)
    with TickRecorder() as ticks:
        widget.train_button.click()
        assert widget.stop_button.isEnabled() and not widget.deblur_button.isEnabled()
        qtbot.waitUntil(lambda: len(widget.loss_plot.values) >= 3, timeout=60_000)
        t0 = time.perf_counter()
        widget.stop_button.click()
        qtbot.waitUntil(lambda: not widget.runner.running, timeout=10_000)
        stop_seconds = time.perf_counter() - t0
    assert ticks.max_gap < 0.5, f"UI blocked for {ticks.max_gap:.3f} s"
    # The running step finishes first (Stop is also checked while the next batch is made)
    assert stop_seconds < 1.0, f"stop took {stop_seconds:.2f} s"
    assert "stopped early" in widget.status.text()
    assert widget.model_combo.currentText() == "small finetuned on vol"
    assert "small" in widget.models  # the model it started from is kept as it was
    widget.save_model(str(tmp_path / "tuned"))
    assert (tmp_path / "tuned" / "config.json").is_file(), widget.status.text()
    _press(widget, qtbot)  # deblurs with the finetuned model
    assert viewer.layers["vol deblurred"].data.shape == volume.shape


def test_bad_input_says_why_and_leaves_the_viewer_usable(make_napari_viewer, qtbot, volume,
                                                         small_model, monkeypatch):
    from napari_lsmfm.tasks.deblur import api as core

    viewer, widget = _setup(make_napari_viewer, qtbot, volume, small_model)
    flat = volume.astype(np.float32)
    flat[3, 4, 5] = np.nan
    cases = {"plane": (volume[5], "2D"), "nan": (flat, "NaN"),
             "const": (np.full((8, 16, 16), 7, np.uint16), "constant")}
    for name, (data, words) in cases.items():
        viewer.add_image(data, name=name)
        widget.image_combo.setCurrentText(name)
        _press(widget, qtbot)
        assert words in widget.status.text(), widget.status.text()
        assert f"{name} deblurred" not in viewer.layers
        assert widget.deblur_button.isEnabled()
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="rgb", rgb=True)
    widget.image_combo.setCurrentText("rgb")
    widget.deblur()
    assert "RGB" in widget.status.text() and not widget.runner.running

    # no default model installed: the widget says how to get one
    monkeypatch.setattr(core, "DEFAULT_DEBLUR_DIR", core.Path("/nonexistent/deblur"))
    widget.model_combo.setCurrentIndex(0)
    widget.model_combo.activated.emit(0)
    assert widget.model_combo.currentText() == "Default model"
    widget.image_combo.setCurrentText("vol")
    _press(widget, qtbot)
    assert "no default deblur model" in widget.status.text()
    assert [layer.name for layer in viewer.layers] == ["vol", *cases, "rgb"]
    _press(widget, qtbot, widget.train_button)
    assert "no default deblur model" in widget.status.text()


def test_menu_command_deblurs_the_selected_layer(make_napari_viewer, qtbot, volume,
                                                 small_model, monkeypatch):
    from napari._app_model import get_app_model

    from napari_lsmfm.tasks.deblur import api as core

    monkeypatch.setattr(core, "DEFAULT_DEBLUR_DIR", small_model)
    viewer = make_napari_viewer()
    viewer.add_image(volume, name="vol", scale=SCALE, translate=TRANSLATE)
    app = get_app_model()
    menu = app.menus.get_menu("napari/layers/filter")
    assert "napari-lsmfm.deblur_selected" in {getattr(i, "command", i).id for i in menu
                                              if hasattr(i, "command")}
    app.commands.execute_command("napari-lsmfm.deblur_selected").result()
    qtbot.waitUntil(lambda: "vol deblurred" in viewer.layers, timeout=60_000)
    out = viewer.layers["vol deblurred"]
    assert out.data.shape == volume.shape and out.data.dtype == volume.dtype
    np.testing.assert_allclose(out.scale, SCALE)
    np.testing.assert_array_equal(viewer.layers["vol"].data, volume)
