"""Deblurring (no Qt): the foundation backbone plus a restoration head, and Richardson-Lucy.

The network (:class:`DeblurNet`) is a copy of the foundation's backbone whose dense
features, together with the normalised intensity, feed a light conv head predicting a
residual: ``output = clamp(input + residual, 0, 1)``, as the published model does. The
whole network is trained (finetuned end to end):

- :meth:`Deblurrer.fit_synthetic`: on synthetic pairs. Sharp structures (nuclei,
  vessels, plaques at random voxel sizes, with light-sheet shadows and uneven
  illumination) are imaged through Gaussian PSFs with axial sigma 1.5-4x the lateral
  one, at 30-3000 photons, with Poisson and read noise; the target is the same
  acquisition without blur and noise. Loss: L1 + 0.2 (1 - SSIM) + 0.1 edge + 0.1
  high-pass (the published recipe) + 10 MSE (see :class:`DeblurConfig`).
- :meth:`Deblurrer.fit_self`: on the user's own volume, without a sharp ground truth:
  the volume is blurred further with a known PSF and noised to its own noise level, and
  the network learns to undo that step; for anisotropic stacks, lateral lines (sharper)
  are also turned into axial ones to teach axial restoration.

Intensities: the 1st percentile of the volume maps to 0 and ``HEADROOM`` x the 99.99th
(relative to the 1st) to 1. The foundation's own 1st-99th percentile range would clip
the bright structures that deblurring must sharpen (their peaks rise), so deblurring
uses the foundation's normalisation with this wider range. The output is mapped back
to the input's units and dtype (uint16 in, uint16 out, clipped to the dtype's range).

Prediction runs window by window through the shared tiled engine with Gaussian
blending (no seams), reading dask / zarr inputs a block at a time and writing numpy or
zarr outputs, so a volume larger than memory works.

>>> model = Deblurrer.load(DEFAULT_DEBLUR_DIR)        # or deblur(image) for the default
>>> sharp = model.predict(image)                      # same shape and dtype
>>> rl = deblur(image, method="rl", psf_sigma=(3, 1, 1), iterations=10)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

from napari_lsmfm.engine.jobs import Cancelled
from napari_lsmfm.engine.store import (
    check_foundation,
    foundation_record,
    load_task_model,
    save_task_model,
)
from napari_lsmfm.engine.tiled import DeviceMemoryError, predict_tiled

from .heads import DenseHead
from .rl import check_psf, gaussian_psf, psf_sigma_voxels, read_psf, richardson_lucy
from .segment import _triple

__all__ = [
    "DEBLUR_SPEC",
    "DEFAULT_DEBLUR_DIR",
    "DeblurConfig",
    "DeblurNet",
    "Deblurrer",
    "SynthPair",
    "check_deblur_input",
    "deblur",
    "deblur_loss",
    "deblur_range",
    "gaussian_psf",
    "richardson_lucy",
    "ssim3d",
    "synthetic_pair",
    "train_default_deblur",
]

# The backbone a deblur model starts from when no default foundation is installed: small
# for CPU speed; batch norm (running statistics at prediction) makes every window see the
# same network, so tiled and whole-volume results agree (instance norm would renormalise
# each window by its own content).
DEBLUR_SPEC = {
    "architecture": "unet",
    "embed_dim": 16,
    "channels": [32, 64, 128],
    "strides": [2, 2],
    "num_res_units": 2,
    "norm": "BATCH",
}
DEFAULT_DEBLUR_DIR = Path(__file__).resolve().parent.parent / "model" / "default_deblur"
# Synthetic training volumes use seeds from here on; benchmarks use seeds below it.
TRAIN_SEED_BASE = 1_000_000
INTENSITY_PERCENTILES = (1.0, 99.99)
HEADROOM = 2.0
# Above this the float32 arithmetic of the network and of RL loses precision.
MAX_ABS_VALUE = 1e6
_AXES = "zyx"


# ------------------------------------------------------------------------- inputs


def _sample(image: Any) -> np.ndarray:
    """The volume itself when small, else a strided subsample (one read of a lazy volume)."""
    from napari_lsmfm.model.foundation import PERCENTILE_SAMPLES, _subsample

    return np.asarray(_subsample(image, PERCENTILE_SAMPLES))


def check_deblur_input(image: Any, sample: np.ndarray | None = None) -> tuple[int, int, int]:
    """Raise ValueError with what to do unless ``image`` is a deblurrable (Z, Y, X) volume.

    Refused: 2D images, RGB(A) or multichannel arrays, fewer than 2 planes on an axis,
    non-numeric or boolean data, NaN or infinite voxels, values beyond +-1e6 (rescale
    first), and constant images. Lazy (dask / zarr) inputs are checked on a strided
    subsample (``sample``, when already read); a NaN elsewhere is caught window by
    window. Returns the shape.
    """
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) == 2:
        raise ValueError(
            f"the image is 2D {shape}; deblurring needs a 3D stack (Z, Y, X). Open the whole "
            "stack, not a single plane"
        )
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4 * shape[-1]:
        raise ValueError(
            f"the image looks like an RGB(A) picture {shape}, not a 3D stack; deblurring "
            "needs one channel of a (Z, Y, X) volume"
        )
    if len(shape) != 3:
        raise ValueError(
            f"the image has {len(shape)} axes {shape}; deblurring needs one channel of a 3D "
            "stack (Z, Y, X). Pick one channel (and one time point) first, e.g. image[0]"
        )
    if min(shape) < 2:
        raise ValueError(
            f"the image {shape} has an axis with fewer than 2 voxels; deblurring needs a 3D "
            "stack (Z, Y, X)"
        )
    dtype = np.dtype(getattr(image, "dtype", np.float32))
    if dtype.kind == "b" or dtype.kind not in "uif":
        raise ValueError(f"the image must hold intensities (integers or floats), not {dtype}")
    sample = _sample(image) if sample is None else sample
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        kind = "NaN" if np.isnan(sample).any() else "infinite"
        raise ValueError(
            f"the image contains {kind} voxels; replace them (e.g. numpy.nan_to_num) or crop "
            "them out before deblurring"
        )
    lo, hi = float(sample.min()), float(sample.max())
    peak = max(abs(lo), abs(hi))
    if peak > MAX_ABS_VALUE:
        factor = 10 ** math.ceil(math.log10(peak / 65535.0))
        raise ValueError(
            f"the image holds values up to {peak:.3g}; deblurring works in float32 and needs "
            f"values within +-1e6: rescale the image first (e.g. divide it by {factor})"
        )
    if hi <= lo:
        raise ValueError(
            f"the image is constant ({lo:g} everywhere); there is nothing to deblur"
        )
    return shape  # type: ignore[return-value]


def deblur_range(image: Any, sample: np.ndarray | None = None) -> tuple[float, float]:
    """The intensity range (low, high) deblurring maps to [0, 1]: low is the 1st
    percentile, high = low + HEADROOM x (99.99th percentile - low), so sharpened peaks
    are not clipped. Large and lazy volumes are estimated from a subsample (``sample``,
    when already read)."""
    from napari_lsmfm.model import percentile_range

    lo, top = percentile_range(_sample(image) if sample is None else sample,
                               *INTENSITY_PERCENTILES)
    if not top > lo:
        raise ValueError("the image is constant; there is nothing to deblur")
    return float(lo), float(lo + HEADROOM * (top - lo))


def _to_units(values: np.ndarray, lo: float, hi: float, dtype: Any) -> np.ndarray:
    """Normalised [0, 1] values back to the image's units and dtype (ints rounded and
    clipped to the dtype's range)."""
    raw = values * np.float32(hi - lo) + np.float32(lo)
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(raw), info.min, info.max).astype(dtype)
    if dtype.itemsize < 4:
        info = np.finfo(dtype)
        raw = np.clip(raw, info.min, info.max)
    return raw.astype(dtype, copy=False)


