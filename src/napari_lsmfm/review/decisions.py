"""The changes that the label-editing decisions of a review make (split, click), built
from the session's working labels and table without changing them: the session writes
the patch, applies it and records it (:meth:`ReviewSession._commit`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import edits, training
from .history import Change
from .objects import Box, ObjectRecord, ObjectTable, ReviewError, as_numpy, box_union
from .working import Placed

__all__ = ["check_id", "click_change", "paint_change", "rows_of", "split_change"]


def rows_of(table: ObjectTable, after: np.ndarray, box: Box, ids: Sequence[int],
            status: str, cls: int | None) -> dict[int, ObjectRecord | None]:
    """Fresh table rows of ``ids`` from ``after`` (the labels of ``box``, which holds
    each of them whole), with ``status`` and class ``cls`` (None: the class map's);
    None for an id with no voxel left."""
    found = table.scan(Placed(after, box), box, ids)
    return {i: (found[i].copy(status=status, cls=cls if cls is not None else found[i].cls)
                if i in found else None) for i in ids}


def check_id(top: int, dtype: Any) -> None:
    """ReviewError when object id ``top`` does not fit the labels' ``dtype``."""
    if np.dtype(dtype).kind in "ui" and top > np.iinfo(dtype).max:
        raise ReviewError(f"object id {top} does not fit the labels' {dtype}; save the "
                          "labels as uint32 and review again")


def split_change(session: Any, rec: ObjectRecord, stroke: Any, n: int | None) -> Change:
    """The change splitting object ``rec`` (see ReviewSession.split)."""
    before = as_numpy(session.labels, rec.bbox)
    mask = before == rec.id
    if stroke is not None:
        local = np.asarray(stroke, np.float64).reshape(-1, 3) - [s.start for s in rec.bbox]
        parts = edits.split_by_stroke(mask, local, rec.id)
    else:
        if n is None:
            live = [r.voxels for r in session.objects.values() if r.status != "rejected"]
            n = edits.default_seeds(rec.voxels, float(np.median(live)))
        parts = edits.split_by_watershed(mask, n, rec.id, session.voxel_size, seed=rec.id)
    first = session.next_id
    ids = [rec.id, *range(first, first + int(parts.max()) - 1)]
    check_id(ids[-1], before.dtype)
    lut = np.asarray([0, *ids], before.dtype)
    after = np.where(mask, lut[parts], before).astype(before.dtype)
    rows = rows_of(session.table, after, rec.bbox, ids, "corrected", rec.cls)
    return Change("split", ids, box=rec.bbox, before=before, after=after,
                  rows_before={i: session.objects.get(i) for i in ids}, rows_after=rows)


def click_change(session: Any, point: Sequence[float], positive: bool, corrector: Any
                 ) -> tuple[Change, Box]:
    """The change a click makes, and the region the corrector named (see
    ReviewSession.click)."""
    shape = session.shape
    p = tuple(int(round(float(c))) for c in point)
    if len(p) != 3 or not all(0 <= c < n for c, n in zip(p, shape, strict=True)):
        raise ReviewError(f"the click {tuple(point)} lies outside the volume of shape "
                          f"{shape}; click inside the image")
    region, mask = corrector.correct(session, p, positive)
    region = training.check_region(region, mask, p, shape)
    local = tuple(c - s.start for c, s in zip(p, region, strict=True))
    new_lab, target = edits.apply_click(as_numpy(session.labels, region), local, mask,
                                        positive, session.next_id)
    check_id(target, new_lab.dtype)
    old = session.objects.get(target)
    box = box_union(region, None if old is None else old.bbox)
    before = as_numpy(session.labels, box)
    after = before.copy()
    after[tuple(slice(r.start - b.start, r.stop - b.start)
                for r, b in zip(region, box, strict=True))] = new_lab
    rows = rows_of(session.table, after, box, [target], "corrected",
                   None if old is None else old.cls)
    if rows[target] is None and old is not None:  # trimmed away entirely
        rows[target] = old.copy(status="rejected")
    cls = (rows[target] or old).cls
    samples = training.click_samples(before, after, box, p, positive, cls,
                                     seed=session.version)
    change = Change("click", [target], box=box, before=before, after=after,
                    rows_before={target: old}, rows_after=rows, samples=samples, point=p,
                    positive=positive)
    return change, region


def paint_change(session: Any, box: Any, painted: Any) -> Change:
    """The change of labels painted by hand (see ReviewSession.paint): ``painted`` are
    the labels of ``box`` (three slices) as the expert left them."""
    box = training.check_box(box, session.shape)
    painted = np.asarray(painted)
    current = as_numpy(session.labels, box)
    if painted.shape != current.shape:
        raise ReviewError(f"the painted labels have shape {painted.shape}, the box "
                          f"{current.shape}; pass the labels of the box that was painted")
    if painted.dtype.kind not in "uib":
        raise ReviewError(f"painted labels must be integers, got {painted.dtype}")
    if painted.size and int(painted.min()) < 0:
        raise ReviewError("painted labels must not be negative (0 = background)")
    changed = painted != current
    if not changed.any():
        raise ReviewError("nothing was painted: the labels are as they were")
    touched = np.union1d(np.unique(current[changed]), np.unique(painted[changed]))
    ids = [int(i) for i in touched if i]
    check_id(max(ids, default=0), current.dtype)
    whole = box_union(box, *(session.objects[i].bbox for i in ids if i in session.objects))
    before = as_numpy(session.labels, whole)
    after = before.copy()
    inner = tuple(slice(b.start - w.start, b.stop - w.start)
                  for b, w in zip(box, whole, strict=True))
    after[inner] = painted.astype(before.dtype)  # equal to the labels where not changed
    old = {i: session.objects.get(i) for i in ids}
    rows = {i: None if rec is None else rec.copy(cls=old[i].cls if old[i] is not None else 2)
            for i, rec in rows_of(session.table, after, whole, ids, "corrected", None).items()}
    values = np.where(painted[changed] > 0, 0, training.BACKGROUND).astype(np.int64)
    for i in ids:  # a painted voxel trains as its object's class
        rec = rows.get(i) or old.get(i)
        if rec is not None:
            values[painted[changed] == i] = rec.cls
    coords = np.argwhere(changed).astype(np.int64) + [s.start for s in box]
    keep = values > 0
    return Change("paint", ids, box=whole, before=before, after=after, rows_before=old,
                  rows_after=rows, samples=(coords[keep], values[keep]))
