"""What each task writes for one block of a large volume, and what an empty block gets.

An adapter wraps a loaded task model (segmentation or deblurring) for block-wise
prediction: :meth:`outputs` names the arrays of a run, :meth:`predict` fills them for one
block from the block and its halo (read into memory: memory is bounded by the block),
:meth:`empty` fills them for a block the foreground test skipped (what the model gives
background: class 0 with probability 1, or the block unchanged for deblurring). Every
block is predicted with the whole volume's intensity range, so blocks agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["BlockAdapter", "adapter_for", "windows_of"]

PROBABILITY_DTYPES = ("uint8", "float16", "float32")
# Each voxel from the window it is most central in: a block of whole window steps with
# its halo is then covered by windows that each run once, with no accumulator (memory),
# and the result does not depend on where the blocks are cut.
BLEND = "crop"


class BlockAdapter:
    """Block-wise use of one task model (base class; see :func:`adapter_for`)."""

    task = ""
    primary = ""  # the output ``--out`` names
    kinds: dict[str, str] = {}

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    def tile(self) -> tuple[int, int, int]:
        return tuple(int(t) for t in self.model.config.tile)  # type: ignore[return-value]

    @property
    def overlap(self) -> float:
        return float(self.model.config.overlap)

    @property
    def align(self) -> int:
        """Window origins fall on multiples of this (deblur networks fold voxel blocks)."""
        return 1

    def intensity_range(self, sample: np.ndarray) -> tuple[float, float]:
        raise NotImplementedError

    def outputs(self, shape: Sequence[int], wanted: Sequence[str],
                image_dtype: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        raise NotImplementedError

    def predict(self, block: np.ndarray, irange: tuple[float, float], core: tuple[slice, ...],
                wanted: Sequence[str], ctx: Any = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def empty(self, block: np.ndarray, core: tuple[slice, ...],
              outputs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class SegmentBlocks(BlockAdapter):
    """Segmentation: "classes" (the class map, background 0), "probabilities" (C, Z, Y, X;
    uint8 where 255 = 1 by default) and "instances" (made later from the class map)."""

    task = "segment"
    primary = "classes"
    kinds = {"classes": "labels", "probabilities": "image", "instances": "labels"}

    def __init__(self, model: Any, prob_dtype: str = "uint8") -> None:
        super().__init__(model)
        if prob_dtype not in PROBABILITY_DTYPES:
            raise ValueError(f"probability dtype must be one of {PROBABILITY_DTYPES}, "
                             f"got {prob_dtype!r}")
        self.prob_dtype = prob_dtype
        # quick mode: the head in every window, only probabilities stitched (full mode
        # predicts probabilities window by window already)
        self.blend = BLEND if model.config.mode == "quick" else None

    def intensity_range(self, sample: np.ndarray) -> tuple[float, float]:
        return self.model.foundation.intensity_range(sample)

    def outputs(self, shape, wanted, image_dtype):
        shape = tuple(int(s) for s in shape)
        found = {"classes": (shape, np.dtype(self.model.class_dtype))}
        if "probabilities" in wanted:
            found["probabilities"] = ((len(self.model.channel_values), *shape),
                                      np.dtype(self.prob_dtype))
        if "instances" in wanted:
            found["instances"] = (shape, np.dtype(np.uint32))
        return found

    def predict(self, block, irange, core, wanted, ctx=None):
        result = self.model.predict(
            block, ctx, probabilities=self.prob_dtype if "probabilities" in wanted else False,
            uncertainty=False, intensity_range=irange, blend=self.blend)
        found = {"classes": np.asarray(result.classes)[core]}
        if "probabilities" in wanted:
            found["probabilities"] = np.asarray(result.probabilities)[(slice(None), *core)]
        return found

    def empty(self, block, core, outputs):
        shape = block[core].shape
        found = {"classes": np.zeros(shape, outputs["classes"][1])}
        if "probabilities" in outputs:
            pshape, dtype = outputs["probabilities"]
            probs = np.zeros((pshape[0], *shape), dtype)
            probs[0] = 255 if dtype == np.uint8 else 1  # background, certain
            found["probabilities"] = probs
        return found


class DeblurBlocks(BlockAdapter):
    """Deblurring: "image", the deblurred volume in the image's units and dtype; an empty
    block (air, no structure above the background) is kept as it is."""

    task = "deblur"
    primary = "image"
    kinds = {"image": "image"}

    @property
    def align(self) -> int:
        return int(self.model.config.unshuffle)

    def intensity_range(self, sample: np.ndarray) -> tuple[float, float]:
        from napari_lsmfm.tasks.deblur.intensity import deblur_range

        return deblur_range(sample, sample)

    def outputs(self, shape, wanted, image_dtype):
        from napari_lsmfm.tasks.deblur.intensity import output_dtype

        return {"image": (tuple(int(s) for s in shape), np.dtype(output_dtype(
            np.empty(0, image_dtype))))}

    def predict(self, block, irange, core, wanted, ctx=None):
        result = self.model.predict(block, ctx, intensity_range=irange, blend=BLEND)
        return {"image": np.asarray(result.data)[core]}

    def empty(self, block, core, outputs):
        return {"image": np.asarray(block[core]).astype(outputs["image"][1], copy=False)}


def adapter_for(model: Any, *, prob_dtype: str = "uint8") -> BlockAdapter:
    """The block adapter of a loaded task model (ValueError for a task without one)."""
    task = getattr(model, "task", None)
    if task == "segment":
        if not model.trained:
            raise ValueError("the segmentation model is not trained yet: train it first")
        return SegmentBlocks(model, prob_dtype)
    if task == "deblur":
        return DeblurBlocks(model)
    raise ValueError(f"lsmfm predict runs segmentation and deblur models; this one is a "
                     f"{task!r} model (classify volumes with `lsmfm classify`)")


def windows_of(tile: Sequence[int], overlap: float, shape: Sequence[int],
               align: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The window step and the halo of block-wise prediction, per axis.

    A block that is a whole number of window steps, read with a halo of half the windows'
    overlap, is covered by exactly ``block / step`` windows whose central parts tile it: no
    window runs twice, whatever the number of blocks (only at the volume's edges does a
    block see fewer). Steps are the tiled engine's (:class:`~napari_lsmfm.engine.grid.
    TileGrid`, windows clipped to the volume, origins on multiples of ``align``).
    """
    from napari_lsmfm.engine.grid import TileGrid

    tile = tuple(min(int(t), int(s)) for t, s in zip(tile, shape, strict=True))
    grid = TileGrid.build([4 * t for t in tile], tile, overlap, align)
    step = tuple(st[1] - st[0] for st in grid.starts)
    halo = tuple((t - s + 1) // 2 for t, s in zip(tile, step, strict=True))
    return step, halo
