"""The window grid of the tiled engine, Gaussian blending weights, and the shared
parsers of (z, y, x) sizes and regions."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MIN_TILE", "TileGrid", "as_triple", "check_tile", "gaussian_weights", "region_box"]

# The smallest window a task accepts per axis: smaller ones multiply the windows (1,1,1 on
# 32 x 64 x 64 voxels is 131,072 of them) and each sees too little of the structure.
MIN_TILE = 8


# --------------------------------------------------------------------------- grid


def _axis_starts(size: int, tile: int, step: int) -> list[int]:
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return sorted(set(starts))


def _axis_cores(starts: Sequence[int], tile: int, size: int) -> list[int]:
    """Boundaries of the cores: window k owns [b[k], b[k+1]), half-way through overlaps."""
    bounds = [0]
    for prev, cur in itertools.pairwise(starts):
        bounds.append((cur + prev + tile) // 2)
    bounds.append(size)
    return bounds


@dataclass(frozen=True)
class TileGrid:
    """The global window grid over a volume of ``shape`` (Z, Y, X).

    ``tile`` is clipped to the volume, so every window has the same shape ``tile``;
    ``starts[a]`` are the window origins along axis a; ``cores[a]`` the boundaries of
    the voxels each window owns in ``blend="crop"``.
    """

    shape: tuple[int, int, int]
    tile: tuple[int, int, int]
    starts: tuple[tuple[int, ...], ...]
    cores: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, shape: Sequence[int], tile: Sequence[int], overlap: float,
              align: int = 1) -> TileGrid:
        """``align``: window origins fall on multiples of it (the steps are rounded down
        to it), except the last window of an axis, which ends at the volume's end."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"expected a (Z, Y, X) volume, got shape {shape}")
        tile = as_triple(tile, "tile")
        if min(tile) < 1:
            raise ValueError(f"tile must be positive voxels (z, y, x), got {tile}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        tile = tuple(min(t, s) for t, s in zip(tile, shape, strict=True))
        align = max(1, int(align))
        steps = [int(round(t * (1.0 - float(overlap)))) for t in tile]
        steps = [max(align, st // align * align) if t >= align else max(1, st)
                 for st, t in zip(steps, tile, strict=True)]
        starts = tuple(
            tuple(_axis_starts(s, t, st)) for s, t, st in zip(shape, tile, steps, strict=True)
        )
        cores = tuple(
            tuple(_axis_cores(st, t, s)) for st, t, s in zip(starts, tile, shape, strict=True)
        )
        return cls(shape, tile, starts, cores)  # type: ignore[arg-type]

    @property
    def n_windows(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def touching(self, lo: Sequence[int], hi: Sequence[int], crop: bool) -> list[tuple[int, ...]]:
        """Window origins whose extent (or core, with ``crop``) meets the box [lo, hi)."""
        per_axis = []
        for a in range(3):
            idx = []
            for k, s in enumerate(self.starts[a]):
                a0, a1 = (self.cores[a][k], self.cores[a][k + 1]) if crop else (s, s + self.tile[a])
                if a0 < hi[a] and a1 > lo[a]:
                    idx.append(s)
            per_axis.append(idx)
        return list(itertools.product(*per_axis))

    def core_of(self, origin: Sequence[int]) -> tuple[slice, ...]:
        out = []
        for a in range(3):
            k = self.starts[a].index(origin[a])
            out.append(slice(self.cores[a][k], self.cores[a][k + 1]))
        return tuple(out)


def gaussian_weights(tile: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights of one window, float32 (z, y, x), 1 in the centre.

    A separable Gaussian with sigma = ``sigma_scale`` x tile per axis (MONAI's
    importance map), floored at 1e-4 so that a voxel seen by one window only keeps it.
    """
    w = np.ones((1, 1, 1), np.float32)
    for a, n in enumerate(tile):
        centre = (n - 1) / 2.0
        sigma = max(float(sigma_scale) * n, 1e-6)
        prof = np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2).astype(np.float32)
        shape = [1, 1, 1]
        shape[a] = n
        w = w * prof.reshape(shape)
    w /= w.max()
    return np.maximum(w, 1e-4).astype(np.float32)




def as_triple(value: Any, name: str, *, kind: type = int, positive: bool = False) -> tuple:
    """Three numbers (z, y, x) from one number or three (``kind`` int or float);
    ``positive``: each must be above 0. The one parser of sizes, tiles and voxel sizes."""
    if isinstance(value, int | float | np.integer | np.floating):
        value = (value,) * 3
    try:
        value = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (z, y, x), got {value!r}") from None
    if len(value) != 3 or (positive and min(value) <= 0):
        what = "positive sizes" if positive else "sizes"
        raise ValueError(f"{name} must be three {what} (z, y, x), got {value}")
    return value


def check_tile(tile: Any, name: str = "tile", default: Sequence[int] | None = None) -> tuple:
    """``tile`` as three ints (z, y, x), each at least :data:`MIN_TILE` voxels; ValueError
    saying what to use otherwise (``default``: the task's default window, for the message)."""
    tile = as_triple(tile, name, positive=True)
    if min(tile) < MIN_TILE:
        hint = f" (default {','.join(map(str, default))})" if default is not None else ""
        raise ValueError(
            f"{name} {','.join(map(str, tile))} is too small: windows need at least "
            f"{MIN_TILE} voxels per axis{hint}; a window larger than the volume is clipped "
            "to it, so a thin volume needs no small window"
        )
    return tile


def region_box(region: Any, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lo, hi) corners of ``region`` (three slices or (start, stop) pairs; None = all of
    ``shape``); ValueError when it is empty, strided or outside the volume."""
    if region is None:
        return (0, 0, 0), tuple(int(s) for s in shape)
    if len(region) != 3:
        raise ValueError(f"region must be three slices (z, y, x), got {region!r}")
    lo, hi = [], []
    for r, n in zip(region, shape, strict=True):
        if isinstance(r, slice):
            if r.step not in (None, 1):
                raise ValueError("region slices must have step 1")
            start = 0 if r.start is None else int(r.start)
            stop = int(n) if r.stop is None else int(r.stop)
        else:
            start, stop = (int(v) for v in r)
        if not 0 <= start < stop <= n:
            raise ValueError(f"region {region!r} is empty or outside the volume of shape {shape}")
        lo.append(start)
        hi.append(stop)
    return tuple(lo), tuple(hi)