def _output_dtype(image: Any) -> np.dtype:
    dtype = np.dtype(image.dtype)
    return dtype if dtype.kind in "uif" else np.dtype(np.float32)


# ------------------------------------------------------------------------- config


@dataclass
class DeblurConfig:
    """Settings of a :class:`Deblurrer`; saved with the model.

    steps / lr / batch_size / patch_size: training; lr None = 2e-3 for synthetic
        training, 2e-4 for finetuning on a volume (fit_self).
    psf_condition: the network also takes the PSF (Gaussian sigmas in voxels) when it is
        known (non-blind deblurring; blind when it is not); psf_dropout: the share of
        training patches that hide it, so the same network works blind.
    hidden: width of the restoration head; unshuffle: block size folded into channels
        (:class:`DeblurNet`; 2 = 8 times fewer voxels through the network, 1 = none).
    tile / overlap: prediction windows (z, y, x) in voxels and their overlap fraction.
    loss weights: l1, l2, psnr (the mean over patches of 10 log10 MSE, i.e. minus each
        patch's PSNR: every patch counts the same whatever its noise level, where plain
        MSE is dominated by the noisiest ones), ssim (1 - SSIM), edge (finite
        differences), highpass. The
        published recipe is l1 1, ssim 0.2, edge 0.1, highpass 0.1 and no l2; the mean
        squared error (what PSNR measures) added with weight 10 gained 0.7 dB PSNR at
        equal training time on the benchmark (L1 alone is dominated by the background).
    lateral_sigma: range of lateral PSF sigmas (voxels) for synthetic training;
        axial_ratio: axial sigma / lateral sigma; photons: range (log-uniform).
    eval_every: steps between best-model checks; device: None = the foundation's.
    seed: random seed of sampling and initialisation; block_bytes: tiled memory budget.
    """

    steps: int = 400
    lr: float | None = None
    batch_size: int = 4
    patch_size: tuple[int, int, int] = (32, 64, 64)
    hidden: int = 32
    unshuffle: int = 2
    psf_condition: bool = False
    psf_dropout: float = 0.25
    tile: tuple[int, int, int] = (64, 192, 192)
    overlap: float = 0.25
    l1: float = 1.0
    l2: float = 10.0
    psnr: float = 0.0
    ssim: float = 0.2
    edge: float = 0.1
    highpass: float = 0.1
    lateral_sigma: tuple[float, float] = (0.5, 1.6)
    axial_ratio: tuple[float, float] = (1.5, 4.0)
    photons: tuple[float, float] = (30.0, 3000.0)
    eval_every: int = 25
    device: str | None = None
    seed: int = 0
    block_bytes: int = 2**30

    def __post_init__(self) -> None:
        self.patch_size = _triple(self.patch_size, "patch_size")
        self.tile = _triple(self.tile, "tile")
        self.lateral_sigma = _pair(self.lateral_sigma, "lateral_sigma")
        self.axial_ratio = _pair(self.axial_ratio, "axial_ratio")
        self.photons = _pair(self.photons, "photons")
        for name in ("steps", "batch_size", "hidden", "eval_every", "unshuffle"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")

    def to_dict(self) -> dict:
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict) -> DeblurConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _pair(value: Any, name: str) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f"{name} must be a range (low, high) of positive numbers, got {value}")
    return value  # type: ignore[return-value]


