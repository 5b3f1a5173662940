"""The classical filter bank (ilastik-like), shared by the quick mode and the baseline.

For a normalised volume: the intensity, then per scale sigma: Gaussian, gradient
magnitude, difference of Gaussians (sigma vs 2 sigma) and the three Hessian
eigenvalues (scale-normalised; they tell blobs from tubes and sheets). Sigmas are in
voxels of the finest axis; ``spacing`` (z, y, x) scales them and the derivatives per
axis, so anisotropic voxels are measured in the same physical units.

Two implementations with the same kernels and borders (replicated): scipy on the CPU
(about ten times faster there than torch's 1D convolutions) and torch elsewhere (GPU).
All derivatives come from one tree of separable passes (z, then y, then x), so the ten
Gaussian derivatives of one scale cost 19 one-dimensional passes instead of 30.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["N_PER_SIGMA", "filter_bank", "filter_bank_numpy", "n_channels"]

N_PER_SIGMA = 6
_MIN_SIGMA = 0.3  # below this, order-0 smoothing is skipped
_MIN_DERIVATIVE_SIGMA = 0.5  # derivatives never look at less than this
# (z, y, x) derivative orders needed per scale: value, gradient, Hessian
_ORDERS = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 2, 0), (0, 0, 2),
           (1, 1, 0), (1, 0, 1), (0, 1, 1)]


def n_channels(sigmas: Sequence[float]) -> int:
    return 1 + N_PER_SIGMA * len(sigmas)


def gaussian_kernel(sigma: float, order: int = 0) -> np.ndarray | None:
    """A 1D convolution kernel: Gaussian (order 0) or its first / second derivative,
    radius int(4 sigma + 0.5) as scipy; None where no filtering is needed."""
    if order == 0 and sigma < _MIN_SIGMA:
        return None
    sigma = max(float(sigma), _MIN_DERIVATIVE_SIGMA if order else _MIN_SIGMA)
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    if order == 1:
        g = -x / sigma**2 * g
    elif order == 2:
        g = (x * x / sigma**4 - 1.0 / sigma**2) * g
    return g


def _rel(spacing: Sequence[float] | None) -> list[float]:
    spacing = [float(s) for s in (spacing or (1.0, 1.0, 1.0))]
    return [s / min(spacing) for s in spacing]


def _derivative_tree(smooth, x, s: Sequence[float]) -> dict:
    """All _ORDERS of x by separable passes; ``smooth(a, axis, sigma, order)``."""
    by_z = {o: smooth(x, 0, s[0], o) for o in (0, 1, 2)}
    by_zy = {(i, j): smooth(by_z[i], 1, s[1], j)
             for i, j in {(o[0], o[1]) for o in _ORDERS}}
    return {o: smooth(by_zy[o[0], o[1]], 2, s[2], o[2]) for o in _ORDERS}


def _assemble(d: dict, g2, sigma: float, rel: Sequence[float], sqrt) -> list:
    grads = [d[1, 0, 0] / rel[0], d[0, 1, 0] / rel[1], d[0, 0, 1] / rel[2]]
    grad = sqrt(grads[0] ** 2 + grads[1] ** 2 + grads[2] ** 2) * sigma
    scale = sigma * sigma
    h = {
        (0, 0): d[2, 0, 0] * (scale / rel[0] ** 2),
        (1, 1): d[0, 2, 0] * (scale / rel[1] ** 2),
        (2, 2): d[0, 0, 2] * (scale / rel[2] ** 2),
        (0, 1): d[1, 1, 0] * (scale / (rel[0] * rel[1])),
        (0, 2): d[1, 0, 1] * (scale / (rel[0] * rel[2])),
        (1, 2): d[0, 1, 1] * (scale / (rel[1] * rel[2])),
    }
    lo, hi = sym3_eig_extremes(h)
    mid = h[0, 0] + h[1, 1] + h[2, 2] - lo - hi
    return [d[0, 0, 0], grad, d[0, 0, 0] - g2, lo, mid, hi]


def sym3_eig_extremes(h: dict):
    """Smallest and largest eigenvalue of symmetric 3x3 fields given as the six
    components h[i, j] (i <= j); closed form, elementwise (numpy or torch)."""
    a11, a22, a33 = h[0, 0], h[1, 1], h[2, 2]
    a12, a13, a23 = h[0, 1], h[0, 2], h[1, 2]
    q = (a11 + a22 + a33) / 3.0
    p1 = a12 * a12 + a13 * a13 + a23 * a23
    b11, b22, b33 = a11 - q, a22 - q, a33 - q
    p2 = (b11 * b11 + b22 * b22 + b33 * b33 + 2.0 * p1) / 6.0
    if isinstance(p2, torch.Tensor):
        p = torch.sqrt(p2).clamp_min(1e-12)
    else:
        p = np.maximum(np.sqrt(p2), 1e-12)
    det = (b11 * (b22 * b33 - a23 * a23) - a12 * (a12 * b33 - a23 * a13)
           + a13 * (a12 * a23 - b22 * a13))
    r = det / (2.0 * p**3)
    if isinstance(r, torch.Tensor):
        phi = torch.acos(r.clamp(-1.0, 1.0)) / 3.0
        cos = torch.cos
    else:
        phi = np.arccos(np.clip(r, -1.0, 1.0)) / 3.0
        cos = np.cos
    return q + 2.0 * p * cos(phi + 2.0 * math.pi / 3.0), q + 2.0 * p * cos(phi)


def filter_bank_numpy(x: np.ndarray, sigmas: Sequence[float],
                      spacing: Sequence[float] | None = None) -> np.ndarray:
    """The bank of a normalised (Z, Y, X) float32 volume with scipy: (C, Z, Y, X) float32."""
    from scipy import ndimage as ndi

    x = np.asarray(x, np.float32)

    def smooth(a, axis, sigma, order):
        k = gaussian_kernel(sigma, order)
        if k is None:
            return a
        return ndi.correlate1d(a, k[::-1].astype(np.float32), axis=axis, mode="nearest")

    rel = _rel(spacing)
    out = [x]
    for sigma in sigmas:
        s = [sigma / r for r in rel]
        d = _derivative_tree(smooth, x, s)
        g2 = x
        for axis in range(3):
            g2 = smooth(g2, axis, 2 * s[axis], 0)
        out += _assemble(d, g2, sigma, rel, np.sqrt)
    return np.stack(out).astype(np.float32, copy=False)


def filter_bank(x: torch.Tensor, sigmas: Sequence[float],
                spacing: Sequence[float] | None = None, backend: str = "auto") -> torch.Tensor:
    """The bank of normalised windows (B, 1, z, y, x): (B, C, z, y, x), same device.

    ``backend`` "auto": scipy on the CPU, torch convolutions elsewhere; "scipy" or
    "torch" force one. Both give the same values (to float rounding)."""
    if backend not in ("auto", "scipy", "torch"):
        raise ValueError(f"backend must be 'auto', 'scipy' or 'torch', got {backend!r}")
    if backend == "scipy" or (backend == "auto" and x.device.type == "cpu"):
        out = [torch.from_numpy(filter_bank_numpy(v[0].cpu().numpy(), sigmas, spacing))
               for v in x.detach()]
        return torch.stack(out).to(x.device, x.dtype)

    def smooth(a, axis, sigma, order):
        k = gaussian_kernel(sigma, order)
        if k is None:
            return a
        kt = torch.as_tensor(k[::-1].copy(), dtype=a.dtype, device=a.device)
        r = (len(k) - 1) // 2
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        return F.conv3d(F.pad(a, pad, mode="replicate"), kt.reshape(shape))

    rel = _rel(spacing)
    out = [x]
    for sigma in sigmas:
        s = [sigma / r for r in rel]
        d = _derivative_tree(smooth, x, s)
        g2 = x
        for axis in range(3):
            g2 = smooth(g2, axis, 2 * s[axis], 0)
        out += _assemble(d, g2, sigma, rel, torch.sqrt)
    return torch.cat(out, 1)
