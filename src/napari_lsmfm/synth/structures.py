"""Sharp ground-truth structures for synthetic light-sheet volumes.

Every function here works in micrometres internally and returns voxel arrays
``(Z, Y, X)``: a float32 fluorophore density ``clean`` in [0, 1] and uint16
``labels``. Objects are rendered inside their own bounding boxes so the cost grows
with the number of objects, not with objects x volume.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from scipy import ndimage as ndi

KINDS = ("nuclei", "vessels", "plaques")

# Object densities at density=1 (per cubic micrometre), chosen so that a
# 96 x 128 x 128 um block holds ~125 nuclei, ~1900 um of vessel or ~8 plaques.
NUCLEI_PER_UM3 = 8e-5
VESSEL_UM_PER_UM3 = 1.2e-3
PLAQUES_PER_UM3 = 5e-6
SPECKLES_PER_UM3 = 6e-5
# One vessel tree per this much tissue (at least one).
UM3_PER_VESSEL_TREE = 4e6
# Faint, smooth tissue autofluorescence under every structure.
TISSUE_LEVEL = 0.03


def make_structures(
    kind: str,
    shape: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    density: float,
    rng: np.random.Generator,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render sharp structures of one kind.

    Args:
        kind: "nuclei", "vessels" or "plaques".
        shape: (Z, Y, X) in voxels.
        voxel_size: (z, y, x) in micrometres.
        density: multiplies the number of objects (nuclei, plaques, speckles) or the
            total vessel length; 0 gives an empty volume (tissue background only).
        rng: the only source of randomness.
        info: if given, filled with counts and structure parameters for the record.

    Returns:
        clean: (Z, Y, X) float32 in [0, 1], the fluorophore density.
        labels: (Z, Y, X) uint16, instance ids 1..N (nuclei, plaques) or 0/1 (vessels).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown structure kind {kind!r}: choose one of {', '.join(KINDS)}")
    shape = tuple(int(s) for s in shape)
    voxel = np.asarray(voxel_size, dtype=np.float64)
    info = {} if info is None else info
    fine = _smooth_noise(shape, voxel, 0.8, rng)  # chromatin / fibril texture
    coarse = _smooth_noise(shape, voxel, 6.0, rng)  # tissue-scale variation
    clean = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint16)
    if kind == "nuclei":
        _nuclei(clean, labels, voxel, density, rng, fine, info)
    elif kind == "vessels":
        _vessels(clean, labels, voxel, density, rng, fine, info)
    else:
        _plaques(clean, labels, voxel, density, rng, fine, info)
    clean += np.float32(TISSUE_LEVEL) * (1.0 + 0.5 * np.clip(coarse, -2, 2))
    np.clip(clean, 0.0, 1.0, out=clean)
    info["tissue_level"] = TISSUE_LEVEL
    return clean, labels


# --- shared helpers ---------------------------------------------------------


def _smooth_noise(shape, voxel, sigma_um: float, rng) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation ``sigma_um``."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    field = ndi.gaussian_filter(noise, sigma=tuple(sigma_um / voxel), mode="wrap")
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def _volume_um3(shape, voxel) -> float:
    return float(np.prod(np.asarray(shape) * voxel))


def _bbox(center_um, radius_um, voxel, shape):
    """Slices of the voxels within ``radius_um`` (per axis) of ``center_um``, or None."""
    lo = np.floor((center_um - radius_um) / voxel).astype(int)
    hi = np.ceil((center_um + radius_um) / voxel).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def _grid_um(box, voxel):
    """Voxel-centre coordinates (um) of a bounding box as three broadcastable arrays."""
    axes = []
    for ax, (s, v) in enumerate(zip(box, voxel, strict=True)):
        shape = [1, 1, 1]
        shape[ax] = -1
        axes.append((np.arange(s.start, s.stop, dtype=np.float32) * np.float32(v)).reshape(shape))
    return tuple(axes)


def _norm(v) -> float:
    # No BLAS and no SIMD-dispatched exp/log/pow anywhere in synth: their last bits vary
    # between CPUs, and the shipped samples must regenerate bit for bit.
    return math.sqrt(float(np.sum(np.asarray(v, np.float64) ** 2)))


def _unit(v) -> np.ndarray:
    return np.asarray(v, np.float64) / max(_norm(v), 1e-12)


def _dist2(points, c) -> np.ndarray:
    """Squared distances from each row of ``points`` (n, 3) to ``c`` (3,)."""
    diff = points - c
    return np.sum(diff * diff, axis=1)


def _random_rotation(rng) -> np.ndarray:
    """Uniform random 3x3 rotation matrix, from a random unit quaternion."""
    w, x, y, z = _unit(rng.standard_normal(4))
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _coverage(sdf_um, h_um: float):
    """Partial-volume edge: 1 inside, 0 outside, linear over one voxel across the surface."""
    return np.clip(0.5 - sdf_um / h_um, 0.0, 1.0)


# --- nuclei ---------------------------------------------------------------


def _nuclei(clean, labels, voxel, density, rng, fine, info):
    shape = clean.shape
    extent = np.asarray(shape) * voxel
    n = int(round(density * _volume_um3(shape, voxel) * NUCLEI_PER_UM3))
    h = float(voxel.min())
    best = np.full(shape, np.inf, np.float32)  # normalised distance of the owner
    centers, radii = np.zeros((n, 3)), np.zeros(n)
    m = 0  # nuclei placed so far
    n_touching = 0
    for _ in range(n):
        r = float(np.clip(rng.lognormal(math.log(5.0), 0.2), 3.5, 8.0))
        placed = None
        for _attempt in range(30):
            min_gap = r + radii[:m]
            if m and rng.random() < 0.3:
                # Pressed against a neighbour: the pair shares a boundary.
                j = int(rng.integers(m))
                direction = _unit(rng.standard_normal(3))
                c = centers[j] + direction * (radii[j] + r) * rng.uniform(0.8, 0.95)
                min_gap[j] = 0.0
            else:
                c = rng.random(3) * extent
                j = -1
            if np.any(c < 0) or np.any(c >= extent):
                continue
            if np.all(_dist2(centers[:m], c) >= min_gap * min_gap):
                placed = c
                n_touching += j >= 0
                break
        if placed is None:
            continue
        axes = r * rng.uniform(0.8, 1.25, 3)
        rot = _random_rotation(rng)
        brightness = rng.uniform(0.35, 0.85)
        box = _bbox(placed, np.full(3, axes.max() + h), voxel, shape)  # centre is inside
        centers[m], radii[m] = placed, r
        m += 1
        label = m
        gz, gy, gx = _grid_um(box, voxel)
        rel = (gz - placed[0], gy - placed[1], gx - placed[2])
        # Normalised ellipsoid distance in the nucleus' own (rotated) frame.
        d2 = 0
        for k in range(3):
            u = rel[0] * rot[0, k] + rel[1] * rot[1, k] + rel[2] * rot[2, k]
            d2 = d2 + (u / axes[k]) ** 2
        d = np.sqrt(d2).astype(np.float32)
        sub_best, sub_lab, sub_clean = best[box], labels[box], clean[box]
        own = (d < 1.0) & (d < sub_best)
        sub_lab[own] = label
        sub_best[own] = d[own]
        texture = np.clip(0.8 + 0.2 * fine[box], 0.4, 1.2)
        d2 = d * d
        rim = 1.0 - 0.25 * d2 * d2 * d2  # a little dimmer at the envelope
        value = brightness * texture * rim * _coverage((d - 1.0) * r, h)
        sub_clean[...] = np.where(own, value, np.maximum(sub_clean, value))
    info.update(
        n_objects=m,
        n_touching_placements=n_touching,
        nucleus_radius_um=(3.5, 8.0),
    )


# --- vessels --------------------------------------------------------------


def _vessels(clean, labels, voxel, density, rng, fine, info):
    shape = clean.shape
    upper = (np.asarray(shape) - 1) * voxel
    h = float(voxel.min())
    # Thinner tubes could fall between voxel centres and break the tree apart.
    r_min = max(1.25, 0.51 * _norm(voxel))
    step = 0.8 * h
    vol = _volume_um3(shape, voxel)
    n_trees = max(1, int(round(vol / UM3_PER_VESSEL_TREE)))
    budget = density * vol * VESSEL_UM_PER_UM3 / n_trees
    segments = []  # (points (n,3) um, radii (n,), brightness)

    def inside(p):
        return np.all((p >= 0) & (p <= upper), axis=-1)

    def walk(p0, d0, r0, length):
        n = max(2, int(np.ceil(length / step)) + 1)
        wiggle = np.cumsum(rng.normal(0, 0.06, (n, 3)), axis=0)
        dirs = d0 + wiggle
        dirs /= np.sqrt(np.sum(dirs * dirs, axis=1, keepdims=True))
        pts = p0 + np.concatenate([np.zeros((1, 3)), np.cumsum(dirs[1:] * step, axis=0)])
        out = ~inside(pts)
        if out.any():
            pts = pts[: int(np.argmax(out))]
        radii = np.linspace(r0, max(r_min, 0.9 * r0), len(pts))
        return pts, radii, dirs[len(pts) - 1] if len(pts) else d0

    def turn(d, angle):
        axis = _unit(np.cross(d, rng.standard_normal(3)))
        return _unit(d * math.cos(angle) + np.cross(axis, d) * math.sin(angle))

    for _tree in range(n_trees if density > 0 else 0):
        # Enter through a random face, heading inwards.
        face = int(rng.integers(6))
        axis, side = face // 2, face % 2
        p0 = rng.random(3) * upper
        p0[axis] = upper[axis] if side else 0.0
        d0 = np.zeros(3)
        d0[axis] = -1.0 if side else 1.0
        d0 = turn(d0, rng.uniform(0, 0.5))
        tree_brightness = rng.uniform(0.8, 1.0)
        queue = deque([(p0, d0, rng.uniform(3.5, 5.5))])
        tree = []
        length = 0.0
        for _guard in range(20000):
            if length >= budget:
                break
            if not queue:
                if not tree:
                    break
                # Sprout a new branch from an existing vessel so the tree stays connected.
                pts, rad, _ = tree[int(rng.integers(len(tree)))]
                k = int(rng.integers(len(pts)))
                dk = pts[min(k + 1, len(pts) - 1)] - pts[max(k - 1, 0)]
                dk = _unit(dk)
                queue.append((pts[k], turn(dk, rng.uniform(1.0, 1.5)), max(r_min, 0.6 * rad[k])))
            p, d, r = queue.popleft()
            seg_len = rng.uniform(0.7, 1.3) * (12.0 + 5.0 * r)
            pts, rad, d_end = walk(p, d, r, seg_len)
            if len(pts) < 2:
                continue
            b = tree_brightness * rng.uniform(0.65, 1.0)
            tree.append((pts, rad, b))
            length += (len(pts) - 1) * step
            if len(pts) * step < seg_len - step:
                continue  # left the volume
            # Bifurcate: unequal daughters, roughly Murray's law.
            r_end = rad[-1]
            r1 = max(r_min, r_end * rng.uniform(0.75, 0.9))
            r2 = max(r_min, r_end * rng.uniform(0.55, 0.8))
            a1, a2 = rng.uniform(0.35, 0.8, 2)
            queue.append((pts[-1], turn(d_end, a1), r1))
            queue.append((pts[-1], turn(d_end, a2), r2))
        segments.extend(tree)

    sdf = np.full(shape, np.inf, np.float32)
    bright = np.zeros(shape, np.float32)
    chunk = 16
    for pts, rad, b in segments:
        for s in range(0, len(pts) - 1, chunk):
            p = pts[s : s + chunk + 1].astype(np.float32)
            r = rad[s : s + chunk + 1].astype(np.float32)
            lo, hi = p.min(0), p.max(0)
            box = _bbox((lo + hi) / 2, (hi - lo) / 2 + r.max() + h, voxel, shape)
            if box is None:
                continue
            local = _capsule_sdf(box, voxel, p, r)
            sub_sdf, sub_b = sdf[box], bright[box]
            closer = local < sub_sdf
            sub_sdf[closer] = local[closer]
            sub_b[closer] = b
    fg = sdf <= 0
    labels[fg] = 1
    texture = np.clip(0.85 + 0.15 * fine, 0.5, 1.15)
    finite = np.isfinite(sdf)
    clean[finite] = (bright * texture * _coverage(sdf, h))[finite]
    info.update(
        n_objects=len(segments),
        n_trees=n_trees if density > 0 else 0,
        centreline_um=round(float(sum((len(p) - 1) * step for p, _, _ in segments)), 2),
        vessel_radius_min_um=r_min,
    )


def _capsule_sdf(box, voxel, p, r) -> np.ndarray:
    """Signed distance (um) to a tapered tube through points ``p`` (k,3) with radii ``r``."""
    gz, gy, gx = _grid_um(box, voxel)
    shp = (gz.shape[0], gy.shape[1], gx.shape[2])
    x = np.stack(np.broadcast_arrays(gz, gy, gx), axis=-1).reshape(-1, 1, 3)
    a, ab = p[:-1][None], (p[1:] - p[:-1])[None]
    t = np.clip(np.sum((x - a) * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-9), 0, 1)
    diff = x - (a + t[..., None] * ab)
    dist = np.sqrt(np.sum(diff * diff, axis=-1))
    radius = r[:-1][None] + t * (r[1:] - r[:-1])[None]
    return (dist - radius).min(axis=1).reshape(shp)


# --- plaques --------------------------------------------------------------


def _plaques(clean, labels, voxel, density, rng, fine, info):
    shape = clean.shape
    extent = np.asarray(shape) * voxel
    vol = _volume_um3(shape, voxel)
    h = float(voxel.min())
    n = int(round(density * vol * PLAQUES_PER_UM3))
    centers, radii = np.zeros((n, 3)), np.zeros(n)
    m = 0
    for _ in range(n):
        r0 = float(np.clip(rng.lognormal(math.log(7.0), 0.3), 4.0, 14.0))
        for _attempt in range(50):
            c = rng.random(3) * extent
            gap = 1.3 * (r0 + radii[:m]) + 2.0  # plaques stand apart
            if np.all(_dist2(centers[:m], c) > gap * gap):
                break
        else:
            continue
        box = _bbox(c, np.full(3, 1.35 * r0 + h), voxel, shape)
        if box is None:
            continue
        centers[m], radii[m] = c, r0
        m += 1
        label = m
        gz, gy, gx = _grid_um(box, voxel)
        d = np.sqrt((gz - c[0]) ** 2 + (gy - c[1]) ** 2 + (gx - c[2]) ** 2) / r0
        # Irregular outline: the radius wobbles with a smooth field over the plaque.
        local = np.broadcast_shapes(gz.shape, gy.shape, gx.shape)
        wobble = ndi.gaussian_filter(
            rng.standard_normal(local).astype(np.float32), tuple(0.3 * r0 / voxel), mode="wrap"
        )
        wobble /= max(float(wobble.std()), 1e-6)
        d = (d / (1.0 + 0.15 * np.clip(wobble, -2.5, 2.5))).astype(np.float32)
        core_frac = rng.uniform(0.25, 0.4)
        core_b = rng.uniform(0.7, 1.0)
        halo_b = core_b * rng.uniform(0.2, 0.4)
        core = core_b * _coverage((d - core_frac) * r0, h)
        u = np.clip((d - core_frac) / (1.0 - core_frac), 0.0, None)
        fibrils = np.clip(0.6 + 0.4 * fine[box], 0.1, 1.4)
        halo = halo_b * np.clip(1.0 - 0.7 * u**2, 0, 1) * _coverage((d - 1.0) * r0, h) * fibrils
        value = np.maximum(core, halo)
        sub_clean, sub_lab = clean[box], labels[box]
        np.maximum(sub_clean, value, out=sub_clean)
        sub_lab[(d < 1.0) & (sub_lab == 0)] = label

    # Unlabelled distractors: small faint puncta (e.g. autofluorescent granules).
    n_speckles = int(round(density * vol * SPECKLES_PER_UM3))
    for sigma_um in (0.6, 0.9, 1.3):
        k = n_speckles // 3
        if k == 0:
            continue
        sigma = np.maximum(sigma_um / voxel, 0.5)
        idx = tuple(rng.integers(0, s, k) for s in shape)
        amp = rng.uniform(0.15, 0.5, k).astype(np.float32)
        deltas = np.zeros(shape, np.float32)
        np.add.at(deltas, idx, amp)
        blobs = ndi.gaussian_filter(deltas, sigma, mode="constant")
        probe = np.zeros((15, 15, 15), np.float32)
        probe[7, 7, 7] = 1.0
        peak = float(ndi.gaussian_filter(probe, sigma, mode="constant")[7, 7, 7])
        clean += blobs / peak
    info.update(
        n_objects=m,
        n_speckles=3 * (n_speckles // 3),
        plaque_radius_um=(4.0, 14.0),
    )
