"""Instance labels from a binary mask: one id per object, touching blobs split.

The recipe, in micrometres throughout so anisotropic light-sheet voxels count right:

1. the distance of every foreground voxel to the background (the Euclidean distance
   transform with the voxel size as sampling), lightly smoothed against voxel
   staircases;
2. an over-segmentation: a watershed of that landscape from all of its local maxima
   (within a ball of a quarter of the typical object radius);
3. a merge of neighbouring regions, the highest saddle relative to the lower peak first
   (the saddle: the highest distance on their shared boundary). Two regions stay apart
   only when the lower peak is thick enough (``MIN_PEAK_*``: 1.5 fine voxels, one
   coarse voxel, 0.4 of the typical radius) and either the saddle is below
   ``DEEP_NECK`` of it, or (a) it rises above the saddle by more than ``h`` and the
   saddle is below ``NECK_RATIO`` of it (a neck) or, given a probability map, the
   prediction dips along their shared boundary (a valley), and (b) both sides are
   ball-like: each fills at most ``BLOB_BALLS`` balls of its own peak radius (checked
   again once the sides have grown). Two touching nuclei meet at a neck
   between two ball-like halves; a piece of vessel tube or a lobe of an irregular plaque
   is long or thin for its inscribed radius, so tubes and lobed blobs stay whole
   whatever their size;
4. fragments smaller than a fraction of the typical object (estimated from the mask:
   the volume-weighted median object, or from ``diameter``) join the neighbour they
   share the highest saddle with, or are dropped when they touch none.

The tests are ratios of sizes, so no object size needs to be known; ``diameter`` only
sets the seed spacing and the smallest object kept.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["split_instances"]

# Tuned on the validation seeds (7001) of benchmarks/instances.py, reported on 9001-9002.
# A side of a neck is ball-like when its volume is at most this many balls of its peak
# radius (single synthetic nuclei: 1.4-2.5; a tube piece of length L: 0.75 L / r).
BLOB_BALLS = 4.0
# Peaks thinner than this many (smallest) voxels are staircase noise of thin tubes.
MIN_PEAK_VOXELS = 1.5
# ... and this many of the coarsest voxels (a tube one z plane thick flickers)
MIN_PEAK_COARSE = 1.0
# ... and thinner than this fraction of the typical radius are tubes, not objects.
MIN_PEAK_RADIUS = 0.4
# A neck: the lower peak rises above the saddle by this fraction of the typical radius
# (ragged edges make shallow dips), and by at least this many (smallest) voxels.
NECK_RADIUS = 0.04
# ... and the saddle is below this fraction of the lower peak (a lobe of a ragged
# plaque: 0.86-0.93; touching nuclei: mostly 0.2-0.85).
NECK_RATIO = 0.9
NECK_VOXELS = 0.25
# A neck this deep (saddle / lower peak) parts any two sides: a wrong merge upstream
# (a clump no longer ball-like) must not swallow its well-separated neighbours.
DEEP_NECK = 0.5
# A valley: the probability on the shared boundary's core is below this fraction of
# the lower of the two sides' core probabilities.
VALLEY = 0.8
# Objects below this fraction of the typical object's volume are fragments.
MIN_VOLUME_FRACTION = 0.05


def split_instances(
    mask: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    min_size: int | None = None,
    min_distance: float | None = None,
    h: float | None = None,
    smooth: float = 0.5,
    probability: np.ndarray | None = None,
    diameter: float | None = None,
) -> np.ndarray:
    """Split a (Z, Y, X) binary mask into instances; uint32 labels, 0 = background.

    Args:
        mask: (Z, Y, X) bool (or anything where nonzero = foreground).
        voxel_size: (z, y, x) in micrometres; default isotropic 1.
        min_size: objects smaller than this (voxels) join a touching neighbour or are
            dropped; default 5 % of the typical object's volume (at least 3 voxels).
        min_distance: local maxima closer than this (micrometres) seed one region;
            default half the typical object radius.
        h: a peak must rise more than this (micrometres) above the saddle to its
            neighbour to stay apart (a neck); default 4 % of the typical radius, at
            least a quarter of the smallest voxel. Larger values split less.
        smooth: Gaussian sigma (voxels of the smallest size) of the distance map before
            seeding; 0 turns it off.
        probability: optional (Z, Y, X) foreground probability of the same prediction,
            float in [0, 1] or uint8 scaled to 255; where it dips along the boundary of
            two ball-like regions they stay apart even without a neck in the mask.
        diameter: the typical object diameter in micrometres (the units of
            ``voxel_size``); default: estimated from the mask.

    Returns:
        uint32 (Z, Y, X), objects numbered 1..N (consecutive, in raster order of their
        first voxel), 0 = background.
    """
    from skimage.segmentation import watershed

    mask = np.asarray(mask) != 0
    if mask.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) mask, got shape {mask.shape}")
    spacing = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), float)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"voxel_size must be three positive numbers, got {voxel_size}")
    if diameter is not None and not diameter > 0:
        raise ValueError(f"diameter must be a positive number of micrometres, got {diameter}")
    prob = None if probability is None else _as_probability(probability, mask.shape)
    if not mask.any():
        return np.zeros(mask.shape, np.uint32)
    step = float(spacing.min())

    land = ndi.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    if smooth > 0:
        land = ndi.gaussian_filter(land, float(smooth) * step / spacing) * mask
    # the typical radius: the 90th percentile of the distance is ~0.55 of a ball's radius
    radius = (0.5 * float(diameter) if diameter is not None
              else max(float(np.percentile(land[mask], 90)) / 0.55, step))
    spread = 0.5 * radius if min_distance is None else float(min_distance)
    neck = max(NECK_VOXELS * step, NECK_RADIUS * radius) if h is None else float(h)
    rules = _Rules(neck=neck,
                   min_peak=max(MIN_PEAK_VOXELS * step, MIN_PEAK_COARSE * float(spacing.max()),
                                MIN_PEAK_RADIUS * radius),
                   voxel_um3=float(np.prod(spacing)))

    # a probability valley must be able to seed two regions: grow them on the distance
    # weighted by how sure the prediction is; the merge judges the plain distance
    grow = land if prob is None else land * np.clip((prob - 0.5) / 0.4, 0.05, 1.0)
    seeds = _seeds(grow, mask, spacing, 0.5 * spread)
    regions = watershed(-grow, seeds, mask=mask)
    regions = _merge(regions, land, prob, rules)
    if min_size is None:
        volume = np.bincount(regions.ravel())[1:]
        typical = (_weighted_median(volume[volume > 0]) if diameter is None
                   else np.pi / 6 * float(diameter) ** 3 / rules.voxel_um3)
        min_size = max(3, int(MIN_VOLUME_FRACTION * typical))
    regions = _absorb_small(regions, land, int(min_size))
    return _consecutive(regions)


class _Rules:
    """The thresholds of one call (micrometres)."""

    def __init__(self, neck: float, min_peak: float, voxel_um3: float) -> None:
        self.neck, self.min_peak, self.voxel_um3 = neck, min_peak, voxel_um3


def _as_probability(probability, shape) -> np.ndarray:
    """float32 in [0, 1]; uint8 is read as 0-255."""
    p = np.asarray(probability)
    if p.shape != tuple(shape):
        raise ValueError(f"probability has shape {p.shape}, the mask {tuple(shape)}: "
                         "give the foreground probability of the same volume")
    return p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p.astype(np.float32)


def _seeds(land, mask, spacing, radius_um: float) -> np.ndarray:
    """Label each plateau of local maxima (within an ellipsoid of ``radius_um``)."""
    half = np.maximum(np.floor(radius_um / spacing), 1).astype(int)
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in half)]
    ball = sum((g * s / max(radius_um, s)) ** 2 for g, s in zip(grid, spacing, strict=True))
    footprint = ball <= 1.0 + 1e-6
    peak = (land >= ndi.maximum_filter(land, footprint=footprint)) & mask & (land > 0)
    seeds, _ = ndi.label(peak, structure=np.ones((3, 3, 3), bool))
    return seeds


def _boundaries(regions: np.ndarray, land: np.ndarray, prob: np.ndarray | None = None):
    """Edges between face-adjacent regions: (a, b) with a < b, the saddle (the highest
    min(land) over the face pairs they share) and, given ``prob``, the mean probability
    over the boundary's core (faces at least half as deep as the saddle; NaN without)."""
    codes, values, probs = [], [], []
    n = int(regions.max()) + 1
    for axis in range(3):
        lo_sl = (slice(None),) * axis + (slice(None, -1),)
        hi_sl = (slice(None),) * axis + (slice(1, None),)
        lo, hi = regions[lo_sl], regions[hi_sl]
        edge = (lo != hi) & (lo > 0) & (hi > 0)
        a, b = lo[edge].astype(np.int64), hi[edge].astype(np.int64)
        codes.append(np.minimum(a, b) * n + np.maximum(a, b))
        values.append(np.minimum(land[lo_sl][edge], land[hi_sl][edge]))
        if prob is not None:
            probs.append(np.minimum(prob[lo_sl][edge], prob[hi_sl][edge]))
    code, value = np.concatenate(codes), np.concatenate(values)
    if code.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32), np.zeros(0, np.float32)
    order = np.lexsort((value, code))
    code, value = code[order], value[order]
    start = np.r_[True, code[1:] != code[:-1]]
    last = np.r_[code[1:] != code[:-1], True]  # the highest value of each edge
    saddle = value[last]
    if prob is None:
        valley = np.full(saddle.shape, np.nan, np.float32)
    else:
        group = np.cumsum(start) - 1
        core = value >= 0.5 * saddle[group]
        face_p = np.concatenate(probs)[order]
        valley = (np.bincount(group[core], face_p[core], len(saddle))
                  / np.maximum(np.bincount(group[core], minlength=len(saddle)), 1))
    code = code[last]
    return code // n, code % n, saddle, valley


