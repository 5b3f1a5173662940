"""Write volumes and label images to OME-TIFF or OME-Zarr, block by block.

Dask input is written a slab (TIFF) or a chunk (Zarr) at a time, so a result larger
than memory is saved without loading it whole. Nothing is written in place: the file
is assembled under a hidden temporary name next to the target and moved over it at
the end (:func:`~napari_lsmfm.engine.store.atomic_write`), so a failed, interrupted or
killed write never leaves a half-written file under the user's name, and an old file is
replaced only by a complete new one. A Zarr store carries the partial mark
(:mod:`.output`) until its last chunk is written. :func:`create_zarr` makes an empty
OME-Zarr to fill block by block (the output allocator builds it under a temporary name).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np

from napari_lsmfm.engine.store import atomic_write

from .output import clear_partial, partial_attrs
from .volume import TIFF_SUFFIXES, ZARR_SUFFIXES
from .zarr_in import looks_like_zarr

__all__ = ["create_zarr", "volume_stem", "write_volume"]

_BIGTIFF_BYTES = 2 * 10**9  # classic TIFF offsets end at 4 GiB; leave room for metadata
_SLAB_BYTES = 64 * 2**20  # TIFF: planes computed per step
_MAX_SLAB_BYTES = 256 * 2**20  # TIFF: never hold more than this of the source at once
_DEFAULT_CHUNK = (64, 256, 256)  # Zarr (z, y, x) chunk: 8 MB of uint16


def write_volume(
    path: str | os.PathLike,
    data: Any,
    *,
    voxel_size: Sequence[float] | None = None,
    kind: Literal["image", "labels"] = "image",
    overwrite: bool = False,
    chunks: Sequence[int] | None = None,
) -> Path:
    """Write a (Z, Y, X) or (C, Z, Y, X) array (or a 2D (Y, X) one) to disk.

    ``path`` ending in .tif / .tiff / .ome.tif / .ome.tiff writes an OME-TIFF (zlib,
    BigTIFF above 2 GB, PhysicalSize in micrometres); ending in .zarr / .ome.zarr
    writes an OME-Zarr 0.4 group (zarr format 2) with the data in array "0".
    ``data`` may be numpy, dask or zarr; a list (napari multiscale) writes level 0.
    ``voxel_size`` is (z, y, x) in micrometres. ``kind="labels"`` keeps an integer
    dtype (bool becomes uint8; 64-bit labels become 32-bit in TIFF, which OME-TIFF
    requires) and marks an OME-Zarr as a label image. ``chunks`` is the Zarr chunk
    shape (all axes, or just z, y, x); TIFF ignores it.

    Refuses to replace an existing path unless ``overwrite=True`` (FileExistsError).
    Returns the path written.
    """
    path = Path(path).expanduser()
    lower = path.name.lower()
    if lower.endswith(ZARR_SUFFIXES):
        fmt = "zarr"
    elif lower.endswith(TIFF_SUFFIXES):
        fmt = "tiff"
    else:
        raise ValueError(
            f"cannot tell the format from '{path.name}': end the name in .tif / .ome.tif "
            "(OME-TIFF) or .zarr / .ome.zarr (OME-Zarr)."
        )
    if kind not in ("image", "labels"):
        raise ValueError(f"kind must be 'image' or 'labels', not {kind!r}")

    arr = _as_array(data)
    if arr.ndim not in (2, 3, 4):
        raise ValueError(
            f"expected a (Z, Y, X) or (C, Z, Y, X) array (or a 2D (Y, X) one); got shape "
            f"{tuple(arr.shape)}"
        )
    if voxel_size is not None:
        voxel_size = tuple(float(v) for v in voxel_size)
        if len(voxel_size) != 3 or not all(np.isfinite(voxel_size)) or min(voxel_size) <= 0:
            raise ValueError(f"voxel_size must be three positive numbers (z, y, x) in "
                             f"micrometres, got {voxel_size}")
    arr = _fit_dtype(arr, kind, fmt)
    axes = {2: "YX", 3: "ZYX", 4: "CZYX"}[arr.ndim]

    _check_target(path, overwrite, want_dir=(fmt == "zarr"))

    def write(tmp: Path) -> None:
        if fmt == "tiff":
            _write_tiff(tmp, arr, axes, voxel_size)
        else:
            _write_zarr(tmp, arr, axes, voxel_size, kind, chunks, name=volume_stem(path))

    # replace=overwrite: a file another run made meanwhile is not replaced either
    atomic_write(path, write, replace=overwrite)
    return path


# ------------------------------------------------------------------ target handling


def _check_target(path: Path, overwrite: bool, want_dir: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists; choose another name or pass overwrite=True "
            "(--overwrite on the command line)"
        )
    if path.is_dir() and not (want_dir and looks_like_zarr(path)):
        # never delete a folder we cannot recognise as a Zarr store
        raise FileExistsError(
            f"{path} is a folder that is not a Zarr store; it will not be replaced. "
            "Choose another name."
        )


def volume_stem(path: Path) -> str:
    """The file name without its volume suffix (.ome.tif, .ome.zarr, .tiff, .zarr, ...):
    the layer or image name."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ------------------------------------------------------------------------ arrays


