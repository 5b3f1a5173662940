"""Training pairs of deblurring: (blurred, sharp) patches in normalised units.

- :func:`synthetic_pair`: one synthetic volume and its sharp ground truth (benchmarks,
  tests). :class:`SyntheticPairs`: training batches of such pairs, a fresh PSF, photon
  level and noise per patch.
- :class:`SelfPairs`: self-supervised patches from the user's own volume (no ground
  truth): the volume blurred further with a known PSF and noised to its own noise level
  (:func:`noise_model`) is the input, the volume the target.
- :class:`RealPairs`: the same optics over real sharp stacks instead of synthetic ones.
- :class:`MixedPairs`: batches drawn from two samplers.

Structures and optics come from :mod:`napari_lsmfm.synth`; every sampler has its own
``numpy`` generator, so the patches are the same whichever thread makes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from napari_lsmfm.model.foundation import normalize_window, strided_sample

from .config import DeblurConfig
from .intensity import deblur_range

__all__ = [
    "TRAIN_SEED_BASE",
    "MixedPairs",
    "RealPairs",
    "SelfPairs",
    "SynthPair",
    "SyntheticPairs",
    "augment",
    "crop_box",
    "noise_model",
    "sharp_unit",
    "synthetic_batches",
    "synthetic_pair",
    "volume_batches",
]

# Synthetic training volumes use seeds from here on; benchmarks use seeds below it.
TRAIN_SEED_BASE = 1_000_000
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x, y (B, 1, z, y, x); sigmas (B, 3)


@dataclass
class SynthPair:
    """A synthetic deblurring pair.

    image: (Z, Y, X) uint16 camera counts, blurred and noisy.
    sharp: (Z, Y, X) float32 in [0, 1], the emitting fluorophore density the PSF blurred
        (structures times illumination, shadows and depth fading): the ground truth.
    counts: ``offset + background + photons * sharp``, the same acquisition without blur
        and noise, float32 (the network's training target).
    params: every parameter used.
    """

    image: np.ndarray
    sharp: np.ndarray
    counts: np.ndarray
    params: dict


def synthetic_pair(
    kind: str,
    shape: Sequence[int] = (48, 96, 96),
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    psf_sigma_vox: Sequence[float] = (3.0, 1.0, 1.0),
    photons: float = 1000.0,
    seed: int = 0,
    density: float = 1.0,
    read_noise: float = 2.0,
    background: float = 20.0,
    offset: float = 100.0,
    stripes: float = 0.3,
    attenuation: float = 0.3,
    illumination: float = 0.4,
) -> SynthPair:
    """A blurred, noisy light-sheet volume and its sharp ground truth; deterministic per seed.

    The structures come from :func:`napari_lsmfm.synth.make_structures`; shadows, uneven
    illumination and depth fading are applied to the sharp density
    (:func:`napari_lsmfm.synth.excite`: they are part of the object the microscope
    images), then the light-sheet forward model (:func:`napari_lsmfm.synth.degrade`,
    its own artefacts off) blurs it with a Gaussian PSF of ``psf_sigma_vox`` (z, y, x)
    voxels and adds Poisson and read noise.
    """
    from napari_lsmfm.synth import excite, make_structures

    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    clean, _ = make_structures(kind, shape, tuple(float(v) for v in voxel_size), density, rng)
    sharp = excite(clean, rng, stripes=stripes, attenuation=attenuation,
                   illumination=illumination)
    image = _camera(sharp, rng, tuple(float(s) for s in psf_sigma_vox), photons=photons,
                    read_noise=read_noise, background=background, offset=offset)
    counts = np.float32(offset + background) + np.float32(photons) * sharp
    params = {
        "kind": kind, "shape": shape, "voxel_size": tuple(float(v) for v in voxel_size),
        "psf_sigma_vox": tuple(float(s) for s in psf_sigma_vox), "photons": float(photons),
        "seed": seed, "density": float(density), "read_noise": float(read_noise),
        "background": float(background), "offset": float(offset), "stripes": float(stripes),
        "attenuation": float(attenuation), "illumination": float(illumination),
    }
    return SynthPair(image=image, sharp=sharp.astype(np.float32), counts=counts, params=params)


def _camera(sharp: np.ndarray, rng: np.random.Generator, psf_sigma_vox: Sequence[float], *,
            photons: float, read_noise: float, background: float, offset: float) -> np.ndarray:
    """``sharp`` (already excited) through the PSF and the camera: uint16 counts."""
    from napari_lsmfm.synth import degrade

    # the artefacts are in ``sharp`` already; degrade's (flat) illumination field still
    # draws its offset from ``rng``, which keeps the pairs of earlier versions
    return degrade(sharp, rng, psf_sigma_vox=psf_sigma_vox, photons=photons,
                   read_noise=read_noise, background=background, stripes=0.0,
                   attenuation=0.0, illumination=0.0, offset=offset)


def augment(pairs: list[np.ndarray], rng: np.random.Generator,
            sigma: Sequence[float] | None = None) -> tuple[list[np.ndarray], tuple]:
    """Flips on every axis and 90 degree turns in the YX plane (never mixing z in);
    returns the pairs (float32, contiguous) and the PSF ``sigma`` (z, y, x) as the turn
    leaves it."""
    for axis in range(3):
        if rng.random() < 0.5:
            pairs = [np.flip(p, axis) for p in pairs]
    sigma = tuple(float(v) for v in sigma) if sigma is not None else (0.0, 0.0, 0.0)
    if pairs[0].shape[1] == pairs[0].shape[2]:
        k = int(rng.integers(4))
        pairs = [np.rot90(p, k, axes=(1, 2)) for p in pairs]
        if k % 2:
            sigma = (sigma[0], sigma[2], sigma[1])
    return [np.ascontiguousarray(p, np.float32) for p in pairs], sigma


def crop_box(volume: np.ndarray, patch: Sequence[int], rng: np.random.Generator
             ) -> tuple[slice, ...]:
    """A random box of ``patch`` voxels (z, y, x) inside ``volume`` (clipped to it)."""
    starts = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(volume.shape, patch,
                                                                      strict=True)]
    return tuple(slice(a, a + p) for a, p in zip(starts, patch, strict=True))


def _batch(xs: list[np.ndarray], ys: list[np.ndarray], sigmas: list[tuple]) -> Batch:
    return (torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None]),
            torch.tensor(sigmas, dtype=torch.float32))


class SyntheticPairs:
    """Training batches of synthetic (blurred, sharp) patches in normalised units.

    A pool of sharp volumes (random kind, voxel size, density, light-sheet artefacts) is
    refreshed one volume per batch; every patch gets its own PSF, photon level, noise,
    background and camera offset, and is normalised with its whole volume's range.
    """

    VOLUME = (40, 96, 96)

    def __init__(self, config: DeblurConfig, seed: int, pool: int = 8) -> None:
        self.cfg = config
        self.rng = np.random.default_rng(seed)
        self.seed = int(seed)
        self.shape = tuple(max(v, p) for v, p in zip(self.VOLUME, config.patch_size, strict=True))
        self.pool = [self._sharp() for _ in range(pool)]
        self._next = 0

    def _sharp(self) -> np.ndarray:
        from napari_lsmfm.synth import KINDS, excite, make_structures

        rng = self.rng
        kind = KINDS[int(rng.integers(len(KINDS)))]
        lateral = float(rng.uniform(0.6, 1.2))
        voxel = (float(rng.uniform(1.0, 2.5)) * lateral, lateral, lateral)
        seed = TRAIN_SEED_BASE + self.seed * 100_000 + int(rng.integers(100_000))
        sub = np.random.default_rng(seed)
        clean, _ = make_structures(kind, self.shape, voxel, float(rng.uniform(0.5, 1.6)), sub)
        # drawn in this order: illumination, attenuation, stripes
        sharp = excite(clean, sub, illumination=float(rng.uniform(0, 0.5)),
                       attenuation=float(rng.uniform(0, 0.4)),
                       stripes=float(rng.uniform(0, 0.5)))
        return sharp.astype(np.float32)

    def _pair(self, sharp: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
        cfg, rng = self.cfg, self.rng
        lateral = float(rng.uniform(*cfg.lateral_sigma))
        axial = lateral * float(rng.uniform(*cfg.axial_ratio))
        photons = float(math.exp(rng.uniform(*np.log(cfg.photons))))
        background = float(rng.uniform(2.0, 60.0))
        offset = float(rng.uniform(0.0, 300.0))
        image = _camera(sharp, rng, (axial, lateral, lateral), photons=photons,
                        read_noise=float(rng.uniform(0.5, 4.0)), background=background,
                        offset=offset).astype(np.float32)
        target = np.float32(offset + background) + np.float32(photons) * sharp
        irange = deblur_range(image)
        box = crop_box(image, cfg.patch_size, rng)
        x = normalize_window(image[box], irange, "deblurring")
        y = normalize_window(target[box], irange, "deblurring")
        return x, y, (axial, lateral, lateral)

    def sample(self, n: int) -> Batch:
        """``n`` pairs: x, y (n, 1, z, y, x) float32 in [0, 1] and the PSFs (n, 3)."""
        self.pool[self._next] = self._sharp()
        self._next = (self._next + 1) % len(self.pool)
        xs, ys, sigmas = [], [], []
        for _ in range(n):
            sharp = self.pool[int(self.rng.integers(len(self.pool)))]
            x, y, sigma = self._pair(sharp)
            (x, y), sigma = augment([x, y], self.rng, sigma)
            xs.append(x)
            ys.append(y)
            sigmas.append(sigma)
        return _batch(xs, ys, sigmas)


def sharp_unit(volume: np.ndarray) -> np.ndarray:
    """A real sharp volume as a density in [0, 1]: its 0.1st-99.9th percentiles mapped to
    0 and 1, clipped (float32). What :class:`RealPairs` trains towards and the benchmark
    scores against."""
    v = np.asarray(volume, np.float32)
    lo, hi = np.percentile(v, (0.1, 99.9))
    return np.clip((v - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


class RealPairs(SyntheticPairs):
    """Synthetic pairs whose sharp volumes are real stacks (the user's or the benchmark's
    real volumes, read once): each refresh takes a random crop of one, its 0.1st-99.9th
    percentiles mapped to [0, 1] (a crop smaller than the pool's volume is mirrored to
    size), and every patch goes through the same optics and camera draws as
    :class:`SyntheticPairs` (PSF, photons, noise, background, offset)."""

    def __init__(self, config: DeblurConfig, seed: int, volumes: Sequence[np.ndarray],
                 pool: int = 8) -> None:
        if not volumes:
            raise ValueError("real sharp volumes: give at least one (Z, Y, X) volume")
        self.volumes = []
        for v in volumes:
            v = np.asarray(v, np.float32)
            if v.ndim != 3:
                raise ValueError(f"a sharp volume must be 3D (Z, Y, X), got shape {v.shape}")
            self.volumes.append(sharp_unit(v))
        super().__init__(config, seed, pool)

    def _sharp(self) -> np.ndarray:
        rng = self.rng
        v = self.volumes[int(rng.integers(len(self.volumes)))]
        pads = [(0, max(0, s - n)) for s, n in zip(self.shape, v.shape, strict=True)]
        if any(b for _, b in pads):
            v = np.pad(v, pads, mode="symmetric")
        box = tuple(slice(a, a + s) for a, s in
                    ((int(rng.integers(0, n - s + 1)), s) for n, s in zip(v.shape, self.shape,
                                                                         strict=True)))
        return np.ascontiguousarray(v[box])


class SelfPairs:
    """Self-supervised patches from the user's own volume (no sharp ground truth).

    Input = the volume blurred further with the known PSF plus noise at the volume's own
    noise level (estimated as variance = gain x signal + read variance); target = the
    volume. For anisotropic PSFs, a share of patches turns a lateral axis into the
    axial one (resampled to the axial voxel spacing when the voxel size is known) and
    blurs it to the axial PSF: the sharper lateral planes teach axial restoration.
    """

    def __init__(self, image: Any, irange: tuple[float, float], psf_sigma_vox: Sequence[float],
                 patch: Sequence[int], rng: np.random.Generator, *, axial: bool,
                 voxel_size: Sequence[float] | None) -> None:
        self.image = image
        self.lo, self.hi = irange
        self.sigma = tuple(float(s) for s in psf_sigma_vox)
        self.patch = tuple(min(p, s) for p, s in zip(patch, image.shape, strict=True))
        self.rng = rng
        self.axial = axial
        self.voxel = tuple(float(v) for v in voxel_size) if voxel_size else (1.0, 1.0, 1.0)
        self.margin = [int(math.ceil(3 * s)) for s in self.sigma]
        self.gain, self.read_var = noise_model(image, self.lo)

    def _read(self, box: Sequence[tuple[int, int]]) -> np.ndarray:
        region = self.image[tuple(slice(a, b) for a, b in box)]
        region = region.compute() if hasattr(region, "compute") else region
        return np.asarray(region, np.float32)

    def _region(self, size: Sequence[int]) -> np.ndarray:
        shape = self.image.shape
        size = [min(s, n) for s, n in zip(size, shape, strict=True)]
        box = []
        for s, n in zip(size, shape, strict=True):
            a = int(self.rng.integers(0, n - s + 1))
            box.append((a, a + s))
        return self._read(box)

    def _noise(self, blurred: np.ndarray) -> np.ndarray:
        var = self.gain * np.maximum(blurred - self.lo, 0) + self.read_var
        return self.rng.normal(0.0, 1.0, blurred.shape).astype(np.float32) * np.sqrt(var)

    def _pair(self) -> tuple[np.ndarray, np.ndarray, tuple]:
        sz, sy, sx = self.sigma
        lateral = 0.5 * (sy + sx)
        if self.axial and self.rng.random() < 0.5:
            # a lateral axis plays z: sample it at the axial spacing, blur it axially
            a = 1 + int(self.rng.integers(2))
            ratio = max(1.0, self.voxel[0] / self.voxel[a])
            want = list(self.patch)
            want[0], want[a] = self.patch[a], int(math.ceil(self.patch[0] * ratio))
            region = np.swapaxes(self._region(want), 0, a)
            if ratio > 1.0:
                region = ndi.zoom(region, (1.0 / ratio, 1.0, 1.0), order=1, mode="nearest")
            extra = math.sqrt(max(sz**2 - (lateral / ratio) ** 2, 0.09))
            sigma = (extra, 0.0, 0.0)
        else:
            region = self._region([p + 2 * m for p, m in zip(self.patch, self.margin,
                                                             strict=True)])
            sigma = self.sigma
        blurred = ndi.gaussian_filter(region, sigma, mode="reflect")
        noisy = blurred + self._noise(blurred)
        box = crop_box(region, [min(p, s) for p, s in zip(self.patch, region.shape,
                                                          strict=True)], self.rng)
        x = normalize_window(noisy[box], (self.lo, self.hi), "deblurring")
        y = normalize_window(region[box], (self.lo, self.hi), "deblurring")
        return x, y, sigma

    def sample(self, n: int) -> Batch:
        """``n`` pairs: x, y (n, 1, z, y, x) float32 in [0, 1] and the PSFs (n, 3)."""
        xs, ys, sigmas = [], [], []
        for _ in range(n):
            x, y, sigma = self._pair()
            (x, y), sigma = augment([x, y], self.rng, sigma)
            xs.append(x)
            ys.append(y)
            sigmas.append(sigma)
        shape = [min(s.shape[a] for s in xs) for a in range(3)]  # resampling may trim a voxel
        xs = [s[: shape[0], : shape[1], : shape[2]] for s in xs]
        ys = [s[: shape[0], : shape[1], : shape[2]] for s in ys]
        return _batch(xs, ys, sigmas)


class MixedPairs:
    """Batches drawn from two samplers: a ``share`` of them from ``other`` (at least one
    patch each when the batch has room for both)."""

    def __init__(self, main: Any, other: Any, share: float, rng: np.random.Generator) -> None:
        self.main, self.other, self.share, self.rng = main, other, float(share), rng

    def sample(self, n: int) -> Batch:
        k = int(self.rng.binomial(n, self.share)) if n > 1 else 0
        k = min(max(k, 1), n - 1) if n > 1 else 0
        xa, ya, sa = self.main.sample(n - k)
        if k == 0:
            return xa, ya, sa
        xb, yb, sb = self.other.sample(k)
        shape = [min(a, b) for a, b in zip(xa.shape[2:], xb.shape[2:], strict=True)]
        crop = (slice(None), slice(None), *(slice(0, s) for s in shape))
        return (torch.cat([xa[crop], xb[crop]]), torch.cat([ya[crop], yb[crop]]),
                torch.cat([sa, sb]))


def noise_model(image: Any, lo: float) -> tuple[float, float]:
    """Poisson-Gaussian noise of a volume: (gain, read variance) with var = gain x (I - lo)
    + read variance, from differences of neighbouring voxels along x, binned by intensity
    (robust: the median absolute difference per bin)."""
    sample = np.asarray(strided_sample(image, 1 << 21), np.float32)
    if sample.shape[-1] < 2:
        return 0.0, 1.0
    diff = (sample[..., 1:] - sample[..., :-1]) / np.float32(math.sqrt(2.0))
    level = 0.5 * (sample[..., 1:] + sample[..., :-1]) - np.float32(lo)
    level, diff = level.ravel(), diff.ravel()
    edges = np.unique(np.quantile(level, np.linspace(0.0, 0.99, 12)))
    xs, vs = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        sel = (level >= a) & (level < b)
        if sel.sum() > 100:
            mad = float(np.median(np.abs(diff[sel] - np.median(diff[sel]))))
            xs.append(float(np.median(level[sel])))
            vs.append((1.4826 * mad) ** 2)
    if len(xs) < 2:
        return 0.0, max(float(np.var(diff)), 1e-12)
    gain, read = np.polyfit(np.asarray(xs), np.asarray(vs), 1)
    return max(float(gain), 0.0), max(float(read), 1e-12)


def synthetic_batches(config: DeblurConfig, seed: int, sharp: Sequence[np.ndarray] = (),
                      sharp_share: float = 0.5) -> tuple[Any, Batch]:
    """The sampler of synthetic training and its validation batch (another stream); with
    real ``sharp`` volumes, a ``sharp_share`` of every batch (and of the validation
    batch) comes from them (:class:`RealPairs`)."""
    sampler: Any = SyntheticPairs(config, seed)
    val: Any = SyntheticPairs(config, seed + 7919, pool=4)
    if len(sharp):
        if not 0.0 < sharp_share <= 1.0:
            raise ValueError(f"sharp_share must be in (0, 1], got {sharp_share}")
        rng = np.random.default_rng(seed + 15485863)
        real = RealPairs(config, seed + 31, sharp)
        sampler = real if sharp_share >= 1.0 else MixedPairs(sampler, real, sharp_share, rng)
        val_real = RealPairs(config, seed + 7927, sharp, pool=4)
        val = val_real if sharp_share >= 1.0 else MixedPairs(val, val_real, sharp_share,
                                                             np.random.default_rng(seed + 1))
    return sampler, val.sample(max(4, config.batch_size))


def volume_batches(image: Any, irange: tuple[float, float], sigma: Sequence[float],
                   config: DeblurConfig, seed: int, *, axial: bool,
                   voxel_size: Sequence[float] | None, synthetic_share: float
                   ) -> tuple[Any, Batch]:
    """The sampler of finetuning on ``image`` (its own pairs, plus a ``synthetic_share``
    of synthetic ones) and its validation batch (the volume's own pairs only)."""
    if not 0.0 <= synthetic_share < 1.0:
        raise ValueError(f"synthetic_share must be in [0, 1), got {synthetic_share}")
    rng = np.random.default_rng(seed)
    sampler: Any = SelfPairs(image, irange, sigma, config.patch_size, rng, axial=axial,
                             voxel_size=voxel_size)
    if synthetic_share > 0:
        sampler = MixedPairs(sampler, SyntheticPairs(config, seed + 104729, pool=4),
                             synthetic_share, rng)
    val = SelfPairs(image, irange, sigma, config.patch_size, np.random.default_rng(
        seed + 7919), axial=axial, voxel_size=voxel_size)
    return sampler, val.sample(max(2, config.batch_size))
