"""The Review predictions dock widget in a real headless viewer."""

import csv

import numpy as np
import pytest
from qtpy.QtCore import Qt

pytestmark = pytest.mark.gui

SCALE = (2.0, 1.0, 1.0)


def ball(shape, centre, radius):
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in shape)]
    (cz, cy, cx), (rz, ry, rx) = centre, radius
    return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def scene():
    """A prediction of five objects (3 = two blobs joined by a neck, to split; 5 = five
    voxels, too small to split), its probability and uncertainty maps (object 4 least
    certain, then 2, 1, 3, 5) and an image."""
    shape = (12, 40, 48)
    labels = np.zeros(shape, np.uint16)
    labels[ball(shape, (6, 10, 10), (3, 5, 5))] = 1
    labels[ball(shape, (6, 10, 30), (3, 5, 5))] = 2
    labels[ball(shape, (6, 29, 9), (3, 5, 5)) | ball(shape, (6, 29, 21), (3, 5, 5))] = 3
    labels[6, 29, 9:22] = 3  # the neck
    labels[ball(shape, (6, 30, 38), (2, 3, 3))] = 4
    labels[2, 2, 40:45] = 5
    probability = np.full(shape, 0.05, np.float32)
    uncertainty = np.full(shape, 0.1, np.float32)
    for oid, p in {1: 0.8, 2: 0.7, 3: 0.9, 4: 0.55, 5: 0.95}.items():
        probability[labels == oid] = p
        uncertainty[labels == oid] = 1.0 - p
    rng = np.random.default_rng(0)
    image = (100 + 400 * (labels > 0) + rng.normal(0, 20, shape)).astype(np.float32)
    return image, labels, probability, uncertainty


def open_review(make_napari_viewer, qtbot, tmp_path, data=None, state="review.json"):
    image, labels, probability, uncertainty = data or scene()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img", scale=SCALE)
    viewer.add_labels(labels, name="img instances", scale=SCALE)
    viewer.add_image(probability, name="img probability 2", scale=SCALE, visible=False)
    viewer.add_image(uncertainty, name="img uncertainty", scale=SCALE, visible=False)
    _, widget = viewer.window.add_plugin_dock_widget(plugin_name="napari-lsmfm",
                                                     widget_name="Review predictions")
    widget.image_combo.setCurrentText("img")
    assert widget.prediction_combo.currentText() == "img instances"  # the default
    widget.state_path = str(tmp_path / state)
    widget.start()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)
    assert widget.session is not None, widget.status.text()
    return viewer, widget


def column(widget, name):
    from napari_lsmfm.widgets.review_table import COLUMNS

    j = COLUMNS.index(name)
    return [widget.table.item(r, j).text() for r in range(widget.table.rowCount())]


def status_of(widget, oid):
    return widget.table.status(oid)


def press(widget, key, modifiers=Qt.KeyboardModifier.NoModifier):
    """A key press on the table, as a user with the dock focused does it."""
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    window = widget.window()
    if QApplication.activeWindow() is not window:  # shortcuts reach the active window only
        window.show()
        window.activateWindow()
        QTest.qWaitForWindowActive(window, 5_000)
    widget.table.setFocus()
    QTest.keyClick(widget.table, key, modifiers)


