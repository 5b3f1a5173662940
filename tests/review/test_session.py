"""ReviewSession decisions on a small hand-made prediction: accept, reject, relabel,
merge, split, click, undo / redo change the labels exactly; bad input is refused with
nothing changed; the queue, the budget, exports and scores."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_lsmfm.io.volume import open_volume
from napari_lsmfm.review import ReviewError, ReviewSession

SHAPE = (8, 20, 30)


def three_boxes() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint16)
    lab[2:6, 2:8, 2:8] = 1  # 144 voxels
    lab[2:6, 10:16, 2:8] = 2  # 144
    lab[2:6, 2:10, 12:28] = 3  # 512
    return lab


class FixedCorrector:
    """A click corrector whose model foreground is a fixed array: the region is a box of
    ``reach`` voxels around the click, the mask that array's foreground there."""

    def __init__(self, foreground: np.ndarray, reach: int = 3) -> None:
        self.foreground, self.reach = foreground, reach

    def correct(self, session, point, positive):
        region = tuple(slice(max(0, p - self.reach), min(n, p + self.reach + 1))
                       for p, n in zip(point, session.shape, strict=True))
        return region, self.foreground[region] > 0


def test_accept_reject_relabel_change_labels_exactly():
    lab = three_boxes()
    s = ReviewSession(lab)
    s.accept(1)
    assert s.record(1).status == "accepted"
    np.testing.assert_array_equal(s.labels, lab)
    s.reject(2)
    expected = lab.copy()
    expected[expected == 2] = 0
    np.testing.assert_array_equal(s.labels, expected)
    assert s.record(2).status == "rejected"
    s.relabel(3, 4)
    assert (s.record(3).cls, s.record(3).status) == (4, "corrected")
    np.testing.assert_array_equal(s.labels, expected)
    assert [e["op"] for e in s.history] == ["accept", "reject", "relabel"]
    assert s.version == 3
    np.testing.assert_array_equal(lab, three_boxes())  # the caller's array is untouched


def test_merge_and_split_by_stroke_are_exact_and_undoable():
    lab = three_boxes()
    s = ReviewSession(lab)
    assert s.merge(1, 2) == 1
    merged = lab.copy()
    merged[merged == 2] = 1
    np.testing.assert_array_equal(s.labels, merged)
    assert 2 not in s.objects and s.record(1).voxels == 288
    assert s.record(1).bbox == (slice(2, 6), slice(2, 16), slice(2, 8))
    # a line drawn on slice z=3 at x=20 cuts object 3 through every slice
    ids = s.split(3, stroke=[[3, 0, 20], [3, 12, 20]])
    assert ids[0] == 3 and len(ids) == 2
    new = ids[1]
    region = s.labels[2:6, 2:10, 12:28]
    assert (region[:, :, :8] == 3).all() and (region[:, :, 9:] == new).all()
    assert len(np.unique(region[:, :, 8])) == 1  # the cut column joins one part whole
    assert s.record(3).voxels + s.record(new).voxels == 512
    assert s.undo() and s.undo()
    np.testing.assert_array_equal(s.labels, lab)
    assert set(s.objects) == {1, 2, 3} and s.record(1).voxels == 144
    assert s.record(1).status == "pending"
    assert s.redo()
    np.testing.assert_array_equal(s.labels, merged)
    assert s.can_redo and s.redo() and not s.can_redo and not s.redo()
    assert s.labels[3, 5, 25] == new
    s.undo()
    s.accept(3)  # a new decision clears the redo
    assert not s.can_redo and [e["op"] for e in s.history] == ["merge", "accept"]


