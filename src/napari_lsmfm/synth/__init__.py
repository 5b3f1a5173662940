"""Synthetic light-sheet volumes with ground truth.

``make_volume("nuclei")`` renders sharp structures (``structures``), images them
through a light-sheet forward model (``optics``) and returns a ``SynthVolume``.
``samples`` writes and reads the small volumes shipped in ``sample_data/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .optics import blur, degrade, excite, gaussian_psf_sigma_vox
from .samples import load_sample, write_samples
from .structures import KINDS, make_structures

__all__ = [
    "KINDS",
    "SynthVolume",
    "blur",
    "degrade",
    "excite",
    "gaussian_psf_sigma_vox",
    "load_sample",
    "make_structures",
    "make_volume",
    "write_samples",
]

_LABEL_KIND = {"nuclei": "instance", "vessels": "semantic", "plaques": "instance"}


@dataclass
class SynthVolume:
    """A synthetic light-sheet volume and its ground truth.

    image: (Z, Y, X) uint16, the degraded light-sheet image (camera counts).
    labels: (Z, Y, X) uint16; instance ids for nuclei and plaques, 0/1 for vessels.
    clean: (Z, Y, X) float32 in [0, 1], the sharp fluorophore density before optics
        and noise (ground truth for deblurring).
    voxel_size: (z, y, x) in micrometres.
    kind: "nuclei", "vessels" or "plaques".
    label_kind: "instance" or "semantic".
    params: every parameter used, plus object counts, for the record.
    """

    image: np.ndarray
    labels: np.ndarray
    clean: np.ndarray
    voxel_size: tuple[float, float, float]
    kind: str
    label_kind: str
    params: dict = field(default_factory=dict)


def make_volume(
    kind: str,
    shape: Sequence[int] = (48, 128, 128),
    voxel_size: Sequence[float] = (2.0, 1.0, 1.0),
    density: float = 1.0,
    seed: int = 0,
    *,
    psf_sigma_um: Sequence[float] = (3.0, 1.0, 1.0),
    photons: float = 1000.0,
    read_noise: float = 2.0,
    background: float = 20.0,
    offset: float = 100.0,
    stripes: float = 0.3,
    attenuation: float = 0.3,
    illumination: float = 0.4,
) -> SynthVolume:
    """Make a synthetic light-sheet volume with ground truth; deterministic per seed.

    Args:
        kind: "nuclei", "vessels" or "plaques".
        shape: (Z, Y, X) in voxels.
        voxel_size: (z, y, x) in micrometres.
        density: multiplies the number of objects (or the vessel length); 1 is typical.
        seed: seed of ``np.random.default_rng``; the same arguments give the same volume.
        psf_sigma_um: Gaussian PSF sigmas (z, y, x) in micrometres; axial > lateral.
        photons: expected photons at density 1 under full illumination.
        read_noise: camera read noise (standard deviation, counts).
        background: background photons per voxel.
        offset: camera baseline (counts).
        stripes: depth of a typical light-sheet shadow stripe, in [0, 1).
        attenuation: fraction of signal lost from the top to the bottom plane, in [0, 1).
        illumination: unevenness of the excitation (darkest corner 1 - illumination).

    Returns:
        A ``SynthVolume``; ``image`` is uint16, ``labels`` uint16, ``clean`` float32.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    shape = tuple(int(s) for s in shape)
    voxel_size = tuple(float(v) for v in voxel_size)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be (Z, Y, X) with at least 4 voxels per axis, got {shape}")
    if len(voxel_size) != 3 or min(voxel_size) <= 0:
        raise ValueError(
            f"voxel_size must be three positive micrometres (z, y, x), got {voxel_size}"
        )
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    rng = np.random.default_rng(seed)
    info: dict = {}
    clean, labels = make_structures(kind, shape, voxel_size, density, rng, info=info)
    sigma_vox = gaussian_psf_sigma_vox(psf_sigma_um, voxel_size)
    image = degrade(
        clean,
        rng,
        psf_sigma_vox=sigma_vox,
        photons=photons,
        read_noise=read_noise,
        background=background,
        stripes=stripes,
        attenuation=attenuation,
        illumination=illumination,
        offset=offset,
    )
    params = {
        "kind": kind,
        "shape": shape,
        "voxel_size": voxel_size,
        "density": float(density),
        "seed": seed,
        "psf_sigma_um": tuple(float(s) for s in psf_sigma_um),
        "psf_sigma_vox": sigma_vox,
        "photons": float(photons),
        "read_noise": float(read_noise),
        "background": float(background),
        "offset": float(offset),
        "stripes": float(stripes),
        "attenuation": float(attenuation),
        "illumination": float(illumination),
        **info,
    }
    return SynthVolume(
        image=image,
        labels=labels,
        clean=clean,
        voxel_size=voxel_size,
        kind=kind,
        label_kind=_LABEL_KIND[kind],
        params=params,
    )