def test_decisions_change_the_reviewed_layer_exactly(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path)
    prediction = viewer.layers["img instances"]
    original = prediction.data.copy()
    layer = viewer.layers["img instances reviewed"]
    assert widget.layer.name == layer.name and layer.data is not prediction.data
    np.testing.assert_array_equal(layer.data, original)
    assert column(widget, "id") == ["4", "2", "1", "3", "5"]  # least certain first
    assert widget.table.current_id() == 4
    expected = original.copy()

    widget.buttons["accept"].click()
    assert status_of(widget, 4) == "accepted"
    assert widget.table.current_id() == 2  # on to the next undecided object
    press(widget, Qt.Key.Key_R)  # reject 2
    assert status_of(widget, 2) == "rejected"
    expected[original == 2] = 0
    np.testing.assert_array_equal(layer.data, expected)

    widget.buttons["undo"].click()
    np.testing.assert_array_equal(layer.data, original)
    assert status_of(widget, 2) == "pending"
    press(widget, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier
          | Qt.KeyboardModifier.ShiftModifier)  # redo
    np.testing.assert_array_equal(layer.data, expected)

    # merge: 1 selected, then M, then the row of 3 (b's voxels become a); M twice cancels
    widget.select(1)
    press(widget, Qt.Key.Key_M)
    press(widget, Qt.Key.Key_M)
    assert widget.pending_merge is None and "cancelled" in widget.status.text()
    press(widget, Qt.Key.Key_M)
    widget.select(3)
    expected[original == 3] = 1
    np.testing.assert_array_equal(layer.data, expected)
    assert 3 not in widget.session.objects and status_of(widget, 1) == "corrected"
    press(widget, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)  # undo the merge
    expected[original == 3] = 3
    np.testing.assert_array_equal(layer.data, expected)

    # merge two selected rows with the button
    widget.select(4)
    widget.select(1, add=True)
    widget.buttons["merge"].click()
    merged = expected.copy()
    merged[original == 1] = 4
    np.testing.assert_array_equal(layer.data, merged)
    widget.undo()
    np.testing.assert_array_equal(layer.data, expected)

    # split 3 (two blobs) in two by the S key: two parts exactly covering it
    widget.select(3)
    widget.seeds_spin.setValue(2)
    press(widget, Qt.Key.Key_S)
    parts = set(np.unique(layer.data[original == 3]))
    assert len(parts) == 2 and 3 in parts
    assert (layer.data[original != 3] == expected[original != 3]).all()
    assert widget.table.rowCount() == 6
    widget.buttons["undo"].click()
    np.testing.assert_array_equal(layer.data, expected)
    assert widget.table.rowCount() == 5

    # relabel with the class spin box
    widget.select(1)
    widget.class_spin.setValue(3)
    widget.buttons["relabel"].click()
    assert widget.session.record(1).cls == 3
    assert column(widget, "class")[column(widget, "id").index("1")] == "3"
    np.testing.assert_array_equal(prediction.data, original)  # the user's layer untouched
    assert [e["op"] for e in widget.session.history] == ["accept", "reject", "relabel"]


def test_refusals_show_the_message_and_change_nothing(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path)
    layer, before = widget.layer, widget.layer.data.copy()
    widget.select(4)
    widget.buttons["reject"].click()
    widget.select(4)
    widget.buttons["accept"].click()  # a rejected object cannot be accepted
    assert "rejected" in widget.status.text() and widget.status.font().bold()
    widget.select(5)
    widget.split()  # five voxels
    assert "too small" in widget.status.text()
    assert len(widget.session.history) == 1
    before[before == 4] = 0
    np.testing.assert_array_equal(layer.data, before)

    # float labels and a prediction of another shape: refused, no layer added
    names = [lyr.name for lyr in viewer.layers]
    viewer.add_labels(np.zeros((12, 40, 40), np.uint16), name="other shape")
    widget.prediction_combo.setCurrentText("other shape")
    widget.start()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)
    assert "shape" in widget.status.text(), widget.status.text()
    assert widget.layer is layer and len(widget.session.history) == 1
    assert [lyr.name for lyr in viewer.layers] == [*names, "other shape"]


def test_negative_labels_are_refused(make_napari_viewer, qtbot, tmp_path):
    # (napari itself refuses a float Labels layer: the combo box offers none)
    image, labels, probability, uncertainty = scene()
    bad = labels.astype(np.int16)
    bad[0, 0, :3] = -1
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    viewer.add_labels(bad, name="img instances")
    from napari_lsmfm.widgets.review import ReviewWidget

    widget = ReviewWidget(viewer)
    assert widget.prediction_combo.currentText() == "img instances"
    widget.state_path = str(tmp_path / "s.json")
    widget.start()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)
    assert widget.session is None and "negative" in widget.status.text()
    assert len(viewer.layers) == 2 and not (tmp_path / "s.json").exists()