def test_split_by_seeded_watershed_separates_touching_balls():
    z, y, x = np.ogrid[:20, :20, :60]
    lab = np.zeros((20, 20, 60), np.uint32)
    lab[((z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2) < 49] = 1
    lab[((z - 10) ** 2 + (y - 10) ** 2 + (x - 21) ** 2) < 49] = 1  # two touching balls
    lab[((z - 10) ** 2 + (y - 10) ** 2 + (x - 40) ** 2) < 49] = 2
    lab[((z - 10) ** 2 + (y - 10) ** 2 + (x - 53) ** 2) < 36] = 3
    s = ReviewSession(lab)
    ids = s.split(1)  # seeds from its size: twice the median object
    assert len(ids) == 2
    assert s.labels[10, 10, 8] != s.labels[10, 10, 23]
    assert {int(s.labels[10, 10, 8]), int(s.labels[10, 10, 23])} == set(ids)
    sizes = sorted(s.record(i).voxels for i in ids)
    assert sizes[0] > 0.8 * sizes[1]  # halves, split at the neck
    assert ((s.labels > 0) == (lab > 0)).all()  # nothing added or lost
    assert s.split(2, n=3) and len(np.unique(s.labels[lab == 2])) == 3


def test_bad_decisions_are_refused_with_nothing_changed():
    lab = three_boxes()
    lab[0, 0, 0] = 9  # a one-voxel object
    s = ReviewSession(lab)
    s.accept(1)
    before, version, hist = s.labels.copy(), s.version, s.history
    with pytest.raises(ReviewError, match="two different objects"):
        s.merge(3, 3)
    with pytest.raises(ReviewError, match="too small to split"):
        s.split(9)
    with pytest.raises(ReviewError, match="does not cut"):
        s.split(3, stroke=[[3, 3, 14], [3, 5, 16]])  # inside the object only
    with pytest.raises(ReviewError, match="no object 42"):
        s.accept(42)
    with pytest.raises(ReviewError, match="brush value"):
        s.relabel(3, 1)
    s.reject(2)
    with pytest.raises(ReviewError, match="undo the rejection"):
        s.merge(1, 2)
    s.undo()
    np.testing.assert_array_equal(s.labels, before)
    assert s.history == hist and s.version == version + 2  # the reject and its undo


@pytest.mark.parametrize("make", [
    lambda lab: (lab, np.zeros((8, 20, 31))),  # the image differs in shape
    lambda lab: (lab.astype(np.float32), None),  # float labels
    lambda lab: (lab.astype(np.int16) - 1, None),  # negative labels
    lambda lab: (lab[0], None),  # not a volume
])
def test_bad_inputs_are_refused(make, tmp_path):
    labels, image = make(three_boxes())
    copy = labels.copy()
    state = tmp_path / "x.lsmfm-review.json"
    with pytest.raises(ReviewError, match="labels|image"):
        ReviewSession(labels, image=image, state_path=state)
    np.testing.assert_array_equal(labels, copy)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_clicks_change_only_the_region_and_become_training_labels():
    lab = three_boxes()
    model = lab > 0
    model[2:6, 2:8, 8:10] = True  # the model sees object 1 reaching two voxels further
    model[2:6, 2:10, 24:28] = False  # and object 3 ending earlier
    s = ReviewSession(lab)
    region = s.click((3, 5, 8), True, FixedCorrector(model))
    assert region == (slice(0, 7), slice(2, 9), slice(5, 12))
    changed = s.labels != lab
    assert changed.any() and not changed[np.logical_not(_inside(region))].any()
    assert (s.labels[2:6, 2:8, 8:10][_inside(region)[2:6, 2:8, 8:10]] == 1).all()
    assert s.record(1).status == "corrected" and s.record(1).voxels == 144 + 4 * 6 * 2
    region = s.click((3, 5, 26), False, FixedCorrector(model))
    inside = _inside(region)
    assert (s.labels[2:6, 2:10, 24:28][inside[2:6, 2:10, 24:28]] == 0).all()
    assert (s.labels[2:6, 2:10, 12:23] == 3).all()  # outside the region: kept
    assert s.clicks == [((3, 5, 8), True), ((3, 5, 26), False)]
    sparse = s.training_labels()
    at = {tuple(c): int(v) for c, v in zip(sparse.coords, sparse.values, strict=True)}
    assert at[(3, 5, 9)] == 2 and at[(3, 5, 26)] == 1
    assert s.undo() and s.undo()
    np.testing.assert_array_equal(s.labels, lab)
    with pytest.raises(ReviewError, match="outside the volume"):
        s.click((30, 0, 0), True, FixedCorrector(model))


def _inside(region) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[region] = True
    return m


def test_queue_ranks_least_certain_first():
    lab = three_boxes()
    probs = np.zeros((2, *SHAPE), np.float32)
    probs[1] = 0.5
    probs[1][lab == 1], probs[1][lab == 2], probs[1][lab == 3] = 0.9, 0.6, 0.75
    probs[0] = 1 - probs[1]
    s = ReviewSession(lab, probabilities=probs, channel_values=(0, 2))
    assert s.record(2).confidence == pytest.approx(0.6)
    assert s.queue() == [2, 3, 1]
    assert s.queue("voxels", ascending=False)[0] == 3
    s.accept(2)
    assert s.queue(status="pending") == [3, 1]
    unc = np.where(lab == 3, 0.8, 0.1).astype(np.float32)
    only_unc = ReviewSession(lab, uncertainty=unc)
    assert only_unc.queue() == [3, 1, 2]  # confidence unknown: 1 - uncertainty
    with pytest.raises(ReviewError, match="cannot sort"):
        s.queue("colour")


def test_undo_budget_drops_the_oldest_changes():
    lab = three_boxes()
    small, large = 2 * 144 * 4, 2 * 512 * 4  # before + after of a box, uint32
    s = ReviewSession(lab, undo_budget_bytes=large + small - 100)
    s.reject(1)
    s.reject(2)
    s.reject(3)  # object 3's box is 512 voxels: the two older changes must go
    assert s.undo() and not s.can_undo and not s.undo()
    assert s.labels[3, 5, 20] == 3 and s.labels[3, 5, 5] == 0  # 1 stays rejected
    assert len(s.history) == 2


def test_exports_never_overwrite_without_asking(tmp_path):
    lab = three_boxes()
    s = ReviewSession(lab, voxel_size=(2.0, 0.5, 0.5), class_names={2: "nucleus"})
    s.reject(2)
    tif = s.export_labels(tmp_path / "reviewed.ome.tif")
    np.testing.assert_array_equal(np.asarray(open_volume(tif).data), s.labels)
    zarr_path = s.export_labels(tmp_path / "reviewed.ome.zarr")
    np.testing.assert_array_equal(np.asarray(open_volume(zarr_path).data), s.labels)
    with pytest.raises(ReviewError, match="already exists"):
        s.export_labels(tif)
    s.accept(1)
    s.export_labels(tif, overwrite=True)
    table = s.export_table(tmp_path / "objects.csv")
    rows = list(csv.DictReader(open(table, encoding="utf-8")))
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["status"] == "accepted" and rows[1]["status"] == "rejected"
    assert rows[0]["class_name"] == "nucleus" and float(rows[2]["volume_um3"]) == 512 * 0.5
    with pytest.raises(ReviewError, match="already exists"):
        s.export_table(table)
    with pytest.raises(ReviewError, match=r"\.csv"):
        s.export_table(tmp_path / "objects.txt")


def test_scores_before_and_after_review():
    truth = three_boxes()
    truth[truth == 2] = 0  # object 2 is a false positive
    s = ReviewSession(three_boxes())
    s.reject(2)
    out = s.scores(truth)
    assert out["before"]["precision"] == pytest.approx(2 / 3)
    assert out["after"]["precision"] == 1.0 and out["after"]["f1"] == 1.0
    assert out["before"]["dice"] == pytest.approx(2 * 656 / (800 + 656))
    assert out["after"]["dice"] == 1.0
    with pytest.raises(ReviewError, match="ground truth"):
        s.scores(truth[:4])


def test_paint_grows_trims_and_adds_objects_exactly(tmp_path):
    lab = three_boxes()
    state = tmp_path / "x.lsmfm-review.json"
    s = ReviewSession(lab, state_path=state)
    box = (slice(2, 6), slice(2, 10), slice(2, 10))
    painted = np.asarray(s.labels[box]).copy()
    painted[:, 6:8, 0:6] = 1  # object 1 grows by 4 x 2 x 6 = 48 voxels (into free space)
    painted[:, 0, 0] = 0  # and loses a column of 4
    s.paint(box, painted)
    want = lab.copy()
    want[2:6, 8:10, 2:8] = 1
    want[2:6, 2, 2] = 0
    np.testing.assert_array_equal(s.labels, want)
    assert s.record(1).voxels == 144 + 48 - 4 and s.record(1).status == "corrected"
    assert s.history[-1]["op"] == "paint"
    tl = s.training_labels()
    as_class = {tuple(c) for c, v in zip(tl.coords, tl.values, strict=True) if v == 2}
    as_background = {tuple(c) for c, v in zip(tl.coords, tl.values, strict=True) if v == 1}
    assert {(z, 2, 2) for z in range(2, 6)} <= as_background
    assert {(3, 9, 5), (5, 8, 2)} <= as_class
    new = np.zeros((2, 3, 3), lab.dtype) + 9  # a new object, painted where nothing was
    s.paint((slice(0, 2), slice(15, 18), slice(25, 28)), new)
    assert s.record(9).voxels == 18 and s.record(9).cls == 2
    again = ReviewSession(lab, state_path=state)  # saved: reopened as painted
    np.testing.assert_array_equal(again.labels, s.labels)
    assert again.record(9).voxels == 18
    assert s.undo() and s.undo()
    np.testing.assert_array_equal(s.labels, lab)


def test_paint_refusals_change_nothing():
    lab = three_boxes()
    s = ReviewSession(lab)
    box = (slice(2, 6), slice(2, 10), slice(2, 10))
    same = np.asarray(s.labels[box]).copy()
    for bad, words in ((same, "nothing was painted"), (same[:2], "shape"),
                       (same.astype(np.float32) + 0.5, "integers"),
                       (same.astype(np.int32) - 5, "negative")):
        with pytest.raises(ReviewError, match=words):
            s.paint(box, bad)
    with pytest.raises(ReviewError, match="three slices"):
        s.paint("everything", same)
    np.testing.assert_array_equal(s.labels, lab)
    assert not s.history


def test_undo_and_redo_after_a_rescore_show_the_new_confidences():
    lab = three_boxes()
    old = np.where(lab > 0, 0.6, 0.1).astype(np.float32)[None]
    s = ReviewSession(lab, probabilities=old, channel_values=(2,))
    assert s.record(1).confidence == pytest.approx(0.6)
    s.reject(1)
    s.accept(2)
    new = np.where(lab > 0, 0.9, 0.1).astype(np.float32)[None]
    s.rescore(new, (2,))
    assert s.record(2).confidence == pytest.approx(0.9)
    assert s.undo() and s.undo()  # the acceptance, then the rejection
    assert s.record(1).confidence == pytest.approx(0.9)  # not the 0.6 of before
    assert s.record(2).confidence == pytest.approx(0.9) and s.record(2).status == "pending"
    assert s.redo()
    assert s.record(1).status == "rejected"
    assert s.redo()
    assert s.record(2).confidence == pytest.approx(0.9) and s.record(2).status == "accepted"
