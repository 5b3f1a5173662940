"""Volumes in and out: TIFF / OME-TIFF / Zarr / OME-Zarr, lazily through dask.

>>> vol = open_volume("brain.ome.tif")        # Volume(data=dask (Z, Y, X), voxel_size=(z, y, x) um)
>>> write_volume("labels.zarr", labels, voxel_size=vol.voxel_size, kind="labels")
"""

from .volume import Volume, VolumeError, open_volume
from .write import write_volume

__all__ = ["Volume", "VolumeError", "open_volume", "write_volume"]