# ------------------------------------------------------------------ synthetic pairs


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
    illumination and depth fading are applied to the sharp density (they are part of the
    object the microscope images), then the light-sheet forward model blurs it with a
    Gaussian PSF of ``psf_sigma_vox`` (z, y, x) voxels and adds Poisson and read noise.
    """
    from napari_lsmfm.synth import make_structures
    from napari_lsmfm.synth.optics import (
        degrade,
        depth_attenuation,
        illumination_field,
        stripe_field,
    )

    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    clean, _ = make_structures(kind, shape, tuple(float(v) for v in voxel_size), density, rng)
    sharp = clean * illumination_field(shape, illumination, rng)
    sharp *= depth_attenuation(shape, attenuation)
    sharp *= stripe_field(shape, stripes, rng)
    image = degrade(
        sharp, rng, psf_sigma_vox=tuple(float(s) for s in psf_sigma_vox), photons=photons,
        read_noise=read_noise, background=background, stripes=0.0, attenuation=0.0,
        illumination=0.0, offset=offset,
    )
    counts = np.float32(offset + background) + np.float32(photons) * sharp
    params = {
        "kind": kind, "shape": shape, "voxel_size": tuple(float(v) for v in voxel_size),
        "psf_sigma_vox": tuple(float(s) for s in psf_sigma_vox), "photons": float(photons),
        "seed": seed, "density": float(density), "read_noise": float(read_noise),
        "background": float(background), "offset": float(offset), "stripes": float(stripes),
        "attenuation": float(attenuation), "illumination": float(illumination),
    }
    return SynthPair(image=image, sharp=sharp.astype(np.float32), counts=counts, params=params)


def _augment(pairs: list[np.ndarray], rng: np.random.Generator,
             sigma: Sequence[float] | None = None) -> tuple[list[np.ndarray], tuple]:
    """Flips on every axis and 90 degree turns in the YX plane (never mixing z in);
    returns the pairs and the PSF ``sigma`` (z, y, x) as the turn leaves it."""
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


def _crop(volume: np.ndarray, patch: Sequence[int], rng: np.random.Generator
          ) -> tuple[slice, ...]:
    starts = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(volume.shape, patch,
                                                                      strict=True)]
    return tuple(slice(a, a + p) for a, p in zip(starts, patch, strict=True))


class _SyntheticPairs:
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
        from napari_lsmfm.synth import KINDS, make_structures
        from napari_lsmfm.synth.optics import depth_attenuation, illumination_field, stripe_field

        rng = self.rng
        kind = KINDS[int(rng.integers(len(KINDS)))]
        lateral = float(rng.uniform(0.6, 1.2))
        voxel = (float(rng.uniform(1.0, 2.5)) * lateral, lateral, lateral)
        seed = TRAIN_SEED_BASE + self.seed * 100_000 + int(rng.integers(100_000))
        sub = np.random.default_rng(seed)
        clean, _ = make_structures(kind, self.shape, voxel, float(rng.uniform(0.5, 1.6)), sub)
        sharp = clean * illumination_field(self.shape, float(rng.uniform(0, 0.5)), sub)
        sharp *= depth_attenuation(self.shape, float(rng.uniform(0, 0.4)))
        sharp *= stripe_field(self.shape, float(rng.uniform(0, 0.5)), sub)
        return sharp.astype(np.float32)

    def _pair(self, sharp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from napari_lsmfm.synth.optics import degrade

        cfg, rng = self.cfg, self.rng
        lateral = float(rng.uniform(*cfg.lateral_sigma))
        axial = lateral * float(rng.uniform(*cfg.axial_ratio))
        photons = float(math.exp(rng.uniform(*np.log(cfg.photons))))
        background = float(rng.uniform(2.0, 60.0))
        offset = float(rng.uniform(0.0, 300.0))
        image = degrade(
            sharp, rng, psf_sigma_vox=(axial, lateral, lateral), photons=photons,
            read_noise=float(rng.uniform(0.5, 4.0)), background=background, stripes=0.0,
            attenuation=0.0, illumination=0.0, offset=offset,
        ).astype(np.float32)
        target = np.float32(offset + background) + np.float32(photons) * sharp
        lo, hi = deblur_range(image)
        box = _crop(image, cfg.patch_size, rng)
        scale = np.float32(1.0 / (hi - lo))
        x = np.clip((image[box] - lo) * scale, 0, 1)
        y = np.clip((target[box] - lo) * scale, 0, 1)
        return x, y, (axial, lateral, lateral)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.pool[self._next] = self._sharp()
        self._next = (self._next + 1) % len(self.pool)
        xs, ys, sigmas = [], [], []
        for _ in range(n):
            sharp = self.pool[int(self.rng.integers(len(self.pool)))]
            x, y, sigma = self._pair(sharp)
            (x, y), sigma = _augment([x, y], self.rng, sigma)
            xs.append(x)
            ys.append(y)
            sigmas.append(sigma)
        return (torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None]),
                torch.tensor(sigmas, dtype=torch.float32))


class _SelfPairs:
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
        self.gain, self.read_var = _noise_model(image, self.lo)

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

    def _pair(self) -> tuple[np.ndarray, np.ndarray]:
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
        box = _crop(region, [min(p, s) for p, s in zip(self.patch, region.shape, strict=True)],
                    self.rng)
        scale = np.float32(1.0 / (self.hi - self.lo))
        x = np.clip((noisy[box] - self.lo) * scale, 0, 1)
        y = np.clip((region[box] - self.lo) * scale, 0, 1)
        return x, y, sigma

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, sigmas = [], [], []
        for _ in range(n):
            x, y, sigma = self._pair()
            (x, y), sigma = _augment([x, y], self.rng, sigma)
            xs.append(x)
            ys.append(y)
            sigmas.append(sigma)
        shape = [min(s.shape[a] for s in xs) for a in range(3)]  # resampling may trim a voxel
        xs = [s[: shape[0], : shape[1], : shape[2]] for s in xs]
        ys = [s[: shape[0], : shape[1], : shape[2]] for s in ys]
        return (torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None]),
                torch.tensor(sigmas, dtype=torch.float32))


class _Mixed:
    """Batches drawn from two samplers: a ``share`` of them from ``other`` (at least one
    patch each when the batch has room for both)."""

    def __init__(self, main, other, share: float, rng: np.random.Generator) -> None:
        self.main, self.other, self.share, self.rng = main, other, float(share), rng

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _noise_model(image: Any, lo: float) -> tuple[float, float]:
    """Poisson-Gaussian noise of a volume: (gain, read variance) with var = gain x (I - lo)
    + read variance, from differences of neighbouring voxels along x, binned by intensity
    (robust: the median absolute difference per bin)."""
    from napari_lsmfm.model.foundation import _subsample

    sample = np.asarray(_subsample(image, 1 << 21), np.float32)
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


# -------------------------------------------------------------------------- network


def pixel_unshuffle3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, z, y, x) -> (B, C f^3, z/f, y/f, x/f): every f x f x f block becomes channels
    (lossless; the sizes must be multiples of ``factor``)."""
    b, c, z, y, w = x.shape
    f = int(factor)
    x = x.reshape(b, c, z // f, f, y // f, f, w // f, f)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * f**3, z // f, y // f, w // f)


def pixel_shuffle3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`pixel_unshuffle3d`."""
    b, cf, z, y, w = x.shape
    f = int(factor)
    c = cf // f**3
    x = x.reshape(b, c, f, f, f, z, y, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, z * f, y * f, w * f)


def _inflate_input(backbone: nn.Module, channels: int) -> None:
    """Give the backbone's input convolutions (those with one input channel: the first
    convolution and, in residual units, its skip projection) ``channels`` inputs. The
    one-channel weights are repeated and divided by ``channels``, so on a locally constant
    input the inflated backbone computes what the original computes on the block average:
    the pretrained filters are kept, only spread over the sub-voxel channels."""
    found = False
    for sub in list(backbone.modules()):
        for name, conv in list(sub.named_children()):
            if not isinstance(conv, nn.Conv3d) or conv.in_channels != 1:
                continue
            new = nn.Conv3d(channels, conv.out_channels, conv.kernel_size, conv.stride,
                            conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                            device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(conv.weight.repeat(1, channels, 1, 1, 1) / channels)
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            setattr(sub, name, new)
            found = True
    if not found:
        raise ValueError("the backbone has no one-channel 3D convolution to take the "
                         "unshuffled input")


def _widen_input(backbone: nn.Module, old: int, new: int) -> None:
    """Give the input convolutions (``old`` input channels) ``new`` inputs; the added
    channels start with zero weights, so the network computes what it did before."""
    for sub in list(backbone.modules()):
        for name, conv in list(sub.named_children()):
            if not isinstance(conv, nn.Conv3d) or conv.in_channels != old:
                continue
            wide = nn.Conv3d(new, conv.out_channels, conv.kernel_size, conv.stride,
                             conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                             device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                wide.weight.zero_()
                wide.weight[:, :old].copy_(conv.weight)
                if conv.bias is not None:
                    wide.bias.copy_(conv.bias)
            setattr(sub, name, wide)


PSF_CHANNELS = 4  # sigma z / 4, sigma y / 2, sigma x / 2 (voxels), and "the PSF is known"


def psf_code(psf_sigma: Any, batch: int, device: Any = None) -> torch.Tensor:
    """The (B, 4) condition of a PSF-conditioned network: Gaussian sigmas (z, y, x) in
    voxels, scaled to about [0, 1], and a 1 saying they are known; None (or a row of
    zeros) = unknown, and the network deblurs blind."""
    if psf_sigma is None:
        return torch.zeros(batch, PSF_CHANNELS, device=device)
    sig = torch.as_tensor(psf_sigma, dtype=torch.float32, device=device)
    if sig.ndim == 1:
        sig = sig.expand(batch, 3)
    known = (sig.abs().sum(1, keepdim=True) > 0).float()
    scale = torch.tensor([0.25, 0.5, 0.5], device=sig.device)
    return torch.cat([sig * scale, known], 1)


class DeblurNet(nn.Module):
    """Backbone + restoration head: (B, 1, z, y, x) in [0, 1] -> clamp(x + residual, 0, 1).

    The head (two 1x1x1 convs, :class:`~.heads.DenseHead`) reads the dense features and
    the intensity; its last layer starts at zero, so an untrained net is the identity.

    ``unshuffle`` f > 1 runs backbone and head on f x f x f blocks folded into channels
    (:func:`pixel_unshuffle3d`, as in FFDNet): the same information at 1/f^3 of the
    voxels, so the network costs about f^3 times less; the head predicts the f^3 residuals
    of each block, unfolded back to full resolution. The backbone's first convolution is
    inflated to f^3 inputs (:func:`_inflate_input`).
    """

    def __init__(self, foundation: Any, hidden: int = 32, unshuffle: int = 1,
                 psf_condition: bool = False) -> None:
        super().__init__()
        self.foundation = foundation
        self.unshuffle = int(unshuffle)
        self.psf_condition = False
        if self.unshuffle < 1:
            raise ValueError(f"unshuffle must be at least 1, got {unshuffle}")
        sub = self.unshuffle**3
        if sub > 1:
            _inflate_input(foundation.backbone, sub)
        if psf_condition:
            self.enable_psf_condition()
        self.head = DenseHead(foundation.spec.embed_dim + sub, sub, hidden)
        last = self.head.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def enable_psf_condition(self) -> None:
        """Add the PSF inputs (:func:`psf_code`, as constant channels beside the image) to
        the backbone, with zero weights: a trained blind network stays what it was and
        then learns to use the PSF when finetuned."""
        if not self.psf_condition:
            _widen_input(self.foundation.backbone, self.unshuffle**3,
                         self.unshuffle**3 + PSF_CHANNELS)
            self.psf_condition = True

    def forward(self, x: torch.Tensor, psf: torch.Tensor | None = None) -> torch.Tensor:
        """``psf``: (B, 4) from :func:`psf_code` (or None: unknown) for a PSF-conditioned
        network; ignored otherwise."""
        f = self.unshuffle
        if f == 1 and not self.psf_condition:
            residual = self.head(torch.cat([self.foundation(x), x], 1))
            return torch.clamp(x + residual, 0.0, 1.0)
        size = x.shape[2:]
        pad = [(-s) % f for s in size]
        xp = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate") if any(pad) else x
        folded = pixel_unshuffle3d(xp, f) if f > 1 else xp
        inputs = folded
        if self.psf_condition:
            code = psf if psf is not None else psf_code(None, x.shape[0], x.device)
            code = code.to(folded.device, folded.dtype)
            inputs = torch.cat(
                [folded, code[:, :, None, None, None].expand(-1, -1, *folded.shape[2:])], 1)
        features = self.foundation._run(inputs.to(self.foundation.device))
        residual = self.head(torch.cat([features, folded], 1))
        residual = pixel_shuffle3d(residual, f) if f > 1 else residual
        residual = residual[:, :, : size[0], : size[1], : size[2]]
        return torch.clamp(x + residual, 0.0, 1.0)


def _edges(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.diff(dim=d) for d in (2, 3, 4)]


def _highpass(x: torch.Tensor) -> torch.Tensor:
    return x - F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)


def ssim3d(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, win: int = 7,
           sigma: float = 1.5) -> torch.Tensor:
    """Mean 3D SSIM of (B, 1, z, y, x) tensors with a Gaussian window (valid region only).

    The same statistic as MONAI's ``SSIMLoss`` (Gaussian kernel, k1 0.01, k2 0.03), but
    the window is applied separably (3 x ``win`` taps instead of ``win``^3): the
    backward pass through MONAI's full 3D kernel cost twice the network's own.
    """
    r = torch.arange(win, dtype=torch.float32, device=x.device) - (win - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = (g / g.sum()).to(x.dtype)
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)
    for axis in range(3):
        shape = [5, 1, 1, 1, 1]
        shape[2 + axis] = win
        maps = F.conv3d(maps, g.reshape(shape[1:]).expand(shape), groups=5)
    mx, my, xx, yy, xy = maps.unbind(1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim.mean()


class DeblurLoss(nn.Module):
    """w_l1 L1 + w_l2 MSE + w_psnr mean_patches(10 log10 MSE) + w_ssim (1 - SSIM) +
    w_edge |grad difference| + w_hp |high-pass difference|; the published recipe is l1 1,
    ssim 0.2, edge 0.1, highpass 0.1."""

    def __init__(self, l1: float = 1.0, ssim: float = 0.2, edge: float = 0.1,
                 highpass: float = 0.1, l2: float = 0.0, psnr: float = 0.0) -> None:
        super().__init__()
        self.weights = (float(l1), float(ssim), float(edge), float(highpass))
        self.l2 = float(l2)
        self.psnr = float(psnr)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w_l1, w_ssim, w_edge, w_hp = self.weights
        loss = w_l1 * F.l1_loss(pred, target)
        if self.l2:
            loss = loss + self.l2 * F.mse_loss(pred, target)
        if self.psnr:
            mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
            loss = loss + self.psnr * (10.0 * torch.log10(mse + 1e-8)).mean()
        if w_ssim and min(pred.shape[2:]) >= 7:
            loss = loss + w_ssim * (1.0 - ssim3d(pred.float(), target.float()))
        if w_edge:
            loss = loss + w_edge * sum(
                F.l1_loss(a, b) for a, b in zip(_edges(pred), _edges(target), strict=True)
            ) / 3.0
        if w_hp:
            loss = loss + w_hp * F.l1_loss(_highpass(pred), _highpass(target))
        return loss


def deblur_loss(pred: torch.Tensor, target: torch.Tensor, config: DeblurConfig | None = None
                ) -> torch.Tensor:
    """The training loss of (B, 1, z, y, x) tensors in [0, 1] (see :class:`DeblurLoss`)."""
    cfg = config or DeblurConfig()
    return DeblurLoss(cfg.l1, cfg.ssim, cfg.edge, cfg.highpass, cfg.l2, cfg.psnr)(pred, target)


# ------------------------------------------------------------------------ deblurrer


class Deblurrer:
    """A trainable deblur model on a foundation: the unit that is fitted, used and saved.

    >>> model = Deblurrer(foundation)                 # backbone copied, head at identity
    >>> model.fit_synthetic(steps=400)                # synthetic pairs
    >>> model.fit_self(image, psf_sigma_vox=(3, 1, 1), steps=200)   # the user's volume
    >>> sharp = model.predict(image)                  # (Z, Y, X), the image's dtype
    >>> model.save("my_deblur"); Deblurrer.load("my_deblur")
    """

    def __init__(self, foundation: Any, config: DeblurConfig | None = None, **overrides: Any):
        if config is None:
            config = DeblurConfig(**overrides)
        elif overrides:
            config = DeblurConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.origin = foundation_record(foundation)
        torch.manual_seed(config.seed)
        self.net = DeblurNet(_backbone_copy(foundation), config.hidden, config.unshuffle,
                             config.psf_condition)
        device = config.device if config.device else foundation.device
        self.to_device(device)
        self.net.eval()
        self.history: list[float] = []
        self.best_loss: float | None = None
        self.trained_on: list[dict] = []

    @property
    def device(self) -> torch.device:
        return self.net.foundation.device

    @property
    def trained(self) -> bool:
        return bool(self.trained_on)

    def to_device(self, device: str | torch.device = "auto") -> Deblurrer:
        """Move the network to ``device`` (auto / cpu / cuda:N / mps; mixed precision on
        CUDA)."""
        self.net.foundation.to_device(device)
        self.net.to(self.net.foundation.device)
        return self

    # ----------------------------------------------------------------- training

    def fit_synthetic(self, ctx: Any = None, *, steps: int | None = None,
                      lr: float | None = None, seed: int | None = None) -> dict:
        """Train on synthetic pairs (see the module docstring); returns dict(history,
        best_loss, steps_done, stopped, seconds). Cancelling keeps the best weights so far
        (``stopped=True``); before any step it raises ``Cancelled``."""
        cfg = self.config
        seed = cfg.seed if seed is None else int(seed)
        sampler = _SyntheticPairs(cfg, seed)
        # validation pairs from another stream than training
        val = _SyntheticPairs(cfg, seed + 7919, pool=4)
        val_batch = val.sample(max(4, cfg.batch_size))
        out = self._train(sampler, val_batch, steps or cfg.steps, lr or cfg.lr or 2e-3, ctx,
                          "training on synthetic pairs", seed)
        self.trained_on.append({"kind": "synthetic", "steps": out["steps_done"], "seed": seed})
        return out

    def fit_self(self, image: Any, ctx: Any = None, *, psf_sigma_vox: Sequence[float],
                 steps: int | None = None, lr: float | None = None,
                 voxel_size: Sequence[float] | None = None, axial: bool | None = None,
                 synthetic_share: float = 0.5) -> dict:
        """Finetune on the user's own volume, without sharp ground truth.

        Args:
            image: (Z, Y, X) numpy, dask or zarr volume (patches are read as needed).
            psf_sigma_vox: the known (estimated) PSF, Gaussian sigmas (z, y, x) in voxels.
            steps / lr: training steps (default ``config.steps``) and learning rate
                (default 2e-4: a gentle finetune of a trained model).
            voxel_size: (z, y, x) micrometres, for resampling lateral lines to the axial
                spacing; None = isotropic voxels.
            axial: learn axial restoration from lateral planes; None = when the axial
                sigma exceeds 1.2 x the lateral one.
            synthetic_share: fraction of each batch drawn from synthetic pairs with sharp
                ground truth (rehearsal): the volume's own pairs only show blur-twice ->
                blur-once, and alone they teach the network to leave some blur in.

        Returns dict(history, best_loss, steps_done, stopped, seconds).
        """
        sample = _sample(image)
        check_deblur_input(image, sample)
        sigma = psf_sigma_voxels(psf_sigma_vox)
        if axial is None:
            axial = sigma[0] > 1.2 * 0.5 * (sigma[1] + sigma[2])
        cfg = self.config
        irange = deblur_range(image, sample)
        rng = np.random.default_rng(cfg.seed)
        sampler = _SelfPairs(image, irange, sigma, cfg.patch_size, rng, axial=bool(axial),
                             voxel_size=voxel_size)
        if not 0.0 <= synthetic_share < 1.0:
            raise ValueError(f"synthetic_share must be in [0, 1), got {synthetic_share}")
        if synthetic_share > 0:
            sampler = _Mixed(sampler, _SyntheticPairs(cfg, cfg.seed + 104729, pool=4),
                             synthetic_share, rng)
        val_rng = np.random.default_rng(cfg.seed + 7919)
        val = _SelfPairs(image, irange, sigma, cfg.patch_size, val_rng, axial=bool(axial),
                         voxel_size=voxel_size)
        val_batch = val.sample(max(2, cfg.batch_size))
        out = self._train(sampler, val_batch, steps or cfg.steps, lr or cfg.lr or 2e-4, ctx,
                          "finetuning on the volume", cfg.seed)
        self.trained_on.append({"kind": "self", "steps": out["steps_done"],
                                "psf_sigma_vox": list(sigma), "axial": bool(axial),
                                "synthetic_share": float(synthetic_share)})
        return out

    def _train(self, sampler, val_batch, steps: int, lr: float, ctx, message: str,
               seed: int) -> dict:
        t0 = time.perf_counter()
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        cfg = self.config
        net = self.net
        device = self.device
        torch.manual_seed(seed)
        loss_fn = DeblurLoss(cfg.l1, cfg.ssim, cfg.edge, cfg.highpass, cfg.l2, cfg.psnr).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        if steps >= 4:  # warm-up of at least 2 steps (OneCycleLR divides by its length)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=lr, total_steps=steps, pct_start=max(min(0.1, 50 / steps), 2 / steps)
            )
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        fp16 = getattr(net.foundation, "_amp_dtype", None) == torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=bool(fp16 and device.type == "cuda"))
        vx, vy, vs = (t.to(device) for t in val_batch)
        drop = np.random.default_rng(seed + 1)
        vcode = self._code(vs, drop)

        def evaluate() -> float:
            net.eval()
            with torch.no_grad():
                value = float(loss_fn(net(vx, vcode), vy))
            net.train()
            return value

        history: list[float] = []
        best_loss = evaluate()  # the starting weights compete too: training never worsens
        best_state = _state(net)
        start_loss = best_loss
        stopped = False
        every = max(1, int(cfg.eval_every))
        net.train()
        # the next batch is made in a thread while the network trains on this one (numpy's
        # FFTs and torch's kernels both release the GIL)
        prefetch = ThreadPoolExecutor(1, thread_name_prefix="deblur-batches")
        upcoming = prefetch.submit(sampler.sample, cfg.batch_size)
        try:
            for step in range(steps):
                x, y, sig = _next_batch(upcoming, ctx)
                if step + 1 < steps:
                    upcoming = prefetch.submit(sampler.sample, cfg.batch_size)
                x, y = x.to(device), y.to(device)
                try:
                    loss = loss_fn(net(x, self._code(sig.to(device), drop)), y)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                except Exception as exc:
                    from napari_lsmfm.engine.tiled import _free_device_memory, _is_oom

                    if _is_oom(exc):
                        _free_device_memory()
                        raise DeviceMemoryError(
                            f"out of memory training on {cfg.batch_size} patches of "
                            f"{cfg.patch_size} on {device}; use a smaller patch_size or "
                            "batch_size, or the CPU"
                        ) from exc
                    raise
                value = loss.item()
                if not math.isfinite(value):
                    raise ValueError("the training loss became NaN/infinite; lower the "
                                     "learning rate")
                history.append(value)
                if (step + 1) % every == 0 or step + 1 == steps:
                    current = evaluate()
                    if current < best_loss:
                        best_loss, best_state = current, _state(net)
                if ctx is not None:
                    ctx.report((step + 1) / steps, message, step=step + 1, loss=value,
                               best_loss=best_loss)
        except Cancelled:
            if not history:
                net.load_state_dict(best_state)
                net.eval()
                raise
            current = evaluate()
            if current < best_loss:
                best_loss, best_state = current, _state(net)
            stopped = True
        finally:
            # a batch still being made is left to finish on its own: Stop does not wait
            prefetch.shutdown(wait=False, cancel_futures=True)
        net.load_state_dict(best_state)
        net.eval()
        self.history = history
        self.best_loss = best_loss
        return {"history": history, "best_loss": best_loss, "start_loss": start_loss,
                "steps_done": len(history), "stopped": stopped,
                "seconds": time.perf_counter() - t0}

    def _code(self, sigmas: torch.Tensor, rng: np.random.Generator) -> torch.Tensor | None:
        """Training condition: the patches' PSFs, a ``psf_dropout`` share hidden."""
        if not self.net.psf_condition:
            return None
        hide = torch.from_numpy(rng.random(len(sigmas)) < self.config.psf_dropout)
        sigmas = sigmas.clone()
        sigmas[hide.to(sigmas.device)] = 0.0
        return psf_code(sigmas, len(sigmas), sigmas.device)

    # ----------------------------------------------------------------- predict

    def window_fn(self, intensity_range: tuple[float, float],
                  psf_sigma: Sequence[float] | None = None):
        """fn(windows (B, 1, z, y, x) raw float32) -> deblurred (B, 1, z, y, x) in [0, 1].
        ``psf_sigma``: the PSF's Gaussian sigmas (z, y, x) in voxels, for a PSF-conditioned
        model (None: unknown)."""
        lo, hi = intensity_range
        scale = np.float32(1.0 / (hi - lo))
        net, device = self.net, self.device

        def fn(windows: np.ndarray) -> torch.Tensor:
            if not np.isfinite(windows).all():
                raise ValueError(
                    "the image contains NaN or infinite voxels; replace them (e.g. "
                    "numpy.nan_to_num) before deblurring"
                )
            x = torch.from_numpy(np.clip((windows - np.float32(lo)) * scale, 0, 1))
            with torch.inference_mode():
                code = psf_code(psf_sigma, x.shape[0], device) if net.psf_condition else None
                return net(x.to(device), code)

        return fn

    def predict(self, image: Any, ctx: Any = None, *, out: Any = None,
                intensity_range: tuple[float, float] | None = None,
                psf_sigma: Sequence[float] | None = None) -> Any:
        """Deblur a (Z, Y, X) numpy, dask or zarr volume, window by window.

        Returns ``out`` (a numpy or zarr array of the image's shape, filled block by block;
        None allocates numpy of the image's dtype): the deblurred volume in the image's
        units, integers rounded and clipped to the dtype's range. ``intensity_range``
        fixes the normalisation (default :func:`deblur_range` of the image). ``ctx``:
        progress per window; cancel raises ``Cancelled``. ``psf_sigma``: the PSF's
        Gaussian sigmas (z, y, x) in voxels when known; a PSF-conditioned model
        (``config.psf_condition``) then deblurs for that PSF, otherwise blind; a blind model
        ignores it.
        """
        if psf_sigma is not None:
            psf_sigma = tuple(float(v) for v in psf_sigma_voxels(psf_sigma))
        sample = _sample(image)
        check_deblur_input(image, sample)
        irange = tuple(intensity_range) if intensity_range else deblur_range(image, sample)
        if out is None:
            out = np.empty(image.shape, _output_dtype(image))
        if tuple(out.shape) != tuple(image.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(image.shape)}")
        lo, hi = irange
        dtype = out.dtype

        def sink(sl, values):
            out[sl] = _to_units(values[0], lo, hi, dtype)

        self.net.eval()
        cfg = self.config
        _with_memory_fallback(
            lambda tile: predict_tiled(
                self.window_fn(irange, psf_sigma), image, out_channels=1, tile=tile,
                overlap=cfg.overlap,
                blend="gaussian", sink=sink, max_block_bytes=cfg.block_bytes, ctx=ctx,
                message="deblurring", align=cfg.unshuffle,
            ),
            cfg.tile, ctx, self.device,
        )
        return out

    # ------------------------------------------------------------------ save/load

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Save the network and settings (see :mod:`.heads`); returns the folder."""
        config = {
            "config": self.config.to_dict(),
            "head": self.net.head.settings(),
            "foundation": self.origin,
            "normalization": {
                "method": "percentile", "low": INTENSITY_PERCENTILES[0],
                "high": INTENSITY_PERCENTILES[1], "headroom": HEADROOM, "per_volume": True,
                "output": "clamp(x + residual, 0, 1)",
            },
            "trained_on": self.trained_on,
            "best_loss": self.best_loss,
        }
        parts = {"head": self.net.head.state_dict(),
                 "backbone": self.net.foundation.backbone.state_dict()}
        return save_task_model(folder, task="deblur", config=config, parts=parts,
                               overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, foundation: Any = None, *, device: str | None = None
             ) -> Deblurrer:
        """Load a saved deblur model. It carries its whole network (backbone included), so
        no foundation weights are needed; a ``foundation`` given is checked to have the
        same architecture and lends its device. ``device``: where to run (default: the
        foundation's, else auto: CUDA, then MPS, then CPU)."""
        from napari_lsmfm.model import Foundation, FoundationSpec

        config, parts = load_task_model(folder, task="deblur")
        record = config.get("foundation") or {}
        if foundation is not None:
            check_foundation(record, foundation, exact=False)
            device = device or str(foundation.device)
        try:
            spec = FoundationSpec.from_dict(record.get("spec") or {})
        except ValueError as err:
            raise ValueError(f"{folder}: the saved backbone spec is unusable ({err})") from None
        shell = Foundation(spec, build_text=False, source=str(record.get("source")))
        cfg = DeblurConfig.from_dict(config.get("config") or {})
        cfg.device = device or "auto"  # never the device it was trained on
        model = cls(shell, cfg)
        model.origin = dict(record)
        try:
            model.net.foundation.backbone.load_state_dict(parts["backbone"])
            model.net.head.load_state_dict(parts["head"])
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{folder}: the saved weights do not fit this model ({err})"[:300]
                             ) from None
        model.net.eval()
        model.config.device = None
        model.trained_on = list(config.get("trained_on") or [{"kind": "unknown"}])
        model.best_loss = config.get("best_loss")
        return model


