"""Label edits inside one bounding box (numpy, no Qt): split an object by a stroke or by a
seeded watershed, and apply a click correction's mask. Each returns new labels for the
box; the session writes them, records the change and updates the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from .objects import ReviewError

__all__ = ["MIN_PART", "apply_click", "default_seeds", "split_by_stroke",
           "split_by_watershed"]

MIN_PART = 4  # voxels: the smallest part a split may leave; an object needs twice this


def default_seeds(voxels: int, median_voxels: float) -> int:
    """Seeds for a watershed split: the object's size in median objects, at least 2."""
    if median_voxels <= 0:
        return 2
    return max(2, int(round(voxels / median_voxels)))


def _check_size(mask: np.ndarray, oid: int) -> None:
    n = int(mask.sum())
    if n < 2 * MIN_PART:
        raise ReviewError(
            f"object {oid} has {n} voxels, too small to split (at least {2 * MIN_PART} are "
            "needed); merge it into a neighbour or reject it instead")


def _rasterize(stroke: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The voxels of a polyline through ``stroke`` (N, 3) (box coordinates), extruded
    through the box along the first axis on which the stroke is flat: a stroke drawn on
    a 2D slice cuts the whole object, as the user sees it."""
    from skimage.draw import line_nd

    cut = np.zeros(shape, bool)
    pts = np.round(stroke).astype(np.int64)
    segments = [(pts[i], pts[i + 1]) for i in range(len(pts) - 1)] or [(pts[0], pts[0])]
    for a, b in segments:
        line = line_nd(a, b, endpoint=True)
        inside = np.ones(len(line[0]), bool)
        for ax, c in enumerate(line):
            inside &= (c >= 0) & (c < shape[ax])
        cut[tuple(c[inside] for c in line)] = True
    flat = [ax for ax in range(3) if np.ptp(pts[:, ax]) == 0]
    if flat and len(flat) < 3:
        cut = np.broadcast_to(cut.any(axis=flat[0], keepdims=True), shape).copy()
    return cut


def split_by_stroke(mask: np.ndarray, stroke: np.ndarray, oid: int) -> np.ndarray:
    """Parts of ``mask`` (the object inside its box) cut by ``stroke`` (N, 3) voxel
    coordinates relative to the box: int32 1, 2, ... (the largest part first), 0 outside;
    the cut voxels go to the nearest part. ReviewError when the object is too small or
    the stroke leaves it whole."""
    _check_size(mask, oid)
    stroke = np.asarray(stroke, np.float64).reshape(-1, 3)
    if len(stroke) < 2:
        raise ReviewError("a split stroke needs at least two points; draw a line across the "
                          f"object {oid}")
    cut = _rasterize(stroke, mask.shape)
    parts, n = ndi.label(mask & ~cut)  # face neighbours: a diagonal line still cuts
    sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(sizes >= MIN_PART) + 1
    if len(keep) < 2:
        raise ReviewError(
            f"the stroke does not cut object {oid} into two parts of {MIN_PART}+ voxels; "
            "draw the line all the way across the object")
    return _nearest_fill(parts, keep, mask)


def split_by_watershed(mask: np.ndarray, n: int, oid: int,
                       spacing: Sequence[float] = (1.0, 1.0, 1.0), seed: int = 0
                       ) -> np.ndarray:
    """``mask`` split into ``n`` parts by a watershed of its distance map, seeded at the
    k-means centres of its core (the voxels at least half the largest distance from the
    edge: for touching blobs, their middles): int32 1..k, the largest part first.
    ReviewError when too small or fewer than two parts result."""
    from scipy.cluster.vq import kmeans2
    from skimage.segmentation import watershed

    _check_size(mask, oid)
    n = int(n)
    if n < 2:
        raise ReviewError(f"a split needs at least 2 seeds, got {n}")
    n = min(n, int(mask.sum()) // MIN_PART)
    dist = ndi.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    core = np.argwhere(dist >= 0.5 * dist.max())
    if len(core) < n:
        core = np.argwhere(mask)
    scaled = core * np.asarray(spacing, np.float64)
    centres, _ = kmeans2(scaled, n, seed=seed, minit="++")
    picks = sorted({int(np.argmin(((scaled - c) ** 2).sum(1))) for c in centres})
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(core[picks].T)] = np.arange(1, len(picks) + 1)
    parts = watershed(-dist, markers, mask=mask)
    sizes = np.bincount(parts.ravel(), minlength=len(picks) + 1)[1:]
    keep = np.flatnonzero(sizes >= MIN_PART) + 1
    if len(keep) < 2:
        raise ReviewError(f"object {oid} could not be split into two parts of {MIN_PART}+ "
                          "voxels; draw a stroke across it instead")
    return _nearest_fill(parts, keep, mask)


def _nearest_fill(parts: np.ndarray, keep: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Keep parts ``keep`` (numbered 1.. by size, largest first); every other voxel of
    ``mask`` joins the nearest kept part."""
    sizes = np.array([(parts == k).sum() for k in keep])
    order = keep[np.argsort(-sizes, kind="stable")]
    lut = np.zeros(int(parts.max()) + 1, np.int32)
    lut[order] = np.arange(1, len(order) + 1)
    out = lut[parts]
    if (mask & (out == 0)).any():
        _, idx = ndi.distance_transform_edt(out == 0, return_indices=True)
        out = np.where(mask, out[tuple(idx)], 0).astype(np.int32)
    return out


def apply_click(labels: np.ndarray, point: Sequence[int], mask: np.ndarray, positive: bool,
                new_id: int) -> tuple[np.ndarray, int]:
    """Apply a click inside a region: ``labels`` and ``mask`` (the predicted foreground)
    cover the region, ``point`` is relative to it. Positive: the background voxels of the
    mask component holding the point join the object at the point, else the nearest one
    in the region, else ``new_id``. Negative: the voxels of the object at (or nearest) the
    point that are outside the mask, and the point itself, become 0. Returns (new labels,
    the object's id). ReviewError for a negative click with no object in the region."""
    point = tuple(int(p) for p in point)
    mask = np.asarray(mask, bool)
    out = labels.copy()
    target = int(labels[point])
    if target == 0 and labels.any():
        _, idx = ndi.distance_transform_edt(labels == 0, return_indices=True)
        target = int(labels[tuple(i[point] for i in idx)])
    if positive:
        grow = mask.copy()
        grow[point] = True
        comp, _ = ndi.label(grow)
        join = (comp == comp[point]) & (labels == 0)
        target = target or int(new_id)
        out[join] = target
        return out, target
    if target == 0:
        raise ReviewError("a negative click removes part of an object, but there is none near "
                          "this point; click on the object to trim")
    drop = (labels == target) & ~mask
    drop[point] = labels[point] == target
    out[drop] = 0
    return out, target
