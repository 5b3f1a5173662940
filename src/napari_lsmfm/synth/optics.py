"""Light-sheet forward model: illumination, shadows, PSF blur and camera noise.

The sheet is taken to enter from the x = 0 side and travel along +x, the detection
objective looks along z. Hence: shadows (stripes) run along x, the excitation fades
along x and away from the sheet's centre in y, emission fades with depth z, and the
PSF is widest along z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi


def gaussian_psf_sigma_vox(
    psf_sigma_um: Sequence[float], voxel_size: Sequence[float]
) -> tuple[float, float, float]:
    """Convert Gaussian PSF sigmas (z, y, x) from micrometres to voxels."""
    if len(psf_sigma_um) != 3 or len(voxel_size) != 3:
        raise ValueError("psf_sigma_um and voxel_size need three values each, in (z, y, x) order")
    if any(v <= 0 for v in voxel_size):
        raise ValueError(f"voxel sizes must be positive micrometres, got {tuple(voxel_size)}")
    return tuple(float(s) / float(v) for s, v in zip(psf_sigma_um, voxel_size, strict=True))


def blur(clean: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """Convolve a (Z, Y, X) volume with an anisotropic Gaussian PSF; returns float32."""
    return ndi.gaussian_filter(
        np.asarray(clean, np.float32), sigma=tuple(sigma_vox), mode="reflect"
    )


def illumination_field(
    shape: Sequence[int], strength: float, rng: np.random.Generator
) -> np.ndarray:
    """Uneven excitation, (1, Y, X) float32 in [1 - strength, 1].

    The sheet is brightest near a (random) centre line in y and fades along its
    propagation axis x, like a Gaussian beam scattered on its way through tissue.
    """
    _, ny, nx = shape
    yc = rng.uniform(-0.3, 0.3)
    # math.exp on 1D profiles: the same bits on every CPU (see structures._norm).
    across = np.array([math.exp(-(((v - yc) / 1.1) ** 2)) for v in np.linspace(-1, 1, ny)])
    along = np.array([math.exp(-0.8 * v) for v in np.linspace(0, 1, nx)])
    profile = across[:, None] * along[None, :]
    profile = (profile - profile.min()) / max(float(np.ptp(profile)), 1e-6)
    return (1.0 - strength * (1.0 - profile))[None].astype(np.float32)


def depth_attenuation(shape: Sequence[int], attenuation: float) -> np.ndarray:
    """Exponential fade with depth, (Z, 1, 1) float32: 1 at z = 0, 1 - attenuation at the end."""
    nz = shape[0]
    fade = [math.pow(1.0 - attenuation, z / max(nz - 1, 1)) for z in range(nz)]
    return np.array(fade, np.float32)[:, None, None]


def stripe_field(shape: Sequence[int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Light-sheet shadows, (Z, Y, X) float32 transmission in (0, 1].

    Small absorbers scattered through the sample each shade everything downstream of
    them along x; a typical single shadow dims the signal by ``strength``.
    """
    nz, ny, nx = shape
    if strength <= 0:
        return np.ones(shape, np.float32)
    n = max(1, int(round(0.05 * nz * ny)))
    # Most absorbers sit early on the path (or before the volume), giving long stripes.
    x0 = np.minimum((rng.random(n) ** 2 * nx).astype(int), nx - 1)
    idx = (rng.integers(0, nz, n), rng.integers(0, ny, n), x0)
    absorb = np.zeros(shape, np.float32)
    np.add.at(absorb, idx, rng.exponential(1.0, n).astype(np.float32))
    np.cumsum(absorb, axis=2, out=absorb)
    sigma = (1.0, 1.2, 0.0)  # sheet thickness (z) and shadow width (y), voxels
    absorb = ndi.gaussian_filter(absorb, sigma, mode="nearest")
    probe = np.zeros((9, 9, 1), np.float32)
    probe[4, 4, 0] = 1.0
    unit_peak = float(ndi.gaussian_filter(probe, sigma, mode="constant")[4, 4, 0])
    # Transmission 1 / (1 + k A): Beer-Lambert-like, but free of SIMD exp so it is
    # bit-reproducible; one typical absorber dims its stripe to 1 - strength.
    k = np.float32(strength / (1.0 - strength) / unit_peak)
    return (1.0 / (1.0 + k * absorb)).astype(np.float32)


def _check_artefacts(stripes: float, attenuation: float, illumination: float) -> None:
    for name, value in (
        ("stripes", stripes),
        ("attenuation", attenuation),
        ("illumination", illumination),
    ):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def excite(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    stripes: float,
    attenuation: float,
    illumination: float,
) -> np.ndarray:
    """The fluorophore density as the light sheet excites it: ``clean`` times the uneven
    illumination, the fade with depth and the shadow stripes (the first step of
    :func:`degrade`; the emitting density a deblurred image should show).

    Args:
        clean: (Z, Y, X) float in [0, 1], the fluorophore density.
        rng: source of the illumination offset and the shadows (drawn in that order).
        stripes / attenuation / illumination: as in :func:`degrade`, each in [0, 1).

    Returns:
        (Z, Y, X) float32, in [0, 1].
    """
    clean = np.asarray(clean, np.float32)
    _check_artefacts(stripes, attenuation, illumination)
    excited = clean * illumination_field(clean.shape, illumination, rng)
    excited *= depth_attenuation(clean.shape, attenuation)
    excited *= stripe_field(clean.shape, stripes, rng)
    return excited


def degrade(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    psf_sigma_vox: Sequence[float],
    photons: float,
    read_noise: float,
    background: float,
    stripes: float,
    attenuation: float,
    illumination: float,
    offset: float = 100.0,
) -> np.ndarray:
    """Image a sharp fluorophore density through a light-sheet microscope.

    Args:
        clean: (Z, Y, X) float in [0, 1], the fluorophore density.
        rng: source of the illumination offset, shadows and noise.
        psf_sigma_vox: Gaussian PSF sigmas (z, y, x) in voxels.
        photons: expected photons at density 1 under full illumination.
        read_noise: camera read noise, standard deviation in counts.
        background: expected background photons per voxel (out-of-focus, ambient).
        stripes: depth of a typical shadow stripe, 0 (none) to <1.
        attenuation: fraction of signal lost from the first to the last z plane.
        illumination: darkest corner of the excitation field is 1 - illumination.
        offset: camera baseline in counts.

    Returns:
        (Z, Y, X) uint16 camera counts.
    """
    clean = np.asarray(clean, np.float32)
    if clean.ndim != 3:
        raise ValueError(f"degrade needs a (Z, Y, X) volume, got shape {clean.shape}")
    _check_artefacts(stripes, attenuation, illumination)
    if photons <= 0 or read_noise < 0 or background < 0:
        raise ValueError("photons must be > 0; read_noise and background >= 0")
    excited = excite(clean, rng, stripes=stripes, attenuation=attenuation,
                     illumination=illumination)
    signal = blur(excited, psf_sigma_vox)
    expected = np.float32(background) + np.float32(photons) * np.clip(signal, 0, None)
    counts = rng.poisson(expected).astype(np.float32)
    counts += rng.normal(0.0, read_noise, clean.shape).astype(np.float32)
    counts += np.float32(offset)
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)