def _next_batch(upcoming: Any, ctx: Any) -> Any:
    """The prefetched batch; Stop is checked every 50 ms while it is being made (a new
    synthetic volume can take a second or more)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    while True:
        if ctx is not None:
            ctx.check()
        try:
            return upcoming.result(timeout=0.05)
        except FutureTimeout:
            continue


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _with_memory_fallback(run, tile, ctx, device) -> Any:
    """Run ``run(tile)``; on device out-of-memory halve the largest tile axis (not below 32)."""
    tile = tuple(tile)
    while True:
        try:
            return run(tile)
        except DeviceMemoryError as exc:
            smaller = tuple(max(32, t // 2) if t == max(tile) else t for t in tile)
            if smaller == tile:
                raise DeviceMemoryError(
                    f"{exc}. Even {tile} windows do not fit on {device}: choose the CPU"
                ) from exc
            tile = smaller
            if ctx is not None:
                ctx.report(None, f"out of device memory: retrying with {tile} windows")


def _backbone_copy(foundation: Any) -> Any:
    """A trainable copy of the foundation's backbone (no text tower: deblurring needs none)."""
    from napari_lsmfm.model import Foundation

    copy_ = Foundation(foundation.spec, build_text=False, source=foundation.source)
    copy_.backbone.load_state_dict(foundation.backbone.state_dict())
    return copy_


