"""The one input checker: is this a volume a task can run on? Says what to do when not."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MAX_ABS_VALUE", "check_volume", "looks_like_rgb"]

# Above this the float32 arithmetic of the networks and of Richardson-Lucy loses precision.
MAX_ABS_VALUE = 1e6


def looks_like_rgb(shape: tuple[int, ...]) -> bool:
    """A (Y, X, 3|4) picture rather than a (Z, Y, X) stack (the last axis is short)."""
    return len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4 * shape[-1]


def check_volume(image: Any, task: str = "segmentation", *, values: bool = False,
                 min_size: int = 1, sample: np.ndarray | None = None) -> tuple[int, int, int]:
    """Raise ValueError, saying what to do, unless ``image`` is one channel of a 3D stack.

    Args:
        image: numpy, dask or zarr array.
        task: the task's name for the messages ("segmentation", "deblurring", ...).
        values: also check the intensities (deblurring): finite, within +-1e6, not
            constant. Lazy inputs are checked on a strided subsample (``sample`` when
            already read); a NaN elsewhere is caught window by window.
        min_size: the fewest voxels allowed along an axis.

    Refused always: 2D images, RGB(A) pictures, more or fewer than 3 axes, empty or too
    thin axes, non-numeric or boolean data. Returns the shape (Z, Y, X).
    """
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) == 2:
        raise ValueError(
            f"the image is 2D {shape}; {task} needs a 3D stack (Z, Y, X). Open the whole "
            "stack, not a single plane"
        )
    if looks_like_rgb(shape):
        raise ValueError(
            f"the image looks like an RGB(A) picture {shape}, not a 3D stack; {task} "
            "needs one channel of a (Z, Y, X) volume"
        )
    if len(shape) != 3:
        raise ValueError(
            f"the image has {len(shape)} axes {shape}; {task} needs one channel of a 3D "
            "stack (Z, Y, X): pick one channel and time point first (in napari: split the "
            "channels; in Python: image[0]; for the command line: save that channel as its "
            "own 3D file)"
        )
    if min(shape) < 1:
        raise ValueError(f"the image is empty (shape {shape})")
    if min(shape) < min_size:
        raise ValueError(
            f"the image {shape} has an axis with fewer than {min_size} voxels; {task} needs "
            "a 3D stack (Z, Y, X)"
        )
    dtype = np.dtype(getattr(image, "dtype", np.float32))
    if dtype.kind == "b" or dtype.kind not in "uif":
        raise ValueError(f"the image must hold intensities (integers or floats), not {dtype}")
    if values:
        _check_values(image, task, sample)
    return shape  # type: ignore[return-value]


def _check_values(image: Any, task: str, sample: np.ndarray | None) -> None:
    if sample is None:
        from napari_lsmfm.model.foundation import PERCENTILE_SAMPLES, strided_sample

        sample = np.asarray(strided_sample(image, PERCENTILE_SAMPLES))
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        kind = "NaN" if np.isnan(sample).any() else "infinite"
        raise ValueError(
            f"the image contains {kind} voxels; replace them (e.g. numpy.nan_to_num) or crop "
            f"them out before {task}"
        )
    lo, hi = float(sample.min()), float(sample.max())
    peak = max(abs(lo), abs(hi))
    if peak > MAX_ABS_VALUE:
        factor = 10 ** math.ceil(math.log10(peak / 65535.0))
        raise ValueError(
            f"the image holds values up to {peak:.3g}; {task} works in float32 and needs "
            f"values within +-1e6: rescale the image first (e.g. divide it by {factor})"
        )
    if hi <= lo:
        raise ValueError(
            f"the image is constant ({lo:g} everywhere); there is nothing to {task_verb(task)}"
        )


def task_verb(task: str) -> str:
    """ "deblurring" -> "deblur", "segmentation" -> "segment" (for messages)."""
    return {"deblurring": "deblur", "segmentation": "segment",
            "classification": "classify"}.get(task, task)
