"""What a review gives back: the queue order, the decisions as sparse training labels, a
retrain on them, and scores against ground truth (no Qt)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np

from napari_lsmfm.tasks.instance_metrics import match_objects
from napari_lsmfm.tasks.segment.labels import BACKGROUND, SparseLabels

from .objects import Box, ObjectRecord, ReviewError, as_numpy, iter_blocks
from .working import Placed

__all__ = ["PER_OBJECT", "check_box", "check_region", "click_samples", "current_scores",
           "ranked", "rescore", "retrain", "sample_voxels", "scores", "training_labels"]

PER_OBJECT = 2000  # training voxels kept per object or decision
_SORT_KEYS = ("confidence", "uncertainty", "voxels", "volume_um3", "id", "cls", "status")


def ranked(records: Iterable[ObjectRecord], key: str, ascending: bool,
           status: str | Collection[str] | None) -> list[int]:
    """Ids of ``records`` sorted by ``key`` (see ReviewSession.queue)."""
    if key not in _SORT_KEYS:
        raise ReviewError(f"cannot sort by {key!r}; choose one of {', '.join(_SORT_KEYS)}")
    wanted = {status} if isinstance(status, str) else None if status is None else set(status)

    def value(r: ObjectRecord):
        v = getattr(r, key)
        if key == "confidence" and v is None and r.uncertainty is not None:
            v = 1.0 - r.uncertainty
        return v

    chosen = [r for r in records if wanted is None or r.status in wanted]
    known = sorted((r for r in chosen if value(r) is not None),
                   key=lambda r: (value(r), r.id), reverse=not ascending)
    return [r.id for r in known] + sorted(r.id for r in chosen if value(r) is None)


def sample_voxels(mask: np.ndarray, box: Box, value: int, *, cap: int = PER_OBJECT,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most ``cap`` voxels of ``mask`` (covering ``box``), as volume coordinates
    (N, 3) int64 and values (N,) all ``value``."""
    coords = np.argwhere(mask)
    if len(coords) > cap:
        pick = np.random.default_rng(seed).choice(len(coords), cap, replace=False)
        coords = coords[np.sort(pick)]
    coords = coords.astype(np.int64) + [s.start for s in box]
    return coords, np.full(len(coords), int(value), np.int64)


def click_samples(before: np.ndarray, after: np.ndarray, box: Box, point: Sequence[int],
                  positive: bool, cls: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The training voxels of a click: the voxels it changed and the clicked one, with
    the object's class (positive) or background (negative)."""
    value = int(cls) if positive else BACKGROUND
    coords, values = sample_voxels(before != after, box, value, seed=seed)
    return (np.concatenate([coords, np.asarray([point], np.int64)]),
            np.concatenate([values, [value]]))


def check_box(box: Any, shape: Sequence[int]) -> Box:
    """``box`` (three slices) with plain bounds; ReviewError unless it is a non-empty box
    inside a volume of ``shape``."""
    try:
        out = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, shape, strict=True))
    except (TypeError, AttributeError, ValueError):
        raise ReviewError(f"a box is three slices (z, y, x), got {box!r}") from None
    if any(s.stop <= s.start for s in out):
        raise ReviewError(f"the box {box!r} is empty inside the volume of shape "
                          f"{tuple(shape)}")
    return out  # type: ignore[return-value]


def check_region(region: Any, mask: Any, point: Sequence[int], shape: Sequence[int]) -> Box:
    """ReviewError unless ``region`` (three slices) lies in the volume, holds ``point``
    and ``mask`` has its shape; returns it with plain bounds."""
    try:
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, shape, strict=True))
    except (TypeError, AttributeError, ValueError):
        raise ReviewError(f"the click corrector returned {region!r}, not three slices") from None
    size = tuple(s.stop - s.start for s in box)
    if np.shape(mask) != size or min(size) < 1:
        raise ReviewError(f"the click corrector's mask has shape {np.shape(mask)}, its region "
                          f"{size}; they must match")
    if not all(s.start <= p < s.stop for p, s in zip(point, box, strict=True)):
        raise ReviewError(f"the click corrector's region {box} does not hold the click {point}")
    return box  # type: ignore[return-value]


