"""npe2 reader and writer hooks: thin wrappers around open_volume / write_volume.

No napari or Qt import: napari calls these with paths and plain layer data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.engine.libs import warm_up

from .volume import TIFF_SUFFIXES, ZARR_SUFFIXES, open_volume
from .write import volume_stem, write_volume

__all__ = ["napari_get_reader", "read_volume_layers", "write_image", "write_labels"]

LayerData = tuple[Any, dict, str]


def napari_get_reader(path: str | os.PathLike | list) -> Callable[..., list[LayerData]] | None:
    """Return a reader for one .tif / .tiff / .ome.tif / .zarr path, else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None  # a stack of several files is napari's own business
        path = path[0]
    name = os.fspath(path).rstrip("/\\").lower()
    if name.endswith(TIFF_SUFFIXES + ZARR_SUFFIXES):
        return read_volume_layers
    return None


def read_volume_layers(path: str | os.PathLike | list) -> list[LayerData]:
    """Open one volume as a napari layer: image (or labels for an OME-Zarr label image).

    Data stays lazy (dask); a multi-resolution file becomes a multiscale layer; voxel
    size from the metadata becomes the layer's scale (micrometres). Raises VolumeError,
    whose message napari shows, for a file that is not a usable 3D stack.
    """
    if isinstance(path, list | tuple):
        path = path[0]
    warm_up()  # the plugin's first command, often: torch and MONAI load in the background
    vol = open_volume(path)
    levels = vol.metadata.get("multiscale_levels") or [vol.data]
    stem = volume_stem(Path(os.fspath(path).rstrip("/\\")))
    meta: dict[str, Any] = {"name": stem, "metadata": _layer_metadata(vol)}
    if vol.voxel_size is not None:
        meta["scale"] = vol.voxel_size
    if len(levels) > 1:
        meta["multiscale"] = True
    data = levels if len(levels) > 1 else vol.data

    is_labels = (
        vol.metadata.get("kind") == "labels"
        and vol.channel_axis is None
        and np.dtype(vol.dtype).kind in "iu"
    )
    if is_labels:
        return [(data, meta, "labels")]
    if vol.channel_axis is not None:
        meta["channel_axis"] = vol.channel_axis
        names = vol.metadata.get("channel_names") or []
        if len(names) == vol.shape[vol.channel_axis]:
            meta["name"] = [f"{stem} [{n}]" if n else f"{stem} [{i}]" for i, n in enumerate(names)]
    return [(data, meta, "image")]


def _layer_metadata(vol) -> dict:
    keep = {k: v for k, v in vol.metadata.items() if k != "multiscale_levels"}
    keep.update(path=str(vol.path), axes=vol.axes, voxel_size_um=vol.voxel_size)
    return keep


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for image layers (OME-TIFF or OME-Zarr by extension).

    napari's Save dialog has already asked before replacing a file, so this overwrites.
    """
    if meta.get("rgb"):
        raise ValueError(
            "napari-lsmfm saves grey-scale stacks; save RGB layers with napari's built-in "
            "writer (e.g. as .png / .tif from the napari builtins)."
        )
    return [str(_write_layer(path, data, meta, "image"))]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for labels layers; the integer dtype is kept."""
    return [str(_write_layer(path, data, meta, "labels"))]


def _write_layer(path: str, data: Any, meta: dict, kind: str) -> Path:
    target = Path(path)
    if not target.name.lower().endswith(TIFF_SUFFIXES + ZARR_SUFFIXES):
        target = target.with_name(target.name + ".tif")
    ndim = len(getattr(data[0], "shape", ())) if isinstance(data, list) else np.ndim(data)
    return write_volume(
        target, data, voxel_size=_voxel_size(meta.get("scale"), ndim), kind=kind,
        overwrite=True,
    )


def _voxel_size(scale, ndim: int) -> tuple[float, float, float] | None:
    if scale is None or ndim < 3 or len(scale) < 3:
        return None
    voxel = tuple(float(s) for s in scale[-3:])
    if all(v == 1.0 for v in voxel):
        return None  # napari's default scale says nothing about micrometres
    return voxel
