"""Edits inside a box (split by stroke or watershed, click masks), the review as
training labels, and a retrain that uses the corrections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lsmfm.model import Foundation, FoundationSpec
from napari_lsmfm.review import ReviewError, ReviewSession
from napari_lsmfm.review.edits import apply_click, default_seeds, split_by_stroke
from napari_lsmfm.tasks import Segmenter, SparseLabels


def test_a_diagonal_stroke_cuts_and_a_short_one_does_not():
    mask = np.ones((3, 10, 10), bool)
    parts = split_by_stroke(mask, np.array([[1, 0, 0], [1, 9, 9]]), 7)
    assert set(np.unique(parts)) == {1, 2} and (parts > 0).all()
    assert parts[0, 9, 0] != parts[0, 0, 9]  # either side of the diagonal, every slice
    with pytest.raises(ReviewError, match="does not cut"):
        split_by_stroke(mask, np.array([[1, 0, 0], [1, 5, 5]]), 7)
    with pytest.raises(ReviewError, match="two points"):
        split_by_stroke(mask, np.array([[1, 0, 0]]), 7)
    assert default_seeds(1000, 100.0) == 10 and default_seeds(120, 100.0) == 2


def test_click_masks_change_only_what_they_say():
    labels = np.zeros((1, 5, 8), np.uint32)
    labels[0, 1:4, 1:3] = 4
    mask = np.zeros_like(labels, bool)
    mask[0, 1:4, 1:6] = True
    grown, target = apply_click(labels, (0, 2, 4), mask, True, new_id=9)
    assert target == 4 and (grown[0, 1:4, 1:6] == 4).all() and grown.sum() == 4 * 15
    fresh, target = apply_click(np.zeros_like(labels), (0, 2, 4), mask, True, new_id=9)
    assert target == 9 and (fresh == 9).sum() == 15  # nothing near: a new object
    trimmed, target = apply_click(grown, (0, 2, 5), mask & (np.arange(8) < 4), False, 9)
    assert target == 4 and (trimmed == 4).sum() == 9 and trimmed[0, 2, 5] == 0
    with pytest.raises(ReviewError, match="no.* object|none near"):
        apply_click(np.zeros_like(labels), (0, 2, 4), mask, False, 9)


def test_training_labels_hold_the_decisions():
    lab = np.zeros((6, 30, 30), np.uint16)
    lab[1:5, 2:8, 2:8] = 1
    lab[1:5, 12:18, 2:8] = 2
    lab[1:5, 2:28, 12:28] = 3  # 4 * 26 * 16 = 1664 voxels
    classes = np.where(lab == 3, 4, np.where(lab > 0, 2, 0)).astype(np.uint8)
    s = ReviewSession(lab, classes=classes)
    assert s.training_labels().n_annotated == 0  # nothing reviewed yet
    s.accept(1)
    s.reject(2)
    s.accept(3)
    sparse = s.training_labels(per_object=1000)
    counts = sparse.counts
    assert counts == {1: 144, 2: 144, 4: 1000}  # rejected = background, capped per object
    values = dict(zip(map(tuple, sparse.coords), sparse.values, strict=True))
    assert values[(2, 5, 5)] == 2 and values[(2, 14, 5)] == 1
    assert all(lab[tuple(c)] == 3 for c, v in zip(sparse.coords, sparse.values, strict=True)
               if v == 4)
    s.undo()  # the accept of 3
    assert s.training_labels().counts == {1: 144, 2: 144}
    s.relabel(3, 5)  # a corrected object teaches its new class
    assert 5 in s.training_labels().counts


def small_foundation() -> Foundation:
    torch.manual_seed(0)
    return Foundation(FoundationSpec("unet", embed_dim=8, channels=(8, 16), strides=(2,),
                                     num_res_units=1))


def test_retrain_uses_the_corrections():
    rng = np.random.default_rng(0)
    shape = (12, 32, 32)
    lab = np.zeros(shape, np.uint16)
    lab[3:9, 4:12, 4:12] = 1
    lab[3:9, 18:28, 4:12] = 2  # as bright as 1: the first model takes it for an object
    lab[3:9, 4:14, 18:28] = 3
    image = (100.0 * (lab > 0) + rng.normal(0, 5, shape)).astype(np.float32)
    image[lab == 2] = 100 + rng.normal(0, 5, int((lab == 2).sum())) + 30  # a bit brighter
    strokes = np.zeros(shape, np.uint8)
    strokes[6][lab[6] == 1] = 2
    strokes[6][(lab[6] == 0) & (rng.random(shape[1:]) < 0.3)] = 1
    seg = Segmenter(small_foundation(), candidate="filters", steps=60)
    seg.fit(image, strokes)
    first = seg.predict(image)
    p_before = first.probabilities[1][lab == 2].mean()
    assert p_before > 0.5  # object 2 was predicted as foreground
    s = ReviewSession(lab, probabilities=first.probabilities, channel_values=(0, 2))
    s.reject(2)  # the expert says object 2 is not a structure
    s.accept(3)
    out = s.retrain(seg, image, SparseLabels.from_array(strokes, shape))
    assert out["version"] == 2
    assert out["n_annotated"] == int((strokes > 0).sum() + (lab == 2).sum()
                                     + (lab == 3).sum()) - int(((strokes > 0) & (lab == 3)).sum())
    p_after = out["result"].probabilities[1][lab == 2].mean()
    assert p_after < 0.5 < p_before  # the rejection taught background
    assert s.record(3).confidence == pytest.approx(
        out["result"].probabilities.max(0)[lab == 3].mean(), rel=1e-4)
    bare = ReviewSession(lab)
    bare.accept(1)
    with pytest.raises(ReviewError, match="no background"):
        bare.retrain(seg, image)  # accepted objects alone: nothing says what is background