# --------------------------------------------------------------------- convenience

METHODS = ("model", "rl")
RL_TILE = (96, 256, 256)


def _resolve_psf(psf_sigma, psf_sigma_um, voxel_size, psf) -> np.ndarray:
    given = [v is not None for v in (psf_sigma, psf_sigma_um, psf)]
    if sum(given) != 1:
        raise ValueError(
            "Richardson-Lucy needs exactly one PSF: a Gaussian sigma in voxels (psf_sigma), "
            "in micrometres (psf_sigma_um, with the voxel size) or a PSF (array or TIFF file)"
        )
    if psf is not None:
        if isinstance(psf, str | Path):
            return read_psf(psf)
        return check_psf(psf)
    if psf_sigma is not None:
        return gaussian_psf(psf_sigma_voxels(psf_sigma))
    return gaussian_psf(psf_sigma_voxels(psf_sigma_um, unit="um", voxel_size=voxel_size))


def load_default_deblur(device: str | None = None) -> Deblurrer:
    """The shipped deblur model; ValueError saying how to train one when it is absent."""
    if not (DEFAULT_DEBLUR_DIR / "config.json").is_file():
        raise ValueError(
            "no default deblur model is installed; train one with "
            "`python -m napari_lsmfm.tasks.deblur --train-default "
            f"{DEFAULT_DEBLUR_DIR}` or give a saved deblur model (--weights)"
        )
    return Deblurrer.load(DEFAULT_DEBLUR_DIR, device=device)


