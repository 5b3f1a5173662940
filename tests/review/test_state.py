"""The review state on disk: saved after every decision, reopened by a new session on
the same data and prediction (labels, table, history and undo as they were), refused
with nothing changed when the data or the prediction differ."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_lsmfm.review import ReviewError, ReviewSession
from napari_lsmfm.review.state import default_state_path, fingerprint

SHAPE = (8, 20, 30)


def three_boxes() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint16)
    lab[2:6, 2:8, 2:8] = 1
    lab[2:6, 10:16, 2:8] = 2
    lab[2:6, 2:10, 12:28] = 3
    return lab


def image_of(lab: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (100 * (lab > 0) + rng.normal(0, 5, lab.shape)).astype(np.float32)


def test_state_survives_a_new_session(tmp_path):
    lab, image = three_boxes(), image_of(three_boxes())
    state = ReviewSession.default_state_path(tmp_path / "nuclei.ome.tif")
    assert state == tmp_path / "nuclei.lsmfm-review.json"
    s = ReviewSession(lab, image=image, state_path=state, model_fingerprint="abc")
    s.accept(1)
    s.reject(2)
    s.split(3, stroke=[[3, 0, 20], [3, 12, 20]])
    s.relabel(3, 5)
    s.undo()  # the relabel: undone, still redoable after reopening
    doc = json.loads(state.read_text())
    assert doc["model"] == "abc" and doc["applied"] == 3 and len(doc["decisions"]) == 4
    assert [d["op"] for d in doc["decisions"]] == ["accept", "reject", "split", "relabel"]
    assert doc["version"] == s.version == 5

    again = ReviewSession(lab, image=image, state_path=state)
    np.testing.assert_array_equal(again.labels, s.labels)
    assert again.version == 5 and again.history == s.history
    assert {i: (r.status, r.cls, r.voxels) for i, r in again.objects.items()} == \
        {i: (r.status, r.cls, r.voxels) for i, r in s.objects.items()}
    sparse_a, sparse_b = again.training_labels(), s.training_labels()
    np.testing.assert_array_equal(sparse_a.coords, sparse_b.coords)
    assert again.redo() and again.record(3).cls == 5
    assert again.undo() and again.undo() and again.undo()  # relabel, split, reject
    np.testing.assert_array_equal(again.labels, lab)
    assert again.record(1).status == "accepted"
    again.accept(2)  # replaces the undone decisions, their patches are removed
    third = ReviewSession(lab, image=image, state_path=state)
    assert [e["op"] for e in third.history] == ["accept", "accept"]
    np.testing.assert_array_equal(third.labels, lab)
    patches = sorted(p.name for p in state.with_suffix(".patches").iterdir())
    assert patches == ["000000.npz", "000001.npz"]


@pytest.mark.parametrize("change", ["image", "prediction"])
def test_a_state_from_other_data_is_refused_and_nothing_changes(change, tmp_path):
    lab, image = three_boxes(), image_of(three_boxes())
    state = tmp_path / "x.lsmfm-review.json"
    s = ReviewSession(lab, image=image, state_path=state)
    s.reject(2)
    saved = state.read_bytes()
    files = sorted(p.name for p in tmp_path.rglob("*"))
    if change == "image":
        image = image.copy()
        image[0, 0, 0] += 1
    else:
        lab = lab.copy()
        lab[0, 0, 0] = 4
    with pytest.raises(ReviewError, match="other data|another prediction") as err:
        ReviewSession(lab, image=image, state_path=state)
    assert "move the state file aside" in str(err.value)
    assert state.read_bytes() == saved and sorted(p.name for p in tmp_path.rglob("*")) == files


def test_a_damaged_or_foreign_state_is_refused(tmp_path):
    state = tmp_path / "x.lsmfm-review.json"
    state.write_text("{not json")
    with pytest.raises(ReviewError, match="cannot read"):
        ReviewSession(three_boxes(), state_path=state)
    state.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ReviewError, match="not a review state"):
        ReviewSession(three_boxes(), state_path=state)
    with pytest.raises(ReviewError, match=r"\.json"):
        ReviewSession(three_boxes(), state_path=tmp_path / "state.txt")
    s = ReviewSession(three_boxes())
    with pytest.raises(ReviewError, match="no state file"):
        s.save()


def test_every_decision_is_on_disk_at_once(tmp_path):
    state = tmp_path / "x.lsmfm-review.json"
    s = ReviewSession(three_boxes(), state_path=state)
    for i, step in enumerate([lambda: s.accept(1), lambda: s.merge(1, 3), s.undo, s.redo]):
        step()
        assert json.loads(state.read_text())["version"] == i + 1
    assert not [p for p in tmp_path.rglob(".*partial*")]  # no temporaries left
    # a crash right after the patch and before the JSON: the JSON names what is complete
    doc = json.loads(state.read_text())
    extra = state.with_suffix(".patches") / "000002.npz"
    extra.write_bytes((state.with_suffix(".patches") / "000001.npz").read_bytes())
    again = ReviewSession(three_boxes(), state_path=state)
    assert len(again.history) == doc["applied"] == 2


def test_fingerprints_sample_large_arrays():
    small = np.arange(1000, dtype=np.uint16).reshape(10, 10, 10)
    assert fingerprint(small) == fingerprint(small.copy())
    assert fingerprint(small) != fingerprint(small.astype(np.uint32))
    assert fingerprint(small) != fingerprint(small.reshape(10, 100, 1))
    big = np.zeros((65, 512, 512), np.uint16)  # above 32 MiB: sampled
    base = fingerprint(big)
    big[0, 0, 0] = 1  # in the first sampled block
    assert fingerprint(big) != base
    assert default_state_path("/d/brain.zarr").name == "brain.lsmfm-review.json"