def test_decisions_survive_closing_the_viewer(make_napari_viewer, qtbot, tmp_path):
    data = scene()
    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path, data)
    widget.select(2)
    widget.reject()
    widget.select(3)
    widget.split()
    widget.select(1)
    widget.accept()
    reviewed = widget.layer.data.copy()
    statuses = {oid: r.status for oid, r in widget.session.objects.items()}
    viewer.close()

    viewer2, widget2 = open_review(make_napari_viewer, qtbot, tmp_path, data)
    np.testing.assert_array_equal(widget2.layer.data, reviewed)
    assert {oid: r.status for oid, r in widget2.session.objects.items()} == statuses
    assert "3 earlier decisions restored" in widget2.status.text()
    assert widget2.table.status(2) == "rejected"
    widget2.undo()  # the accept of 1, from the first viewer
    assert widget2.table.status(1) == "pending"

    # the same state file for other data: refused with a message
    other = tuple(np.roll(a, 3, axis=2) for a in data)
    viewer3 = make_napari_viewer()
    viewer3.add_image(other[0], name="img")
    viewer3.add_labels(other[1], name="img instances")
    from napari_lsmfm.widgets.review import ReviewWidget

    widget3 = ReviewWidget(viewer3)
    widget3.image_combo.setCurrentText("img")
    widget3.state_path = str(tmp_path / "review.json")
    widget3.start()
    qtbot.waitUntil(lambda: not widget3.busy, timeout=30_000)
    assert widget3.session is None and "img instances reviewed" not in viewer3.layers
    assert "made for another" in widget3.status.text(), widget3.status.text()


def test_selecting_a_row_moves_the_camera(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path)
    ids = widget.table.ids()
    for r in (2, 0, 3):
        widget.table.selectRow(r)
        record = widget.session.record(ids[r])
        world = np.asarray(record.centroid) * SCALE
        np.testing.assert_allclose(viewer.camera.center, world, atol=1e-6)
        assert viewer.dims.point[0] == pytest.approx(world[0], abs=SCALE[0])
        assert widget.layer.selected_label == ids[r] and widget.layer.show_selected_label
    widget.next_object()
    assert widget.table.current_id() == ids[4]
    press(widget, Qt.Key.Key_P)
    press(widget, Qt.Key.Key_P)
    assert widget.table.current_id() == ids[2]
    # sorting by another column: Next walks that order
    from napari_lsmfm.widgets.review_table import COLUMNS

    widget.table.sortItems(COLUMNS.index("voxels"), Qt.SortOrder.DescendingOrder)
    voxels = [int(v) for v in column(widget, "voxels")]
    assert voxels == sorted(voxels, reverse=True)
    widget.select(widget.table.ids()[0])
    widget.next_object()
    assert widget.table.current_id() == widget.table.ids()[1]


def test_scores_and_export(make_napari_viewer, qtbot, tmp_path):
    image, labels, probability, uncertainty = data = scene()
    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path, data)
    truth = labels.copy()
    truth[labels == 2] = 0  # object 2 is a false positive
    viewer.add_labels(truth, name="truth")
    widget.tools.truth_combo.setCurrentText("truth")
    text = widget.tools.scores_label.text()
    assert "dice" in text and "f1" in text
    before = widget.tools.show_scores()
    widget.select(2)
    widget.reject()
    after = widget.tools.show_scores()
    assert after["after"]["precision"] > before["after"]["precision"]
    assert after["before"] == before["before"]

    out = tmp_path / "reviewed.ome.tif"
    assert widget.tools.export("labels", str(out)) == out and out.is_file()
    stamp = out.stat().st_mtime_ns
    assert widget.tools.export("labels", str(out)) is None  # never overwritten unasked
    assert "Not exported" in widget.status.text() and out.stat().st_mtime_ns == stamp
    table = tmp_path / "objects.csv"
    widget.tools.export("table", str(table))
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and {r["status"] for r in rows} >= {"rejected", "pending"}


def fitted_segmenter(image, labels):
    """A quick-mode model of the scene (tiny random backbone, filters: a few seconds)."""
    from test_widget_segment import brush_from_truth, tiny_foundation

    from napari_lsmfm.tasks.segment import Segmenter, SparseLabels

    seg = Segmenter(tiny_foundation(), steps=40, candidate="filters", voxel_size=SCALE)
    brushes = brush_from_truth(labels, planes=(4, 6, 8))
    seg.fit(image, SparseLabels.from_array(brushes, image.shape))
    return seg, brushes