def deblur(
    image: Any,
    *,
    method: str = "model",
    model: Deblurrer | str | Path | None = None,
    psf_sigma: float | Sequence[float] | None = None,
    psf_sigma_um: float | Sequence[float] | None = None,
    voxel_size: Sequence[float] | None = None,
    psf: np.ndarray | str | Path | None = None,
    iterations: int | None = None,
    device: str | None = None,
    ctx: Any = None,
    out: Any = None,
) -> Any:
    """Deblur a (Z, Y, X) volume; returns an array of its shape and dtype (or ``out``).

    method "model": the learned deblur model (``model``: a :class:`Deblurrer`, a saved
    model folder, or None for the shipped default). method "rl": Richardson-Lucy with
    the PSF given as ``psf_sigma`` (Gaussian sigmas z, y, x in voxels, or one number),
    ``psf_sigma_um`` (micrometres, with ``voxel_size`` z, y, x in micrometres) or ``psf``
    (an array or a TIFF file); ``iterations`` default 10. Both run window by window with
    Gaussian blending, so dask / zarr volumes larger than memory work with a zarr ``out``.
    The voxel size is not changed (the caller keeps it with the result).
    """
    if method not in METHODS:
        raise ValueError(f"method must be 'model' or 'rl', got {method!r}")
    check_deblur_input(image)
    if method == "model":
        if psf is not None or iterations is not None:
            raise ValueError("a PSF file and iterations belong to Richardson-Lucy "
                             "(method='rl'); the model takes at most the PSF's sigma")
        known = None
        if psf_sigma is not None and psf_sigma_um is not None:
            raise ValueError("give the PSF sigma in voxels or in micrometres, not both")
        if psf_sigma is not None:
            known = psf_sigma_voxels(psf_sigma)
        elif psf_sigma_um is not None:
            known = psf_sigma_voxels(psf_sigma_um, unit="um", voxel_size=voxel_size)
        if model is None:
            model = load_default_deblur(device)
        elif not isinstance(model, Deblurrer):
            model = Deblurrer.load(model, device=device)
        elif device is not None:
            model.to_device(device)
        return model.predict(image, ctx, out=out, psf_sigma=known)
    kernel = _resolve_psf(psf_sigma, psf_sigma_um, voxel_size, psf)
    n_iter = 10 if iterations is None else int(iterations)
    if n_iter < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    return _deblur_rl(image, kernel, n_iter, ctx, out)


