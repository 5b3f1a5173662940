"""Masks for masked image modelling: cubes on a grid, drawn uniformly or where the signal is.

A mask is a bool tensor (B, C, D, H, W), True where the student sees nothing. Each
volume of the batch gets one cube size (8 or 16 voxels), and a fraction ``ratio`` of
the grid's cubes is masked. ``mode="intensity"`` draws cubes with a probability that
grows with their mean intensity (masks go where the structures are, as in the
two-photon masked-image-modelling paper); ``channel_separated=True`` draws a different
mask per channel of a multichannel volume, so one channel must be inferred from the
others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .config import MASKING_MODES


def mask_ratio_at(step: int, warmup_steps: int, warmup_ratio: float, ratio: float) -> float:
    """The fraction of cubes to mask at ``step``: ``warmup_ratio`` during the warm-up, then
    ``ratio`` (the published recipe: 5 % then 30 %)."""
    return float(warmup_ratio if step < warmup_steps else ratio)


def cube_mask(
    image: torch.Tensor,
    ratio: float,
    cube_sizes: Sequence[int] = (8, 16),
    *,
    mode: str = "cube",
    channel_separated: bool = False,
    generator: torch.Generator | None = None,
    background: float = 0.05,
) -> torch.Tensor:
    """Draw a cube mask for a batch.

    Args:
        image: (B, C, D, H, W) float, intensities scaled to about [0, 1]; only its shape is
            used for ``mode="cube"``.
        ratio: fraction of the cubes to mask, in [0, 1] (rounded; at least one cube when > 0).
        cube_sizes: edge lengths in voxels; each volume draws one of them.
        mode: "cube" (uniform over cubes) or "intensity" (probability proportional to the
            cube's mean intensity plus ``background`` times the brightest cube's mean, so
            empty regions still get some masks).
        channel_separated: one independent mask per channel; otherwise all channels share it.
        generator: a CPU ``torch.Generator`` for reproducible masks.
        background: floor of the intensity weights, relative to the brightest cube.

    Returns:
        (B, C, D, H, W) bool on ``image.device``, True where masked. Cubes lie on a grid
        starting at voxel 0 of each axis; a cube cut by the border is masked as far as it
        reaches.
    """
    if image.ndim != 5:
        raise ValueError(f"image must be (B, C, D, H, W), got shape {tuple(image.shape)}")
    if mode not in MASKING_MODES:
        raise ValueError(f"unknown masking mode {mode!r}: choose one of {', '.join(MASKING_MODES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if not cube_sizes or min(int(c) for c in cube_sizes) < 1:
        raise ValueError(f"cube sizes must be positive voxel counts, got {cube_sizes}")
    b, c, *spatial = image.shape
    masks = []
    for i in range(b):
        pick = int(torch.randint(len(cube_sizes), (1,), generator=generator))
        size = int(cube_sizes[pick])
        masks.append(
            _one_mask(image[i], size, ratio, mode, channel_separated, generator, background)
        )
    return torch.stack(masks).to(image.device)


def _one_mask(
    image: torch.Tensor,
    size: int,
    ratio: float,
    mode: str,
    channel_separated: bool,
    generator: torch.Generator | None,
    background: float,
) -> torch.Tensor:
    """(C, D, H, W) bool on the CPU for one volume and one cube size."""
    c, *spatial = image.shape
    grid = [-(-s // size) for s in spatial]  # ceil: a partial cube at the far border
    n_cubes = grid[0] * grid[1] * grid[2]
    k = int(round(ratio * n_cubes))
    if ratio > 0:
        k = max(k, 1)  # a small patch with a low warm-up ratio still masks one cube
    n_masks = c if channel_separated else 1
    if mode == "intensity":
        with torch.no_grad():
            means = F.avg_pool3d(
                image.detach().float()[None], size, stride=size, ceil_mode=True
            )[0]  # (C, gd, gh, gw)
            if not channel_separated:
                means = means.mean(0, keepdim=True)
            weights = means.reshape(n_masks, n_cubes).clamp_min(0).cpu()
        floor = background * weights.amax(dim=1, keepdim=True).clamp_min(1e-6)
        weights = weights + floor
    else:
        weights = torch.ones(n_masks, n_cubes)
    flat = torch.zeros(n_masks, n_cubes, dtype=torch.bool)
    if k > 0:
        # Sampling without replacement: uniform weights give a uniform draw of k cubes.
        chosen = torch.multinomial(weights, k, replacement=False, generator=generator)
        flat.scatter_(1, chosen, True)
    small = flat.reshape(n_masks, *grid)
    full = small.repeat_interleave(size, 1).repeat_interleave(size, 2).repeat_interleave(size, 3)
    full = full[:, : spatial[0], : spatial[1], : spatial[2]]
    return full.expand(c, *spatial) if n_masks == 1 else full


def apply_mask(image: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """The student's input: ``image`` with masked voxels set to ``fill``; shapes as
    :func:`cube_mask`."""
    return image.masked_fill(mask, fill)
