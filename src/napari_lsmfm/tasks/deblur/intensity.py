"""Deblurring's intensities: the input check, the range mapped to [0, 1], and the way
back to the image's units and dtype.

The 1st percentile of the volume maps to 0 and ``HEADROOM`` x the 99.99th (relative to
the 1st) to 1: the foundation's own 1st-99th percentile range would clip the bright
structures that deblurring must sharpen (their peaks rise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_lsmfm.io.check import MAX_ABS_VALUE, check_volume

__all__ = [
    "HEADROOM",
    "INTENSITY_PERCENTILES",
    "MAX_ABS_VALUE",
    "check_deblur_input",
    "deblur_range",
    "output_dtype",
    "to_units",
    "volume_sample",
]

INTENSITY_PERCENTILES = (1.0, 99.99)
HEADROOM = 2.0


def volume_sample(image: Any) -> np.ndarray:
    """The volume itself when small, else a strided subsample (one read of a lazy volume)."""
    from napari_lsmfm.model.foundation import PERCENTILE_SAMPLES, strided_sample

    return np.asarray(strided_sample(image, PERCENTILE_SAMPLES))


def check_deblur_input(image: Any, sample: np.ndarray | None = None) -> tuple[int, int, int]:
    """Raise ValueError with what to do unless ``image`` is a deblurrable (Z, Y, X) volume
    (:func:`napari_lsmfm.io.check.check_volume` for deblurring).

    Refused: 2D images, RGB(A) or multichannel arrays, fewer than 2 planes on an axis,
    non-numeric or boolean data, NaN or infinite voxels, values beyond +-1e6 (rescale
    first), and constant images. Lazy (dask / zarr) inputs are checked on a strided
    subsample (``sample``, when already read); a NaN elsewhere is caught window by
    window. Returns the shape.
    """
    return check_volume(image, "deblurring", values=True, min_size=2, sample=sample)


def deblur_range(image: Any, sample: np.ndarray | None = None) -> tuple[float, float]:
    """The intensity range (low, high) deblurring maps to [0, 1]: low is the 1st
    percentile, high = low + HEADROOM x (99.99th percentile - low), so sharpened peaks
    are not clipped. Large and lazy volumes are estimated from a subsample (``sample``,
    when already read)."""
    from napari_lsmfm.model import percentile_range

    lo, top = percentile_range(volume_sample(image) if sample is None else sample,
                               *INTENSITY_PERCENTILES)
    if not top > lo:
        raise ValueError("the image is constant; there is nothing to deblur")
    return float(lo), float(lo + HEADROOM * (top - lo))


def to_units(values: np.ndarray, lo: float, hi: float, dtype: Any) -> np.ndarray:
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


def output_dtype(image: Any) -> np.dtype:
    """The result's dtype: the image's (integers or floats), else float32."""
    dtype = np.dtype(image.dtype)
    return dtype if dtype.kind in "uif" else np.dtype(np.float32)
