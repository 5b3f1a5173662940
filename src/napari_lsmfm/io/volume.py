"""Open light-sheet volumes lazily: TIFF / OME-TIFF / ImageJ TIFF, Zarr and OME-Zarr.

Every file opens as a dask array backed by the file itself, so a stack larger than
memory opens at once and only the slices napari shows are read. The readers
(:mod:`.tiff`, :mod:`.zarr_in`) give the axes as the file stores them; this module
drops singleton axes and orders the rest as (C, Z, Y, X). Damaged or unsuitable files
raise :class:`VolumeError` with a message a user can act on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .output import partial_info, partial_message
from .raw import RawVolume, VolumeError
from .tiff import read_tiff
from .zarr_in import looks_like_zarr, read_zarr, zarr_errors

__all__ = ["Volume", "VolumeError", "open_volume", "TIFF_SUFFIXES", "ZARR_SUFFIXES"]

TIFF_SUFFIXES = (".tif", ".tiff")  # also matches .ome.tif / .ome.tiff
ZARR_SUFFIXES = (".zarr",)  # also matches .ome.zarr


@dataclass
class Volume:
    """A lazily opened volume.

    ``data`` is (Z, Y, X), or (C, Z, Y, X) when ``channel_axis`` is 0; for files it is
    a dask array that reads from the file on demand. ``voxel_size`` is (z, y, x) in
    micrometres when the metadata gives all three, else None.
    """

    data: Any  # dask.array.Array | np.ndarray
    voxel_size: tuple[float, float, float] | None
    axes: str
    channel_axis: int | None
    path: Path
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype


def open_volume(path: str | os.PathLike, *, allow_2d: bool = False) -> Volume:
    """Open a TIFF / OME-TIFF stack or a Zarr / OME-Zarr folder lazily.

    Returns a :class:`Volume` whose data is a dask array, (Z, Y, X) or (C, Z, Y, X).
    Singleton time and channel axes are dropped. With ``allow_2d=True`` a 2D image
    opens as a one-slice stack (1, Y, X) instead of raising.
    For multi-resolution files ``metadata["multiscale_levels"]`` lists every level
    (level 0 first) as dask arrays with the same axes as ``data``.

    Raises VolumeError for a missing, empty, truncated, 2D, RGB or unsupported file,
    and for a partial output of an interrupted run (a Zarr store marked partial, or the
    hidden temporary of an output being built).
    """
    path = Path(path).expanduser()
    name = path.name
    if not path.exists():
        raise VolumeError(
            f"'{path}' does not exist. Check the path and the spelling of the file name.",
            path,
        )
    if partial_info(path) is not None:
        raise VolumeError(partial_message(f"'{name}'", resume=True), path)
    lower = name.lower().rstrip("/")
    if lower.endswith(ZARR_SUFFIXES) or (path.is_dir() and looks_like_zarr(path)):
        raw = read_zarr(path)
        with zarr_errors(path):  # as when the metadata were read
            return make_volume(path, raw, allow_2d)
    if path.is_dir():
        raise VolumeError(
            f"'{name}' is a folder, not a Zarr store (no .zarray, .zgroup or zarr.json "
            "inside). Open a .tif stack or a .zarr / .ome.zarr folder.",
            path,
        )
    if lower.endswith(TIFF_SUFFIXES):
        return make_volume(path, read_tiff(path), allow_2d)
    raise VolumeError(
        f"'{name}' is not a supported file type. napari-lsmfm opens 3D TIFF / OME-TIFF "
        "stacks (.tif, .tiff) and Zarr / OME-Zarr folders (.zarr); convert the file to "
        "one of these, e.g. with Fiji (File > Save As > Tiff).",
        path,
    )


def make_volume(path: Path, raw: RawVolume, allow_2d: bool) -> Volume:
    """The :class:`Volume` of what a reader found: singleton axes dropped, the rest as
    (C, Z, Y, X), every pyramid level arranged alike, the voxel size (z, y, x) in
    micrometres when all three are known. Raises VolumeError for 2D (unless ``allow_2d``),
    time series and stacks of more dimensions."""
    levels, axes, letter_size = raw.levels, raw.axes, raw.sizes
    source, metadata = raw.source, raw.metadata
    data, out_axes, plan = _arrange_axes(levels[0], axes, path, allow_2d)
    arranged = [data]
    for level in levels[1:]:
        try:
            arranged.append(_apply_plan(level, plan))
        except Exception:  # an odd pyramid level: show level 0 only
            arranged = [data]
            break
    z_letter = plan["z_letter"]
    voxel = None
    if z_letter == "Z" and all(k in letter_size for k in "ZYX"):
        voxel = tuple(float(letter_size[k]) for k in "ZYX")
        if not all(math.isfinite(v) and v > 0 for v in voxel):
            voxel = None
    elif {"Y", "X"} <= letter_size.keys():
        metadata["pixel_size_yx"] = (letter_size["Y"], letter_size["X"])
    if voxel is not None:
        metadata["voxel_size_source"] = source
    if z_letter not in ("Z", None):
        metadata["z_from_axis"] = z_letter
    if plan["promoted_2d"]:
        metadata["was_2d"] = True
    metadata["multiscale_levels"] = arranged
    channel_axis = 0 if out_axes.startswith("C") else None
    return Volume(data=data, voxel_size=voxel, axes=out_axes, channel_axis=channel_axis,
                  path=path, metadata=metadata)


def _arrange_axes(data: da.Array, axes: str, path: Path, allow_2d: bool):
    """Squeeze singleton axes and order the rest as (C, Z, Y, X)."""
    name = path.name
    shape = tuple(data.shape)
    keep = [i for i, a in enumerate(axes) if a in "YX" or shape[i] != 1]
    rest = "".join(axes[i] for i in keep if axes[i] not in "YX")
    sizes = {i: shape[i] for i in keep}
    others = [i for i in keep if axes[i] not in "YX"]
    y, x = axes.index("Y"), axes.index("X")
    c = z = None
    promoted = False
    if len(others) == 0:
        if math.prod(shape) == 1:
            raise VolumeError(
                f"'{name}' holds a single voxel (shape {shape}); napari-lsmfm works on 3D "
                "stacks (Z, Y, X) of many voxels. Check that the whole stack was saved.",
                path,
            )
        if not allow_2d:
            raise VolumeError(
                f"'{name}' is a 2D image (shape {shape}); napari-lsmfm works on 3D stacks "
                "(Z, Y, X). Open 2D images with napari's built-in reader, or save the "
                "slices as one 3D TIFF stack.",
                path,
            )
        promoted = True
    elif len(others) == 1:
        if axes[others[0]] == "C":
            if not allow_2d:
                raise VolumeError(
                    f"'{name}' is a 2D image with {sizes[others[0]]} channels (axes "
                    f"{axes}, shape {shape}); napari-lsmfm works on 3D stacks (Z, Y, X). "
                    "Open 2D images with napari's built-in reader, or save the slices as "
                    "one 3D TIFF stack.",
                    path,
                )
            c, promoted = others[0], True
        else:
            z = others[0]
    elif len(others) == 2:
        letters = [axes[i] for i in others]
        if "T" in letters and ("Z" in letters or "C" not in letters):
            t = others[letters.index("T")]
            raise VolumeError(
                f"'{name}' is a time series ({sizes[t]} time points, axes {axes}, shape "
                f"{shape}); napari-lsmfm works on one 3D stack at a time. Save a single "
                "time point as a 3D stack (in Fiji: Image > Duplicate, one frame).",
                path,
            )
        if "C" in letters:
            c = others[letters.index("C")]
            z = others[1 - letters.index("C")]
        elif "Z" in letters:
            z = others[letters.index("Z")]
            c = others[1 - letters.index("Z")]
        else:  # two unnamed axes, as numpy would write them: (C, Z, Y, X)
            c, z = others
    else:
        raise VolumeError(
            f"'{name}' has {len(others) + 2} non-trivial dimensions (axes {rest}YX, shape "
            f"{shape}); napari-lsmfm opens one 3D stack (Z, Y, X), optionally with "
            "channels. Save one time point / position as a 3D or channel stack.",
            path,
        )
    plan = {
        "drop": [i for i in range(len(axes)) if i not in keep],
        "order": [i for i in (c, z, y, x) if i is not None],
        "axes": axes,
        "promote": promoted,
        "promoted_2d": promoted,
        "z_letter": axes[z] if z is not None else None,
    }
    out = _apply_plan(data, plan)
    out_axes = ("C" if c is not None else "") + "ZYX"
    return out, out_axes, plan


def _apply_plan(data: da.Array, plan: dict) -> da.Array:
    # skip no-op steps: each extra dask layer can stop a slice from reading only its plane
    if plan["drop"]:
        data = data[tuple(0 if i in plan["drop"] else slice(None) for i in range(data.ndim))]
    kept = [i for i in range(len(plan["axes"])) if i not in plan["drop"]]
    order = [kept.index(i) for i in plan["order"]]
    if order != sorted(order):
        data = data.transpose(order)
    if plan["promote"]:  # insert a Z of one slice before Y
        data = data[..., None, :, :]
    return data

