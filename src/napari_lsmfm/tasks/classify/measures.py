"""Hand-made shape and intensity measures of objects, points and tiles: what a
microscopist would measure (CellProfiler-style), used beside the foundation's embeddings
and, alone, by the random-forest baseline the benchmark compares with.

Intensities are those of the volume normalised by its 1st-99th percentile range (the
foundation's one normalisation), so measures compare across volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MEASURES", "measure_items"]

OBJECT_MEASURES = (
    "log_volume_um3", "log_extent_1", "log_extent_2", "log_extent_3", "log_axis_1",
    "log_axis_2", "log_axis_3", "elongation", "flatness", "fill_fraction", "surface_fraction",
    "mean", "std", "max", "p90", "ring_mean", "contrast", "log_thickness", "core_contrast",
)
POINT_MEASURES = ("centre", "mean", "std", "max", "ring_mean", "contrast")
TILE_MEASURES = ("mean", "std", "p10", "p50", "p90", "p99", "bright_fraction")
MEASURES = {"objects": OBJECT_MEASURES, "points": POINT_MEASURES, "tiles": TILE_MEASURES}


def _read(volume: Any, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    region = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    compute = getattr(region, "compute", None)
    return np.asarray(compute() if compute is not None else region)


def _norm(raw: np.ndarray, irange: tuple[float, float]) -> np.ndarray:
    lo, hi = float(irange[0]), float(irange[1])
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((raw.astype(np.float32) - lo) * scale, 0.0, 1.0)


def _object(mask: np.ndarray, values: np.ndarray, ring: np.ndarray, spacing: np.ndarray
            ) -> list[float]:
    from scipy import ndimage

    n = int(mask.sum())
    coords = np.argwhere(mask) * spacing
    extent = (coords.max(0) - coords.min(0)) + spacing
    ext = np.sort(extent)[::-1]
    if n > 1:
        eig = np.sort(np.linalg.eigvalsh(np.cov(coords.T)))[::-1]
    else:
        eig = np.zeros(3)
    axes = np.sqrt(np.maximum(eig, 0.0)) + float(spacing.min()) / 4
    eroded = ndimage.binary_erosion(mask)
    inside = values[mask]
    ring_vals = values[ring] if ring.any() else inside
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    core = mask & (depth > 0.5 * depth.max())
    shell = mask & ~core
    core_contrast = float(values[core].mean() - (values[shell].mean() if shell.any() else 0.0))
    return [
        float(np.log(n * float(np.prod(spacing)))),
        *(float(np.log(e)) for e in ext),
        *(float(np.log(a)) for a in axes),
        float(axes[0] / axes[1]), float(axes[1] / axes[2]),
        float(n / max(np.prod(np.ceil(extent / spacing)), 1)),
        float(1.0 - eroded.sum() / n),
        float(inside.mean()), float(inside.std()), float(inside.max()),
        float(np.percentile(inside, 90)), float(ring_vals.mean()),
        float(inside.mean() - ring_vals.mean()),
        float(np.log(depth.max() + float(spacing.min()) / 4)), core_contrast,
    ]


def measure_items(items: Any, image: Any, irange: tuple[float, float],
                  voxel_size: Sequence[float] | None, point_radius: float = 4.0
                  ) -> np.ndarray:
    """The measures of ``MEASURES[items.kind]`` for every item: float32 (N, M).

    Objects: volume (um^3), bounding-box extents and principal axes (um, logs), elongation,
    flatness, fill fraction of the box, surface fraction, intensity inside (mean, std, max,
    90th percentile), in a 2-voxel ring around it, the contrast between them, the
    thickness (the largest distance from the border inside, um, log) and the contrast of the
    core (deeper than half that) against the rest of the object. Points:
    the intensity at the point, in a ball of ``point_radius`` um (mean, std, max), in a
    ring around the ball and the contrast. Tiles: intensity mean, std, percentiles and the
    fraction of voxels above mean + 2 std.
    """
    from scipy import ndimage

    spacing = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), float)
    shape = np.asarray(image.shape)
    out = []
    if items.kind == "objects":
        for (box, value) in zip(items.boxes, items.labels, strict=True):
            lo = np.maximum(box[:, 0] - 2, 0)
            hi = np.minimum(box[:, 1] + 2, shape)
            values = _norm(_read(image, lo, hi), irange)
            mask = _read(items.mask_source, lo, hi) == value
            ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
            out.append(_object(mask, values, ring, spacing))
    elif items.kind == "points":
        r = np.ceil(2 * point_radius / spacing).astype(int)
        for centre in items.centres:
            c = np.round(centre).astype(int)
            lo, hi = np.maximum(c - r, 0), np.minimum(c + r + 1, shape)
            values = _norm(_read(image, lo, hi), irange)
            grid = np.meshgrid(*[(np.arange(a, b) - cc) * s for a, b, cc, s in
                                 zip(lo, hi, c, spacing, strict=True)], indexing="ij")
            dist = np.sqrt(sum(g ** 2 for g in grid))
            ball = dist <= point_radius
            ring = (dist > point_radius) & (dist <= 2 * point_radius)
            inside = values[ball]
            around = values[ring] if ring.any() else inside
            out.append([float(values[tuple(c - lo)]), float(inside.mean()), float(inside.std()),
                        float(inside.max()), float(around.mean()),
                        float(inside.mean() - around.mean())])
    else:
        for box in items.boxes:
            values = _norm(_read(image, box[:, 0], box[:, 1]), irange).ravel()
            mean, std = float(values.mean()), float(values.std())
            p = np.percentile(values, [10, 50, 90, 99])
            out.append([mean, std, *map(float, p), float((values > mean + 2 * std).mean())])
    return np.asarray(out, np.float32).reshape(len(items), len(MEASURES[items.kind]))