def _dedupe(coords: np.ndarray, values: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """One value per voxel, the last given winning."""
    if not len(coords):
        return coords.reshape(0, 3).astype(np.int64), values.astype(np.int64)
    flat = np.ravel_multi_index(tuple(coords.T), shape)
    _, last = np.unique(flat[::-1], return_index=True)
    keep = np.sort(len(flat) - 1 - last)
    return coords[keep], values[keep]


def training_labels(session: Any, per_object: int = PER_OBJECT) -> SparseLabels:
    """The review's decisions as one SparseLabels (see ReviewSession.training_labels):
    decision samples in order, then the accepted and corrected objects as they are now
    (they win where they overlap). Not checked for completeness (it may hold no
    background yet): :func:`retrain` checks the merged strokes."""
    coords, values = [np.zeros((0, 3), np.int64)], [np.zeros(0, np.int64)]
    for c, v in session.corrections:
        coords.append(np.asarray(c, np.int64))
        values.append(np.asarray(v, np.int64))
    for rec in sorted(session.objects.values(), key=lambda r: r.id):
        if rec.status in ("accepted", "corrected"):
            inside = as_numpy(session.labels, rec.bbox) == rec.id
            c, v = sample_voxels(inside, rec.bbox, rec.cls, cap=per_object, seed=rec.id)
            coords.append(c)
            values.append(v)
    c, v = _dedupe(np.concatenate(coords), np.concatenate(values), session.shape)
    return SparseLabels(c, v, tuple(session.shape))


def merged_strokes(session: Any, strokes: Any) -> SparseLabels:
    """``strokes`` (SparseLabels, brush array or None) with the review's training labels
    on top, checked (ReviewError saying what is missing)."""
    review = training_labels(session)
    coords, values = [], []
    if strokes is not None:
        try:
            if not isinstance(strokes, SparseLabels):
                strokes = SparseLabels.from_array(strokes, session.shape)
        except ValueError as err:
            raise ReviewError(f"the strokes cannot be used: {err}") from None
        if tuple(strokes.image_shape) != tuple(session.shape):
            raise ReviewError(f"the strokes were made for shape {strokes.image_shape}, the "
                              f"labels are {session.shape}")
        coords.append(strokes.coords)
        values.append(strokes.values)
    coords.append(review.coords)
    values.append(review.values)
    c, v = _dedupe(np.concatenate(coords), np.concatenate(values), session.shape)
    try:
        return SparseLabels.from_points(c, v, session.shape)
    except ValueError as err:
        raise ReviewError(f"not enough to train on: {err} (accept or reject objects, or give "
                          "the training strokes too)") from None


def rescore(session: Any, probabilities: Any, channel_values: Sequence[int],
            uncertainty: Any) -> None:
    """New confidences and uncertainties of every object (see ReviewSession.rescore)."""
    from .working import check_inputs

    check_inputs(session.labels, None, None, probabilities, channel_values, uncertainty,
                 session.voxel_size, session.table.block)
    table = session.table
    table.probabilities, table.uncertainty = probabilities, uncertainty
    table.channel_values = tuple(int(v) for v in channel_values)
    fresh = table.scan(session.labels)
    for oid, rec in session.objects.items():
        new = fresh.get(oid)
        session.objects[oid] = rec.copy(confidence=None if new is None else new.confidence,
                                        uncertainty=None if new is None else new.uncertainty)


def current_scores(session: Any, rows: dict, box: Any, data: Any) -> dict:
    """``rows`` (id -> ObjectRecord or None) of a decision being undone, redone or
    replayed, with the confidence and uncertainty the session's maps give now (a rescore
    after the decision changed them). ``data``: the labels of ``box`` being applied (the
    box holds each object whole); None / no box: the rows' objects as they are now."""
    out = {}
    found = ({} if box is None or data is None
             else session.table.scan(Placed(np.asarray(data), box), box, list(rows)))
    for i, rec in rows.items():
        now = found.get(i) if box is not None else session.objects.get(i)
        out[i] = rec if rec is None or now is None else rec.copy(
            confidence=now.confidence, uncertainty=now.uncertainty)
    return out


def retrain(session: Any, segmenter: Any, image: Any, strokes: Any, ctx: Any) -> dict:
    """Fit on strokes + corrections, predict, rescore (see ReviewSession.retrain)."""
    if tuple(image.shape) != tuple(session.shape):
        raise ReviewError(f"the image has shape {tuple(image.shape)} but the labels "
                          f"{session.shape}; retrain on the image that was reviewed")
    sparse = merged_strokes(session, strokes)
    version = session.version
    fit = segmenter.fit(image, sparse, ctx)
    result = segmenter.predict(image, ctx, probabilities=True, uncertainty=True)
    session.rescore(result.probabilities, result.channel_values, result.uncertainty)
    return {"fit": fit, "version": version, "result": result,
            "n_annotated": sparse.n_annotated}


def _foreground_dice(pred: Any, truth: Any, shape, block) -> float:
    inter = total = 0
    for sub in iter_blocks(shape, block):
        p, t = as_numpy(pred, sub) != 0, as_numpy(truth, sub) != 0
        inter += int((p & t).sum())
        total += int(p.sum()) + int(t.sum())
    return 2.0 * inter / total if total else 1.0


def scores(session: Any, truth: Any) -> dict:
    """Dice and per-object scores before and after review (see ReviewSession.scores)."""
    if tuple(getattr(truth, "shape", ())) != tuple(session.shape):
        raise ReviewError(f"the ground truth has shape {tuple(getattr(truth, 'shape', ()))} "
                          f"but the labels {session.shape}; choose the truth of this image")
    if np.dtype(truth.dtype).kind not in "uib":
        raise ReviewError(f"the ground truth must be integer labels, got {truth.dtype}")
    truth_np = as_numpy(truth)
    out = {}
    for name, labels in (("before", session.original), ("after", session.labels)):
        match = match_objects(as_numpy(labels), truth_np)
        out[name] = {"dice": _foreground_dice(labels, truth_np, session.shape,
                                              session.table.block),
                     "precision": match.precision, "recall": match.recall, "f1": match.f1,
                     "n_pred": match.n_pred, "n_true": match.n_true}
    return out
