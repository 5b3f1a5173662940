"""The Classify dock widget in a real headless viewer."""

import csv

import numpy as np
import pytest

from napari_lsmfm.widgets.state import foundation_slot

pytestmark = pytest.mark.gui


def _scene():
    from tasks.test_classify import scene, tiny_foundation

    return scene(), tiny_foundation()


def test_classify_objects_adds_result_layers_and_table(make_napari_viewer, qtbot, tmp_path):
    (image, labels, kinds, inside), fm = _scene()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img", scale=(2, 1, 1))
    viewer.add_labels(labels, name="objects", scale=(2, 1, 1))
    foundation_slot(viewer).set(fm)
    _, widget = viewer.window.add_plugin_dock_widget(plugin_name="napari-lsmfm",
                                                     widget_name="Classify objects")
    widget.image_combo.setCurrentText("img")
    widget.labels_combo.setCurrentText("objects")
    examples = widget.add_examples_layer()
    picks = [1, 3, 2, 4]
    examples.data = np.array([inside[v] for v in picks], float)
    examples.features = {"class": [kinds[v] for v in picks]}
    before = {layer.name: np.asarray(layer.data).copy() for layer in viewer.layers}
    widget.classify()
    assert widget.run_btn.text() == "Stop"
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert "img classes" in viewer.layers, widget.status.text()
    assert "img class table" in viewer.layers
    classes = viewer.layers["img classes"]
    assert classes.data.shape == labels.shape and tuple(classes.scale) == (2, 1, 1)
    table = viewer.layers["img class table"]
    assert {"class", "confidence", "unknown", "label"} <= set(table.features.columns)
    for name, data in before.items():  # the user's layers are untouched
        np.testing.assert_array_equal(np.asarray(viewer.layers[name].data), data)
    assert widget.table.rowCount() == len(kinds)
    confidences = [widget.table.item(i, 2).data(0) for i in range(widget.table.rowCount())]
    assert confidences == sorted(confidences)  # lowest confidence first
    widget.centre_on_row(0)
    index = int(widget.table.item(0, 0).data(256))
    row = widget.result.table()[index]
    assert viewer.camera.center[-1] == pytest.approx(row["x"])
    widget.export_csv(str(tmp_path / "out.csv"))
    with open(tmp_path / "out.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(kinds)
    widget.save_model(str(tmp_path / "probe"))
    assert (tmp_path / "probe" / "config.json").is_file()


def test_bad_input_is_one_line_and_changes_nothing(make_napari_viewer, qtbot):
    (image, labels, kinds, inside), fm = _scene()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    viewer.add_labels(np.zeros_like(labels), name="empty")
    foundation_slot(viewer).set(fm)
    from napari_lsmfm.widgets.classify import ClassifyWidget

    widget = ClassifyWidget(viewer)
    widget.image_combo.setCurrentText("img")
    widget.labels_combo.setCurrentText("empty")
    widget.classify()
    assert "examples" in widget.status.text() and not widget.runner.running
    examples = widget.add_examples_layer()
    examples.data = np.array([inside[1], inside[2]], float)
    examples.features = {"class": ["ball", "rod"]}
    widget.classify()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert "no objects" in widget.status.text()
    assert [layer.name for layer in viewer.layers] == ["img", "empty", "examples"]
