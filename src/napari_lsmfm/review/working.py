"""The reviewed labels' working copy and the checks of a review's inputs.

A numpy prediction is copied in memory; a lazy (dask / zarr) one into a zarr store
beside the state file (``<state>.labels.zarr``), else in a temporary folder, filled
block by block while the object table is read, so the caller's array is never written.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .objects import Box, ReviewError

__all__ = ["Placed", "WorkingLabels", "check_inputs", "working_dtype"]


def _shape(array: Any, name: str) -> tuple[int, ...]:
    if not (hasattr(array, "shape") and hasattr(array, "dtype")):
        raise ReviewError(f"the {name} must be an array (numpy, dask or zarr), got "
                          f"{type(array).__name__}")
    return tuple(int(s) for s in array.shape)


def check_inputs(labels, image, classes, probabilities, channel_values, uncertainty,
                 voxel_size, block) -> tuple[tuple[int, int, int], tuple, tuple]:
    """ReviewError unless the review's inputs fit together; returns (shape, voxel_size,
    block). Negative labels are found while the table is read (every block is read once)."""
    shape = _shape(labels, "labels")
    if len(shape) != 3:
        raise ReviewError(f"the labels must be one (Z, Y, X) volume, got shape {shape}; "
                          "choose a 3D instance labels layer")
    kind = np.dtype(labels.dtype).kind
    if kind == "f":
        raise ReviewError(
            f"the labels are {labels.dtype} numbers, not object ids: instance labels are "
            "integers (0 = background, 1, 2, ... = objects). Choose the '<image> instances' "
            "labels layer, not an image or a probability map")
    if kind not in "uib":
        raise ReviewError(f"the labels must be integers, got {labels.dtype}")
    if image is not None and _shape(image, "image") != shape:
        raise ReviewError(
            f"the prediction has shape {shape} but the image {_shape(image, 'image')}: they "
            "do not belong together. Choose the prediction made for this image")
    for name, extra in (("classes", classes), ("uncertainty", uncertainty)):
        if extra is not None and _shape(extra, name) != shape:
            raise ReviewError(f"the {name} map has shape {_shape(extra, name)} but the labels "
                              f"{shape}; choose the {name} of this prediction")
    if probabilities is not None:
        pshape = _shape(probabilities, "probabilities")
        if len(pshape) != 4 or pshape[1:] != shape:
            raise ReviewError(f"the probabilities have shape {pshape}; expected (C, *{shape}) "
                              "from the same prediction")
        if len(tuple(channel_values)) != pshape[0]:
            raise ReviewError(f"{pshape[0]} probability channels but channel_values "
                              f"{tuple(channel_values)}; give one class value per channel")
    voxel = tuple(float(v) for v in voxel_size)
    if len(voxel) != 3 or not all(np.isfinite(voxel)) or min(voxel) <= 0:
        raise ReviewError(f"voxel_size must be three positive numbers (z, y, x) in "
                          f"micrometres, got {tuple(voxel_size)}")
    block = tuple(int(b) for b in block)
    if len(block) != 3 or min(block) < 1:
        raise ReviewError(f"block must be three positive voxel counts, got {block}")
    return shape, voxel, block  # type: ignore[return-value]


def working_dtype(dtype: Any) -> np.dtype:
    """The working copy's dtype: the input's when it is 32 or 64 bits, else uint32 (room
    for the new ids of splits and clicks)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.kind in "ui" and dtype.itemsize >= 4 else np.dtype(np.uint32)


class Placed:
    """A numpy ``data`` standing at ``box`` of a volume: indexed with the volume's
    coordinates (only inside ``box``)."""

    def __init__(self, data: np.ndarray, box: Box) -> None:
        self.data, self.box = data, box
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, sub: Box) -> np.ndarray:
        return self.data[tuple(slice(s.start - b.start, s.stop - b.start)
                               for s, b in zip(sub, self.box, strict=True))]


class WorkingLabels:
    """The working copy of ``labels``: :attr:`array` (numpy, or zarr for lazy input at
    ``near`` or in a temporary folder), filled by :meth:`fill` block by block."""

    def __init__(self, labels: Any, block: Sequence[int], near: Path | None) -> None:
        shape = tuple(int(s) for s in labels.shape)
        dtype = working_dtype(labels.dtype)
        self._cleanup = None
        self._made: Path | None = None
        if isinstance(labels, np.ndarray):
            self.array: Any = np.empty(shape, dtype)
            return
        import zarr

        if near is None:
            folder = Path(tempfile.mkdtemp(prefix="lsmfm-review-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, folder, True)
            near = folder / "labels.zarr"
        else:
            self._made = near
        chunks = tuple(min(int(b), n) for b, n in zip(block, shape, strict=True))
        self.array = zarr.open_array(str(near), mode="w", shape=shape, chunks=chunks,
                                     dtype=dtype, fill_value=0, zarr_format=2)

    def fill(self, box: Box, block: np.ndarray) -> None:
        self.array[box] = block

    def write(self, box: Box, data: np.ndarray) -> None:
        self.array[box] = data

    def close(self) -> None:
        """Remove a temporary copy (one beside the state file stays, for display)."""
        if self._cleanup is not None:
            self._cleanup()

    def abort(self) -> None:
        """Remove the copy made (the review could not start)."""
        self.close()
        if self._made is not None:
            shutil.rmtree(self._made, ignore_errors=True)
