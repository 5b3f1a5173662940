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

__all__ = ["CLASSICAL_OBJECT_MEASURES", "MEASURES", "OBJECT_MEASURES", "measure_items"]

OBJECT_MEASURES = (
    "log_volume_um3", "log_extent_1", "log_extent_2", "log_extent_3", "log_axis_1",
    "log_axis_2", "log_axis_3", "elongation", "flatness", "fill_fraction", "surface_fraction",
    "mean", "std", "max", "p90", "ring_mean", "contrast", "log_thickness", "core_contrast",
    # relative to the object's own scale, brightness and background: unchanged by the voxel
    # size, the photon count or the object's size (the shifted columns of the benchmark)
    "profile_corr", "core_ratio", "log_contrast_ratio", "relative_thickness",
    "relative_spread", "peak_offset", "bright_fraction", "smooth_contrast",
)
CLASSICAL_OBJECT_MEASURES = OBJECT_MEASURES[:OBJECT_MEASURES.index("profile_corr")]
SMOOTH_UM = 1.0  # Gaussian (um) the relative measures read intensities through (noise)
SHELL_UM = 3.0  # the background of the relative measures: 1 to this many um outside
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


def _relative(mask: np.ndarray, values: np.ndarray, depth: np.ndarray, spacing: np.ndarray
              ) -> list[float]:
    """The scale-free measures of one object (see :func:`measure_items`)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(values, SMOOTH_UM / spacing)
    dmax = float(depth.max())
    rel = depth[mask] / max(dmax, 1e-6)
    inside = smooth[mask]
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    shell = ~mask & (outside > 1.0) & (outside <= SHELL_UM)
    bg = float(np.median(smooth[shell])) if shell.sum() > 3 else float(inside.min())
    above = max(float(inside.mean()) - bg, 1e-3)
    corr = (float(np.corrcoef(rel, inside)[0, 1])
            if inside.std() > 1e-8 and rel.std() > 1e-8 else 0.0)
    deep, outer = inside[rel > 0.6], inside[rel < 0.3]
    core = ((float(deep.mean()) if deep.size else float(inside.mean()))
            - (float(outer.mean()) if outer.size else float(inside.mean()))) / above
    volume = float(mask.sum() * np.prod(spacing))
    coords = np.argwhere(mask)
    peak = coords[np.argmax(inside)]
    centre = np.argwhere(depth == dmax)[0]
    offset = float(np.linalg.norm((peak - centre) * spacing)) / max(dmax, 1e-6)
    bright = float(np.mean(inside > bg + 0.75 * (inside.max() - bg)))
    out = [corr, core, float(np.log(above / max(bg, 1e-3))), dmax / volume ** (1 / 3),
           float(inside.std()) / above, offset, bright, above]
    return [float(np.clip(v, -10.0, 10.0)) for v in out]


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
        *_relative(mask, values, depth, spacing),
    ]


def measure_items(items: Any, image: Any, irange: tuple[float, float],
                  voxel_size: Sequence[float] | None, point_radius: float = 4.0
                  ) -> np.ndarray:
    """The measures of ``MEASURES[items.kind]`` for every item: float32 (N, M).

    Objects: volume (um^3), bounding-box extents and principal axes (um, logs), elongation,
    flatness, fill fraction of the box, surface fraction, intensity inside (mean, std, max,
    90th percentile), in a 2-voxel ring around it, the contrast between them, the
    thickness (the largest distance from the border inside, um, log) and the contrast of the
    core (deeper than half that) against the rest of the object; then measures relative to
    the object itself, on intensities smoothed by ``SMOOTH_UM`` and against the median of a
    shell 1 to ``SHELL_UM`` um outside it (the local background): the correlation of
    intensity with depth (depth / thickness), the deep (> 0.6) minus the outer (< 0.3)
    intensity over the object's intensity above background, the log of that above-background
    intensity over the background, thickness over the cube root of volume, the intensity
    spread over the intensity above background, the distance of the brightest voxel from
    the deepest (in thicknesses), the fraction above 3/4 of the peak over the background,
    and the smoothed intensity above background. Points:
    the intensity at the point, in a ball of ``point_radius`` um (mean, std, max), in a
    ring around the ball and the contrast. Tiles: intensity mean, std, percentiles and the
    fraction of voxels above mean + 2 std.
    """
    from scipy import ndimage

    spacing = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), float)
    shape = np.asarray(image.shape)
    out = []
    if items.kind == "objects":
        pad = np.maximum(2, np.ceil(SHELL_UM / spacing).astype(int) + 1)  # ring and shell
        for (box, value) in zip(items.boxes, items.labels, strict=True):
            lo = np.maximum(box[:, 0] - pad, 0)
            hi = np.minimum(box[:, 1] + pad, shape)
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
