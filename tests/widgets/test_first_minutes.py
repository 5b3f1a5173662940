"""The first minutes in a real headless viewer (issue 15): the brush box's default, one
model state for every widget, results updated in place, plain-text status lines, the
brush layer kept selected."""

import html
import json
import re
import time

import numpy as np
import pytest

from napari_lsmfm.widgets.state import foundation_slot

pytestmark = pytest.mark.gui

PLUGIN = "napari-lsmfm"
ENTITY = re.compile(r"&(#x?[0-9a-fA-F]+|[a-zA-Z]+);|</?[a-zA-Z]+[^>]*>")  # &#x27; &amp; <b>


@pytest.fixture(autouse=True)
def no_preload(monkeypatch):
    """The default model is not preloaded here: these tests bring their own tiny ones;
    live retraining starts 50 ms after a stroke (not 1.5 s)."""
    monkeypatch.setenv("LSMFM_NO_PRELOAD", "1")
    monkeypatch.setattr("napari_lsmfm.widgets.segment.LIVE_DELAY_MS", 50)


def tiny_foundation():
    from test_widget_segment import tiny_foundation

    return tiny_foundation()


def scene():
    """(16, 48, 48) float32 bright objects on a noisy background, and their 12 labels."""
    from tasks.test_classify import scene

    image, labels, _, _ = scene()
    return image, labels