def _as_array(data: Any) -> np.ndarray | da.Array:
    if isinstance(data, list | tuple) and data and hasattr(data[0], "shape"):
        data = data[0]  # napari multiscale: full resolution first
    if isinstance(data, np.ndarray | da.Array):
        return data
    if hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "__getitem__"):
        # zarr, h5py, tifffile stores...: stay lazy
        chunks = getattr(data, "chunks", None) or "auto"
        return da.from_array(data, chunks=chunks)
    return np.asarray(data)


def _fit_dtype(arr, kind: str, fmt: str):
    dtype = np.dtype(arr.dtype)
    if dtype.kind == "b":
        return arr.astype(np.uint8)
    if dtype.kind == "c":
        raise ValueError("complex data cannot be saved; save its magnitude instead")
    if kind == "labels" and dtype.kind not in "iu":
        if dtype.kind == "f":
            raise ValueError(
                f"labels must be integers, got {dtype}; convert them (e.g. "
                "data.astype('uint32')) before saving"
            )
        raise ValueError(f"labels must be integers, got {dtype}")
    if fmt == "tiff" and dtype == np.float16:
        return arr.astype(np.float32)  # OME-TIFF has no half floats
    if fmt == "tiff" and dtype.kind in "iu" and dtype.itemsize == 8:
        # OME-TIFF has no 64-bit integers: use 32 bits when the values fit
        lo, hi = (int(v) for v in da.compute(arr.min(), arr.max()))
        for target in (np.uint32, np.int32):
            info = np.iinfo(target)
            if info.min <= lo and hi <= info.max:
                return arr.astype(target)
        raise ValueError(
            f"values from {lo} to {hi} do not fit in 32 bits, which OME-TIFF needs; "
            "save to a .zarr folder instead"
        )
    return arr


# -------------------------------------------------------------------------- TIFF