def click(layer, world, shift=False):
    """A mouse click (press and release, no move) on ``layer`` at ``world``, through
    napari's own dispatch of the layer's mouse callbacks."""
    from types import SimpleNamespace

    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    for kind in ("mouse_press", "mouse_release"):
        event = SimpleNamespace(type=kind, position=tuple(world), pos=(50, 50), button=1,
                                modifiers=["Shift"] if shift else [], is_dragging=False,
                                view_direction=None, dims_displayed=[1, 2], handled=False)
        (mouse_press_callbacks if kind == "mouse_press" else mouse_release_callbacks)(
            layer, event)


def test_click_corrections_and_retraining(make_napari_viewer, qtbot, tmp_path):
    from napari_lsmfm.widgets.state import foundation_slot

    image, truth, probability, uncertainty = scene()
    missed = truth.copy()
    missed[truth == 1] = 0  # the prediction missed object 1
    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path,
                                 (image, missed, probability, uncertainty))
    layer = viewer.layers["img instances reviewed"]
    assert not widget.tools.click_at((6, 10, 10))  # no model in this viewer yet
    assert "train one" in widget.status.text()

    seg, brushes = fitted_segmenter(image, truth)
    foundation_slot(viewer).share_task_model("segment", seg, "img")  # as Few-shot does
    widget.tools.click_box.setChecked(True)
    assert layer.mode == "pan_zoom"
    before = np.asarray(layer.data).copy()
    click(layer, np.multiply((6, 10, 10), SCALE))  # a positive click inside object 1
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    entry = widget.session.history[-1]
    assert entry["op"] == "click" and entry["positive"], widget.status.text()
    after = np.asarray(layer.data)
    new = int(after[6, 10, 10])
    assert new not in (0, 2, 3, 4, 5) and new in widget.session.objects
    changed = np.argwhere(after != before)
    region = entry["box"]
    assert all(lo <= c for c, (lo, _) in zip(changed.min(0), region, strict=True))
    assert all(c < hi for c, (_, hi) in zip(changed.max(0), region, strict=True))
    found = after == new
    assert (found & (truth == 1)).sum() / (found | (truth == 1)).sum() > 0.5  # object 1
    assert widget.table.status(new) == "corrected"

    # Shift+click: negative, on object 2; nothing changes outside its neighbourhood
    before = after.copy()
    click(layer, np.multiply((6, 10, 30), SCALE), shift=True)
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    entry = widget.session.history[-1]
    assert entry["op"] == "click" and not entry["positive"]
    outside = np.ones(before.shape, bool)
    outside[tuple(slice(lo, hi) for lo, hi in entry["box"])] = False
    np.testing.assert_array_equal(np.asarray(layer.data)[outside], before[outside])

    # the corrections become training labels; a retrain uses them and re-ranks
    viewer.add_labels(brushes, name="strokes")
    widget.tools.brushes_combo.setCurrentText("strokes")
    version = widget.session.version
    widget.tools.retrain()
    assert widget.tools.retrain_button.text() == "Stop"
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    text = widget.status.text()
    assert "Retrained with corrections" in text, text
    n_review = widget.session.training_labels().n_annotated
    assert n_review > 0 and f"({n_review} from the review)" in text
    assert int(text.split(" on ")[1].split()[0]) > n_review  # the strokes and the review
    assert widget.session.version == version  # a retrain re-ranks, decides nothing
    assert widget.table.rowCount() == len(widget.session.objects)
    assert widget.table.ids() == widget.session.queue()  # the new ranking, least certain first
    np.testing.assert_array_equal(viewer.layers["img instances"].data, missed)


def test_state_goes_next_to_the_image_file(make_napari_viewer, qtbot, tmp_path):
    from napari_lsmfm.io.write import write_volume

    image, labels, probability, uncertainty = scene()
    path = write_volume(tmp_path / "stack.ome.tif", image, voxel_size=SCALE)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-lsmfm")
    viewer.add_labels(labels, name=f"{layer.name} instances", scale=SCALE)
    from napari_lsmfm.widgets.review import ReviewWidget

    widget = ReviewWidget(viewer)
    widget.image_combo.setCurrentText(layer.name)
    assert widget.prediction_combo.currentText() == f"{layer.name} instances"
    widget.start()  # no state path given: next to the image's file, no dialog
    qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)
    widget.accept()
    from napari_lsmfm.review import ReviewSession

    state = ReviewSession.default_state_path(path)
    assert state.parent == tmp_path and state.is_file()
    assert widget.session.state_path == state