def _merge(regions: np.ndarray, land: np.ndarray, prob: np.ndarray | None,
           rules: _Rules) -> np.ndarray:
    """Merge neighbours, the most obvious first, unless a neck or a valley of
    probability parts two ball-like sides."""
    n = int(regions.max())
    if n < 2:
        return regions
    a, b, saddle, valley = _boundaries(regions, land, prob)
    index = np.arange(1, n + 1)
    peak = np.zeros(n + 1, np.float64)
    peak[1:] = ndi.maximum(land, regions, index)
    count = np.bincount(regions.ravel(), minlength=n + 1).astype(np.float64)
    volume = count * rules.voxel_um3
    # the sides' core probability (voxels at least half as deep as the region's peak)
    inner = np.zeros(n + 1, np.float64)
    if prob is not None:
        core = land >= 0.5 * peak[regions]
        inner[1:] = ndi.mean(prob, np.where(core, regions, 0), index)
    weight = count.copy()
    parent = np.arange(n + 1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # the most obvious merges first: highest saddle relative to the lower peak, so a
    # tube's pieces join into a tube before its thin end meets a bulge; a merge raises
    # peaks, which only lowers other edges' ratios, so stale entries are re-queued
    heap = [(-float(saddle[k]) / max(min(peak[a[k]], peak[b[k]]), 1e-6), k)
            for k in range(len(saddle))]
    heapq.heapify(heap)
    kept: list[int] = []
    while heap or kept:
        if not heap:
            # a side that grew out of ball shape after its neck was judged (a tube
            # assembled from pieces) gets its necks judged again
            again = [k for k in kept if _grown(k, a, b, saddle, peak, volume, find)]
            kept = [k for k in kept if k not in set(again)]
            if not again:
                break
            heap = [(-1.0, k) for k in again]
            continue
        key, k = heapq.heappop(heap)
        ra, rb = find(int(a[k])), find(int(b[k]))
        if ra == rb:
            continue
        low = min(peak[ra], peak[rb])
        s = float(saddle[k])
        if -s / max(low, 1e-6) > key + 1e-9:
            heapq.heappush(heap, (-s / max(low, 1e-6), k))
            continue
        balls = max(volume[ra] / max(peak[ra], 1e-6) ** 3,
                    volume[rb] / max(peak[rb], 1e-6) ** 3) / (4 / 3 * np.pi)
        neck = low - s > rules.neck and s < NECK_RATIO * low
        dip = prob is not None and valley[k] < VALLEY * min(inner[ra], inner[rb])
        if low >= rules.min_peak and (s < DEEP_NECK * low or (
                (neck or dip) and balls <= BLOB_BALLS)):
            kept.append(k)  # two objects, unless a side grows out of ball shape later
            continue
        parent[rb] = ra
        peak[ra] = max(peak[ra], peak[rb])
        volume[ra] += volume[rb]
        total = weight[ra] + weight[rb]
        inner[ra] = (inner[ra] * weight[ra] + inner[rb] * weight[rb]) / max(total, 1.0)
        weight[ra] = total
    lut = np.array([find(i) for i in range(n + 1)], np.int64)
    return lut[regions]


def _grown(k, a, b, saddle, peak, volume, find) -> bool:
    """Whether an edge kept apart now joins a side no longer ball-like, by a neck not
    deep enough to part any two sides."""
    ra, rb = find(int(a[k])), find(int(b[k]))
    if ra == rb:
        return False
    balls = max(volume[ra] / max(peak[ra], 1e-6) ** 3,
                volume[rb] / max(peak[rb], 1e-6) ** 3) / (4 / 3 * np.pi)
    return balls > BLOB_BALLS and float(saddle[k]) >= DEEP_NECK * min(peak[ra], peak[rb])


def _absorb_small(regions: np.ndarray, land: np.ndarray, min_size: int) -> np.ndarray:
    """Regions below ``min_size`` voxels join the neighbour with the highest saddle
    (smallest first, repeatedly); those with no neighbour are dropped."""
    ids, inverse, volume = np.unique(regions, return_inverse=True, return_counts=True)
    regions = inverse.reshape(regions.shape)  # 0..M, background stays 0 (ids[0] == 0)
    if ids[0] != 0:
        regions = regions + 1
        volume = np.r_[0, volume]
    volume = volume.astype(np.int64)
    volume[0] = 0
    small = np.flatnonzero((volume < min_size) & (np.arange(len(volume)) > 0))
    if small.size == 0:
        return regions
    a, b, saddle, _ = _boundaries(regions, land)
    parent = np.arange(len(volume))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # highest saddle first: a fragment joins the object it is most connected to
    for k in np.argsort(-saddle, kind="stable"):
        ra, rb = find(int(a[k])), find(int(b[k]))
        if ra == rb or (volume[ra] >= min_size and volume[rb] >= min_size):
            continue
        parent[rb] = ra
        volume[ra] += volume[rb]
    lut = np.array([find(i) for i in range(len(volume))], np.int64)
    lut[volume[lut] < min_size] = 0
    return lut[regions]


def _consecutive(regions: np.ndarray) -> np.ndarray:
    """Renumber to 1..N in order of first appearance in raster order; uint32."""
    flat = regions.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    ids, first = ids[keep], first[keep]
    lut = np.zeros(int(regions.max()) + 1, np.uint32)
    lut[ids[np.argsort(first)]] = np.arange(1, ids.size + 1, dtype=np.uint32)
    return lut[regions]


def _weighted_median(volume: np.ndarray) -> float:
    """The volume of the object the median foreground voxel belongs to."""
    v = np.sort(volume.astype(np.float64))
    cum = np.cumsum(v)
    return float(v[np.searchsorted(cum, 0.5 * cum[-1])])
