"""What a deblur prediction returns: the volume, its display contrast, and the layer it
becomes in a viewer (no Qt)."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_lsmfm.tasks.base import LayerData, TaskResult

__all__ = ["CONTRAST_SAMPLES", "DeblurResult", "contrast_limits"]

CONTRAST_SAMPLES = 2**21  # voxels read to choose the result's contrast limits


def contrast_limits(data: Any) -> tuple[float, float]:
    """0.1th-99.95th percentiles of a strided subsample of ``data`` (numpy, dask or zarr):
    sharpened peaks stay visible."""
    from napari_lsmfm.model.foundation import strided_sample

    sample = np.asarray(strided_sample(data, CONTRAST_SAMPLES), np.float64)
    lo, hi = (float(v) for v in np.percentile(sample, (0.1, 99.95)))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


class DeblurResult(TaskResult):
    """A deblurred volume.

    data: (Z, Y, X) in the image's units and dtype: numpy, the ``out`` array given, or a
        dask array over a temporary Zarr store (``folder``) for large results.
    contrast_limits: (low, high) for display, :func:`contrast_limits` of ``data``
        (computed when first read unless given).
    seconds: wall time of the prediction; folder: the temporary Zarr folder or None;
    model: the :class:`~.deblurrer.Deblurrer` used (None for Richardson-Lucy);
    region: the (z, y, x) slices of the image ``data`` covers (None = all of it).
    """

    def __init__(self, data: Any, *, seconds: float = 0.0, folder: str | None = None,
                 model: Any = None, region: tuple[slice, ...] | None = None,
                 contrast_limits: tuple[float, float] | None = None) -> None:
        self.data = data
        self.seconds = float(seconds)
        self.folder = folder
        self.model = model
        self.region = region
        self._limits = contrast_limits

    @property
    def contrast_limits(self) -> tuple[float, float]:
        if self._limits is None:
            self._limits = contrast_limits(self.data)
        return self._limits

    def layers(self, name: str = "image", *, scale: Any = None,
               translate: Any = None) -> list[LayerData]:
        """One image layer "<name> deblurred" with the source's ``scale`` and ``translate``."""
        metadata: dict[str, Any] = {"deblurred_from": name}
        if self.folder:
            metadata["zarr"] = self.folder
        kwargs = {"name": f"{name} deblurred", "contrast_limits": self.contrast_limits,
                  "metadata": metadata, **self.geometry(scale, translate)}
        return [(self.data, kwargs, "image")]

    def __repr__(self) -> str:
        shape = tuple(getattr(self.data, "shape", ()))
        return f"DeblurResult(shape={shape}, seconds={self.seconds:.2f}, folder={self.folder!r})"