def test_painting_on_the_reviewed_layer_is_a_decision(make_napari_viewer, qtbot, tmp_path):
    """napari's brush on the reviewed layer goes through the session: recorded, undoable,
    saved and training labels; the prediction layer stays as it was."""
    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path)
    layer, session = widget.layer, widget.session
    original = np.asarray(viewer.layers["img instances"].data).copy()
    before = np.asarray(layer.data).copy()
    layer.brush_size = 3
    layer.paint((6, 10, 16), 1)  # object 1 grows towards x = 16 on plane 6
    qtbot.waitUntil(lambda: bool(session.history), timeout=5_000)
    after = np.asarray(layer.data).copy()
    grown = (after == 1) & (before != 1)
    assert grown.any() and grown[6].sum() == grown.sum()
    assert session.history[-1]["op"] == "paint"
    assert session.record(1).status == "corrected"
    assert session.record(1).voxels == int((after == 1).sum())
    coords, values = session.training_labels().coords, session.training_labels().values
    painted = {tuple(c) for c, v in zip(coords, values, strict=True) if v == 2}
    assert {tuple(int(i) for i in p) for p in np.argwhere(grown)} <= painted
    np.testing.assert_array_equal(viewer.layers["img instances"].data, original)
    widget.undo()
    np.testing.assert_array_equal(layer.data, before)
    widget.redo()
    np.testing.assert_array_equal(layer.data, after)


def test_split_along_a_drawn_line(make_napari_viewer, qtbot, tmp_path):
    """A line in the "split line" Shapes layer cuts the selected object along it."""
    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path)
    before = np.asarray(widget.layer.data).copy()
    # across object 3 at x = 15 (between its blobs), in world coordinates (z scaled 2x)
    viewer.add_shapes([np.array([[12.0, 18.0, 15.0], [12.0, 40.0, 15.0]])],
                      shape_type="line", name="split line")
    widget.select(3)
    widget.split()
    after = np.asarray(widget.layer.data)
    parts = [int(v) for v in np.unique(after[before == 3]) if v]
    assert len(parts) == 2 and 3 in parts, widget.status.text()
    left = after[6, 29, 9]  # each blob's centre ends in one part
    right = after[6, 29, 21]
    assert {int(left), int(right)} == set(parts)
    np.testing.assert_array_equal(after[before != 3], before[before != 3])


def test_prediction_box_follows_a_prediction_made_after_it_opened(make_napari_viewer):
    """Docked before segmenting: the box moves to the segmentation, then the instances,
    once they appear (not staying on the ground truth), unless the user picked a layer."""
    image, labels, _, _ = scene()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img ground truth")
    viewer.add_labels(np.zeros_like(labels), name="img brushes")
    _, widget = viewer.window.add_plugin_dock_widget(plugin_name="napari-lsmfm",
                                                     widget_name="Review predictions")
    viewer.add_labels(labels, name="img segmentation")
    assert widget.prediction_combo.currentText() == "img segmentation"
    viewer.add_labels(labels, name="img instances")
    assert widget.prediction_combo.currentText() == "img instances"
    widget.prediction_combo.setCurrentText("img segmentation")
    widget.prediction_combo.activated.emit(widget.prediction_combo.currentIndex())  # a pick
    viewer.add_labels(labels, name="other instances")
    assert widget.prediction_combo.currentText() == "img segmentation"


def test_review_keys_are_bound_on_the_reviewed_layer(make_napari_viewer, qtbot, tmp_path):
    """The canvas keys (the reviewed layer active) call the same decisions as the dock."""
    from napari.utils.key_bindings import KeyBinding

    viewer, widget = open_review(make_napari_viewer, qtbot, tmp_path)
    keymap = widget.layer.keymap
    for key in ("A", "R", "S", "Ctrl+Z", "Ctrl+Shift+Z"):
        assert KeyBinding.from_str(key) in keymap, key
    widget.select(2)
    keymap[KeyBinding.from_str("R")](widget.layer)  # what napari calls on the key press
    assert status_of(widget, 2) != "" and 2 not in np.unique(widget.layer.data)
    keymap[KeyBinding.from_str("Ctrl+Z")](widget.layer)
    assert 2 in np.unique(widget.layer.data)