def _write_tiff(tmp: Path, arr, axes: str, voxel_size) -> None:
    import tifffile

    metadata: dict[str, Any] = {"axes": axes}
    if voxel_size is not None:
        for letter, value in zip("ZYX", voxel_size, strict=True):
            metadata[f"PhysicalSize{letter}"] = value
            metadata[f"PhysicalSize{letter}Unit"] = "µm"
    nbytes = int(np.prod(arr.shape)) * arr.dtype.itemsize
    row_bytes = arr.shape[-1] * arr.dtype.itemsize
    options = dict(
        ome=True,
        photometric="minisblack",  # never guess RGB from a first or last axis of 3 or 4
        compression="zlib",
        # level 1: as small as level 6 on noisy microscopy data, several times faster
        compressionargs={"level": 1},
        # strips of ~256 KB let tifffile compress one plane on all cores
        rowsperstrip=max(1, min(arr.shape[-2], 2**18 // row_bytes)),
        maxworkers=os.cpu_count() or 1,
        bigtiff=nbytes > _BIGTIFF_BYTES,
        metadata=metadata,
    )
    if isinstance(arr, np.ndarray):
        tifffile.imwrite(tmp, arr, **options)
    else:
        tifffile.imwrite(tmp, _planes(arr), shape=arr.shape, dtype=arr.dtype, **options)


def _planes(arr: da.Array) -> Iterator[np.ndarray]:
    """Yield the (Y, X) planes of a dask array in C order, computing a slab at a time."""
    if arr.ndim == 2:
        yield np.asarray(arr.compute())
        return
    plane_bytes = arr.shape[-1] * arr.shape[-2] * arr.dtype.itemsize
    for lead in np.ndindex(*arr.shape[:-3]):
        vol = arr[lead]
        for z0, z1 in _slabs(arr.chunks[-3], plane_bytes):
            yield from np.asarray(vol[z0:z1].compute())


def _slabs(zchunks: Sequence[int], plane_bytes: int) -> list[tuple[int, int]]:
    """Group the source's z chunks into slabs of about _SLAB_BYTES (none above the cap).

    Following the source's chunks means no chunk is read twice.
    """
    budget = max(1, _SLAB_BYTES // plane_bytes)
    cap = max(1, _MAX_SLAB_BYTES // plane_bytes)
    slabs: list[tuple[int, int]] = []
    start = pos = 0
    for depth in zchunks:
        if depth > cap:  # one huge chunk: split it, reading it more than once
            if pos > start:
                slabs.append((start, pos))
            slabs += [(s, min(s + cap, pos + depth)) for s in range(pos, pos + depth, cap)]
            pos += depth
            start = pos
            continue
        if pos > start and pos + depth - start > budget:
            slabs.append((start, pos))
            start = pos
        pos += depth
    if pos > start:
        slabs.append((start, pos))
    return slabs


# -------------------------------------------------------------------------- Zarr


def _zarr_chunks(shape: tuple[int, ...], chunks: Sequence[int] | None) -> tuple[int, ...]:
    spatial = len(shape) if len(shape) < 3 else 3
    if chunks is None:
        chunks = _DEFAULT_CHUNK[-spatial:]
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) == spatial and len(shape) > spatial:
        chunks = (1,) * (len(shape) - spatial) + chunks
    if len(chunks) != len(shape) or min(chunks) < 1:
        raise ValueError(f"chunks {chunks} do not match data of shape {tuple(shape)}")
    return tuple(min(c, n) if n else 1 for c, n in zip(chunks, shape, strict=True))


def create_zarr(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    *,
    voxel_size: Sequence[float] | None = None,
    kind: Literal["image", "labels"] = "image",
    chunks: Sequence[int] | None = None,
    name: str | None = None,
    attrs: dict | None = None,
) -> Any:
    """Create an empty OME-Zarr 0.4 group (zarr format 2) at ``path``, in place, and
    return its array "0" of ``shape`` ((Z, Y, X), (C, Z, Y, X) or (Y, X)) and ``dtype``
    (zeros until written) to fill. ``voxel_size``: (z, y, x) micrometres; ``chunks``: as
    :func:`write_volume`; ``attrs``: more root attributes (e.g. the partial mark of
    :func:`~napari_lsmfm.io.output.partial_attrs`), written with the metadata before any
    data. Callers give a temporary ``path`` (see :class:`~napari_lsmfm.engine.store.
    StagedOutput`)."""
    import numcodecs
    import zarr

    path = Path(path)
    shape = tuple(int(s) for s in shape)
    axes = {2: "YX", 3: "ZYX", 4: "CZYX"}[len(shape)]
    group = zarr.open_group(str(path), mode="w", zarr_format=2)  # v2: Fiji, older tools
    group.attrs.update({**_ome_attrs(axes, voxel_size, kind, name or volume_stem(path)),
                        **(attrs or {})})
    return group.create_array(
        "0",
        shape=shape,
        chunks=_zarr_chunks(shape, chunks),
        dtype=np.dtype(dtype),
        compressors=numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE),
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},  # as OME-Zarr 0.4 asks
    )


def _write_zarr(tmp: Path, arr, axes: str, voxel_size, kind: str, chunks, name: str) -> None:
    target = create_zarr(tmp, arr.shape, arr.dtype, voxel_size=voxel_size, kind=kind,
                         chunks=chunks, name=name, attrs=partial_attrs())
    if isinstance(arr, np.ndarray):
        target[...] = arr
    else:
        da.store(arr.rechunk(target.chunks), target, lock=False)  # one task per Zarr chunk
    clear_partial(tmp)


def _ome_attrs(axes: str, voxel_size, kind: str, name: str) -> dict[str, Any]:
    axes_meta, scale = [], []
    for letter in axes:
        if letter == "C":
            axes_meta.append({"name": "c", "type": "channel"})
            scale.append(1.0)
        else:
            entry = {"name": letter.lower(), "type": "space"}
            if voxel_size is not None:
                entry["unit"] = "micrometer"
                scale.append(voxel_size["ZYX".index(letter)])
            else:
                scale.append(1.0)
            axes_meta.append(entry)
    attrs: dict[str, Any] = {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": axes_meta,
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                ],
            }
        ]
    }
    if kind == "labels":
        attrs["image-label"] = {"version": "0.4"}
    return attrs