def instance_labels(shape, n=120, seed=0):
    """Labels with ``n`` small boxes, each its own value (like a sample's ground truth)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for value in range(1, n + 1):
        z, y, x = (int(rng.integers(0, s - 2)) for s in shape)
        labels[z:z + 2, y:y + 3, x:x + 3] = value
    return labels


def strokes(labels, planes=(4, 8, 12)):
    """Class 2 on every object of a few planes, background (1) on 10 % of the rest."""
    rng = np.random.default_rng(1)
    out = np.zeros(labels.shape, np.uint8)
    for z in planes:
        out[z][labels[z] > 0] = 2
        out[z][(labels[z] == 0) & (rng.random(labels[z].shape) < 0.1)] = 1
    return out


def dock(viewer, name):
    return viewer.window.add_plugin_dock_widget(plugin_name=PLUGIN, widget_name=name)[1]


def segment_setup(make_napari_viewer, steps=20):
    image, labels = scene()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img", scale=(2, 1, 1))
    viewer.add_labels(labels, name="objects", scale=(2, 1, 1))
    foundation_slot(viewer).set(tiny_foundation())
    widget = dock(viewer, "Few-shot segmentation")
    widget.image_combo.setCurrentText("img")
    brushes = viewer.layers[widget.add_brush_layer().name]  # not the plugin's proxy of it
    brushes.data = strokes(labels)
    widget.steps_spin.setValue(steps)
    return viewer, widget, brushes


def wait(widget, qtbot, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def stroke_live(viewer, widget, brushes, qtbot, z):
    """A background stroke on plane ``z`` (shown there), then the live retrain it starts."""
    viewer.dims.set_point(0, z * 2.0)
    brushes.paint((z, 2, 2), 1)
    qtbot.waitUntil(lambda: widget.runner.running, timeout=5_000)
    wait(widget, qtbot)


def test_brush_box_never_defaults_to_instance_labels(make_napari_viewer, qtbot):
    image, _ = scene()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    viewer.add_labels(instance_labels(image.shape), name="img ground truth")
    widget = dock(viewer, "Few-shot segmentation")
    combo = widget.brush_combo
    # offered (the user may still choose it), never chosen by itself
    assert [combo.itemText(i) for i in range(combo.count())] == ["img ground truth"]
    assert combo.currentIndex() == -1 and combo.layer() is None
    assert "bold" in widget.new_brush_button.styleSheet()  # the way out stands out

    # a brush-like layer of the user's (few values, mostly 0) is offered first and chosen
    mine = np.zeros(image.shape, np.uint8)
    mine[8, 10:20, 10:20] = 2
    viewer.add_labels(mine, name="my strokes")
    assert combo.currentText() == "my strokes" and combo.itemText(0) == "my strokes"
    assert widget.new_brush_button.styleSheet() == ""
    # more instance labels arriving change nothing
    viewer.add_labels(instance_labels(image.shape, seed=1), name="more objects")
    assert combo.currentText() == "my strokes"

    # "New brush layer" makes the chosen, first-offered layer
    layer = widget.add_brush_layer()
    assert combo.currentText() == layer.name == "img brushes"
    assert combo.itemText(0) == "img brushes"

    # the instance layer, chosen by hand: refused at once, before any model loads
    combo.setCurrentText("img ground truth")
    t0 = time.perf_counter()
    widget.train()
    assert time.perf_counter() - t0 < 0.5
    assert not widget.runner.running
    status = widget.status.text()
    assert "instance labels" in status and "New brush layer" in status, status
    assert foundation_slot(viewer).foundation is None  # nothing was loaded


def test_wrong_strokes_fail_before_the_model_loads(make_napari_viewer, qtbot):
    image, _ = scene()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    widget = dock(viewer, "Few-shot segmentation")
    widget.add_brush_layer()  # empty: no strokes
    t0 = time.perf_counter()
    widget.train()
    wait(widget, qtbot)
    # the strokes are checked in the job before the default model would load (seconds)
    assert time.perf_counter() - t0 < 2.0
    assert "no strokes" in widget.status.text()
    assert foundation_slot(viewer).foundation is None


def test_model_loaded_in_one_widget_shows_in_all(make_napari_viewer, qtbot, tmp_path):
    from _checkpoints import make_lightning_checkpoint
    from napari_lsmfm.model import load_foundation
    from napari_lsmfm.tasks.segment import Segmenter

    ckpt = tmp_path / "unet_image_only_best.ckpt"
    make_lightning_checkpoint(ckpt, arch="unet", use_text=False)
    # the Foundation widget loads: every widget names the model
    viewer = make_napari_viewer()
    widgets = {name: dock(viewer, name) for name in
               ("Foundation model", "Few-shot segmentation", "Deblur", "Classify objects")}
    widgets["Foundation model"].path_edit.setText(str(ckpt))
    widgets["Foundation model"].load()
    wait(widgets["Foundation model"], qtbot)
    for name in ("Few-shot segmentation", "Classify objects"):
        line = widgets[name].foundation_label.text()
        assert "unet" in line and "default" not in line, (name, line)
    # deblurring has its own network: its line says the foundation is not used
    assert "not used" in widgets["Deblur"].foundation_label.text()

    # a task widget loads (a saved segmentation model names its foundation): the
    # Foundation widget and the others show it loaded
    image, labels = scene()
    seg = Segmenter(load_foundation(str(ckpt), device="cpu"), steps=10)
    seg.fit(image, strokes(labels))
    folder = seg.save(tmp_path / "seg")
    viewer = make_napari_viewer()
    widgets = {name: dock(viewer, name) for name in
               ("Foundation model", "Few-shot segmentation", "Classify objects")}
    assert "No model loaded" in widgets["Foundation model"].status.text()
    widgets["Few-shot segmentation"].load_model(str(folder))
    wait(widgets["Few-shot segmentation"], qtbot)
    loaded = widgets["Few-shot segmentation"].segmenter.foundation
    assert foundation_slot(viewer).foundation is loaded
    status = widgets["Foundation model"].status.text()
    assert "No model loaded" not in status and "unet" in status, status
    assert widgets["Foundation model"].move_button.isEnabled()
    assert "unet" in widgets["Classify objects"].foundation_label.text()


def test_retrains_update_one_set_of_result_layers(make_napari_viewer, qtbot):
    viewer, widget, brushes = segment_setup(make_napari_viewer)
    mine = viewer.add_image(np.ones((4, 4, 4)), name="img uncertainty")  # the user's own
    widget.train_button.click()
    wait(widget, qtbot)
    names = [layer.name for layer in viewer.layers]
    assert "img segmentation" in names and "img uncertainty [2]" in names  # not over mine
    widget.train_button.click()  # a second Train: the same layers, updated
    wait(widget, qtbot)
    assert [layer.name for layer in viewer.layers] == names
    # two live retrains around two slices (one at the volume's edge: a smaller region)
    widget.live_box.setChecked(True)
    full = viewer.layers["img segmentation"].data.copy()
    for z in (8, 1):
        stroke_live(viewer, widget, brushes, qtbot, z)
    assert [layer.name for layer in viewer.layers] == names
    seg = viewer.layers["img segmentation"]
    assert seg.data.shape == full.shape  # regions went into the full-volume layer
    assert mine.data.shape == (4, 4, 4) and np.all(mine.data == 1)
    assert not any(re.search(r"\[\d+\]$", n) for n in names if n != "img uncertainty [2]")


def test_live_retrains_without_a_full_result_keep_one_set(make_napari_viewer, qtbot):
    viewer, widget, brushes = segment_setup(make_napari_viewer)
    widget.live_box.setChecked(True)
    sets = []
    for z in (8, 0):  # the second region is cut by the volume's edge: another shape
        stroke_live(viewer, widget, brushes, qtbot, z)
        sets.append([layer.name for layer in viewer.layers])
    assert sets[0] == sets[1]
    assert not any("[" in name for name in sets[1]), sets[1]


def test_brush_layer_stays_selected_for_the_next_stroke(make_napari_viewer, qtbot):
    viewer, widget, brushes = segment_setup(make_napari_viewer)
    brushes.mode = "erase"
    widget.train_button.click()
    wait(widget, qtbot)
    qtbot.wait(50)
    assert "img probability 2" in viewer.layers
    assert viewer.layers.selection.active is brushes
    assert list(viewer.layers.selection) == [brushes]
    assert brushes.mode == "erase"  # the user's tool is kept
    brushes.mode = "pan_zoom"
    widget.predict_button.click()
    wait(widget, qtbot)
    qtbot.wait(50)
    assert viewer.layers.selection.active is brushes and brushes.mode == "paint"


def test_no_status_line_holds_html(make_napari_viewer, qtbot, tmp_path):
    from _checkpoints import make_lightning_checkpoint
    from napari_lsmfm.demo import summarize

    image, labels = scene()
    name = "it's <mine> & co"  # quotes, angle brackets, ampersand: shown as typed
    ckpt = tmp_path / "unet_image_only_best.ckpt"
    make_lightning_checkpoint(ckpt, arch="unet", use_text=False)
    viewer = make_napari_viewer()
    viewer.add_image(image, name=name)
    viewer.add_labels(labels, name="objects")
    widgets = {n: dock(viewer, n) for n in
               ("Foundation model", "Few-shot segmentation", "Deblur", "Classify objects")}
    widgets["Foundation model"].path_edit.setText(str(ckpt))
    widgets["Foundation model"].load()
    wait(widgets["Foundation model"], qtbot)

    seg = widgets["Few-shot segmentation"]
    seg.image_combo.setCurrentText(name)
    seg.add_brush_layer().data = strokes(labels)
    seg.steps_spin.setValue(10)
    seg.train_button.click()
    wait(seg, qtbot)
    deblur = widgets["Deblur"]
    deblur.image_combo.setCurrentText(name)
    deblur.method_combo.setCurrentText("Richardson-Lucy")
    deblur.iterations_spin.setValue(2)
    deblur.deblur_button.click()
    wait(deblur, qtbot)
    assert f"'{name}'" in deblur.status.text(), deblur.status.text()
    classify = widgets["Classify objects"]
    classify.image_combo.setCurrentText(name)
    classify.labels_combo.setCurrentText("objects")
    examples = classify.add_examples_layer()
    examples.data = np.array([[8, 6, 6], [8, 6, 17]], float)
    examples.features = {"class": ["ball", "rod"]}
    classify.run_btn.click()
    wait(classify, qtbot)

    texts = [label.text() for w in widgets.values() for label in (w.status, w.foundation_label)
             if label is not None]
    summary = summarize(viewer, widgets)  # what the demo writes to summary.json
    texts += [summary["foundation_status"], *summary["status"].values()]
    for text in texts:
        assert text and html.escape(name) not in text, text
        assert not ENTITY.search(text.replace(name, "")), text  # the name may hold "<...>"
    json.dumps(summary, default=str)
