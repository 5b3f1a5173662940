"""Volumes in and out: TIFF / OME-TIFF / Zarr / OME-Zarr, lazily through dask.

>>> vol = open_volume("brain.ome.tif")        # Volume(data=dask (Z, Y, X), voxel_size=(z, y, x) um)
>>> write_volume("labels.zarr", labels, voxel_size=vol.voxel_size, kind="labels")

``volume`` opens a file (the readers: ``tiff``, ``zarr_in``; what they share: ``raw``),
``write`` saves one, ``check`` checks an array before a task runs on it, ``output``
allocates a task's result; ``_napari`` holds the npe2 reader and writer hooks.
"""

from .volume import Volume, VolumeError, open_volume
from .write import write_volume

__all__ = ["Volume", "VolumeError", "open_volume", "write_volume"]