def _deblur_rl(image: Any, psf: np.ndarray, iterations: int, ctx: Any, out: Any) -> Any:
    if out is None:
        out = np.empty(image.shape, _output_dtype(image))
    if tuple(out.shape) != tuple(image.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(image.shape)}")
    tile = tuple(min(t, s) for t, s in zip(RL_TILE, image.shape, strict=True))
    # windows overlap by at least twice the PSF's half-width: their edges blend away
    overlap = max(0.25, *(min(0.5, 2 * (p // 2) / t) for p, t in zip(psf.shape, tile,
                                                                     strict=True)))

    def fn(windows: np.ndarray) -> np.ndarray:
        if not np.isfinite(windows).all():
            raise ValueError("the image contains NaN or infinite voxels; replace them first")
        return np.stack([richardson_lucy(w[0], psf, iterations)[None] for w in windows])

    dtype = out.dtype

    def sink(sl, values):
        out[sl] = _to_units(values[0], 0.0, 1.0, dtype)

    predict_tiled(fn, image, out_channels=1, tile=tile, overlap=overlap, blend="gaussian",
                  sink=sink, ctx=ctx, message="Richardson-Lucy")
    return out


# ------------------------------------------------------------------ shipped weights


def train_default_deblur(
    out: str | Path,
    *,
    steps: int = 3000,
    seed: int = 0,
    device: str = "auto",
    foundation: str | None = "auto",
    overwrite: bool = False,
    ctx: Any = None,
    init: str | Path | None = None,
    **overrides: Any,
) -> dict:
    """Train the shipped deblur model on synthetic pairs and save it to ``out``.

    ``init``: a saved deblur model to continue from (its network and settings; the
    ``overrides``, e.g. other loss weights, replace its settings), instead of a new one.

    ``foundation``: "auto" starts from the embedded default foundation when one is
    installed, else from a random-initialised :data:`DEBLUR_SPEC` backbone; "small"
    always uses the latter; or a path to foundation weights. Returns the fit summary
    plus the folder written.
    """
    from napari_lsmfm.model import Foundation, FoundationSpec, load_foundation
    from napari_lsmfm.model.checkpoints import DEFAULT_MODEL_DIR

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if init is not None:
        model = Deblurrer.load(init, device=device)
        model.config = DeblurConfig.from_dict(
            {**model.config.to_dict(), "steps": steps, "seed": seed, **overrides}
        )
        if model.config.psf_condition:
            model.net.enable_psf_condition()
            model.to_device(device)
        fit = model.fit_synthetic(ctx, steps=steps, seed=seed)
        model.save(out, overwrite=overwrite)
        return {"folder": str(out), "init": str(init), "steps_done": fit["steps_done"],
                "best_loss": fit["best_loss"], "seconds": fit["seconds"]}
    if foundation == "auto":
        foundation = "default" if (DEFAULT_MODEL_DIR / "config.json").is_file() else "small"
    if foundation == "small":
        torch.manual_seed(seed)
        fm = Foundation(FoundationSpec.from_dict(DEBLUR_SPEC), source="memory")
        fm.to_device(device)
    elif foundation == "default":
        fm = load_foundation(None, device=device)
    else:
        fm = load_foundation(foundation, device=device)
    model = Deblurrer(fm, DeblurConfig(steps=steps, seed=seed, **overrides))
    fit = model.fit_synthetic(ctx, steps=steps, seed=seed)
    model.save(out, overwrite=overwrite)
    return {"folder": str(out), "foundation": fm.source, "steps_done": fit["steps_done"],
            "best_loss": fit["best_loss"], "seconds": fit["seconds"]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m napari_lsmfm.tasks.deblur --train-default OUT --steps N``."""
    parser = argparse.ArgumentParser(
        prog="python -m napari_lsmfm.tasks.deblur",
        description="Train the shipped deblur model on synthetic pairs.",
    )
    parser.add_argument("--train-default", metavar="OUT", required=True,
                        help=f"folder to write (the shipped one is {DEFAULT_DEBLUR_DIR})")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--foundation", default="auto",
                        help="auto (the default foundation if installed, else small), small, "
                             "or a path to foundation weights")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (2e-3)")
    parser.add_argument("--l2", type=float, default=None,
                        help="weight of the mean-squared-error term of the loss (10)")
    parser.add_argument("--psnr", type=float, default=None,
                        help="weight of the per-patch log-MSE (PSNR) term of the loss (0)")
    parser.add_argument("--psf-condition", action="store_true",
                        help="the network also takes the PSF sigmas when known (non-blind)")
    parser.add_argument("--init", default=None, metavar="MODEL",
                        help="continue from a saved deblur model instead of a new network")
    parser.add_argument("--patch-size", default=None,
                        help="training patch z,y,x in voxels (32,64,64)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from napari_lsmfm.engine.jobs import JobContext, terminal_progress

    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                               ("l2", args.l2), ("psnr", args.psnr)) if v is not None}
    if args.psf_condition:
        extra["psf_condition"] = True
    if args.patch_size:
        extra["patch_size"] = _triple(args.patch_size.split(","), "patch_size")
    try:
        summary = train_default_deblur(
            args.train_default, steps=args.steps, seed=args.seed, device=args.device,
            foundation=args.foundation, overwrite=args.overwrite,
            ctx=JobContext(terminal_progress("deblur ")), init=args.init, **extra,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import json

    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
