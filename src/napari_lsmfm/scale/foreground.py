"""A cheap foreground test per block, so blocks of empty tissue or air skip the network.

A whole-volume overview (a strided sample of about a million voxels, or the smallest
level of an input pyramid with at least as many) gives the background level and an
Otsu threshold between background and structure. A block is *empty* when even its
brightest spot, averaged over 4 x 4 x 4 voxels (which evens out shot noise but keeps a
nucleus), stays below the midpoint between the two: nothing there is brighter than the
background by half of what separates structure from background. The test looks at the
block itself, not its halo: structure in the halo alone belongs to the neighbouring
block, which is predicted; an object reaching a single voxel into the block lifts its
4-cube mean by a quarter of the object's contrast, above the threshold. The test reads the
block once (it is read for prediction anyway) and costs a few milliseconds against
seconds of network time. ``threshold=None`` turns it off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["POOL", "Foreground", "block_peak", "overview"]

OVERVIEW_VOXELS = 2**20
POOL = 4


def overview(image: Any, levels: Sequence[Any] | None = None,
             max_voxels: int = OVERVIEW_VOXELS) -> np.ndarray:
    """About ``max_voxels`` of ``image`` spread over the whole volume (float32): the
    smallest pyramid level in ``levels`` holding at least that many, else a strided
    sample of ``image``."""
    from napari_lsmfm.model.foundation import strided_sample

    source = image
    for level in levels or ():
        if math.prod(level.shape) >= max_voxels and math.prod(level.shape) < math.prod(
                source.shape):
            source = level
    sample = strided_sample(source, max_voxels)
    compute = getattr(sample, "compute", None)
    return np.asarray(compute() if compute is not None else sample, np.float32)


def block_peak(block: np.ndarray, pool: int = POOL) -> float:
    """The brightest ``pool``-cube mean of ``block`` (a smaller block: its plain mean)."""
    block = np.asarray(block, np.float32)
    shape = [max(1, s // pool) for s in block.shape]
    if min(s // pool for s in block.shape) < 1:
        return float(block.mean())
    cut = block[tuple(slice(0, s * pool) for s in shape)]
    means = cut.reshape(shape[0], pool, shape[1], pool, shape[2], pool).mean(axis=(1, 3, 5))
    return float(means.max())


@dataclass(frozen=True)
class Foreground:
    """The threshold a block's :func:`block_peak` must reach to be predicted."""

    background: float
    otsu: float
    threshold: float

    @classmethod
    def from_overview(cls, sample: np.ndarray) -> Foreground | None:
        """The test for a volume from its :func:`overview`; None when the volume is flat
        (nothing can be told apart: every block is predicted)."""
        from skimage.filters import threshold_otsu

        values = np.asarray(sample, np.float32).ravel()
        if values.size == 0 or float(values.max()) <= float(values.min()):
            return None
        otsu = float(threshold_otsu(values))
        below = values[values <= otsu]
        background = float(np.median(below)) if below.size else float(values.min())
        return cls(background, otsu, background + 0.5 * (otsu - background))

    @classmethod
    def fixed(cls, threshold: float) -> Foreground:
        """A threshold the user gives, in the image's units."""
        return cls(float("nan"), float("nan"), float(threshold))

    def is_empty(self, block: np.ndarray) -> bool:
        return block_peak(block) < self.threshold

    def to_dict(self) -> dict[str, float]:
        return {"background": self.background, "otsu": self.otsu, "threshold": self.threshold}
