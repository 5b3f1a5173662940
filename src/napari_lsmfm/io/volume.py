"""Open light-sheet volumes lazily: TIFF / OME-TIFF / ImageJ TIFF, Zarr and OME-Zarr.

Every file opens as a dask array backed by the file itself, so a stack larger than
memory opens at once and only the slices napari shows are read. Damaged or
unsuitable files raise :class:`VolumeError` with a message a user can act on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["Volume", "VolumeError", "open_volume", "TIFF_SUFFIXES", "ZARR_SUFFIXES"]

TIFF_SUFFIXES = (".tif", ".tiff")  # also matches .ome.tif / .ome.tiff
ZARR_SUFFIXES = (".zarr",)  # also matches .ome.zarr

# Dask chunks group small file chunks (TIFF pages, Zarr chunks) so a whole-volume
# computation is not drowned in tiny tasks. Kept small: after a transpose or a channel
# split dask no longer narrows a slice to the file chunks, and reads the whole chunk.
_DASK_CHUNK_BYTES = 8 * 2**20

# Length units of OME-XML, OME-Zarr and ImageJ, as micrometres per unit.
_UM_PER_UNIT = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "micrometre": 1.0, "micrometers": 1.0, "micrometres": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "nanometers": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "millimeters": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "å": 1e-4, "angstrom": 1e-4, "\\u00c5": 1e-4,
    "pm": 1e-6, "picometer": 1e-6,
}


class VolumeError(ValueError):
    """A file that cannot be opened as a 3D stack; the message says why and what to do."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


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

    Raises VolumeError for a missing, empty, truncated, 2D, RGB or unsupported file.
    """
    path = Path(path).expanduser()
    name = path.name
    if not path.exists():
        raise VolumeError(
            f"'{path}' does not exist. Check the path and the spelling of the file name.",
            path,
        )
    lower = name.lower().rstrip("/")
    if lower.endswith(ZARR_SUFFIXES) or (path.is_dir() and _looks_like_zarr(path)):
        return _open_zarr(path, allow_2d)
    if path.is_dir():
        raise VolumeError(
            f"'{name}' is a folder, not a Zarr store (no .zarray, .zgroup or zarr.json "
            "inside). Open a .tif stack or a .zarr / .ome.zarr folder.",
            path,
        )
    if lower.endswith(TIFF_SUFFIXES):
        return _open_tiff(path, allow_2d)
    raise VolumeError(
        f"'{name}' is not a supported file type. napari-lsmfm opens 3D TIFF / OME-TIFF "
        "stacks (.tif, .tiff) and Zarr / OME-Zarr folders (.zarr); convert the file to "
        "one of these, e.g. with Fiji (File > Save As > Tiff).",
        path,
    )


# --------------------------------------------------------------------------- TIFF


def _open_tiff(path: Path, allow_2d: bool) -> Volume:
    import tifffile

    name = path.name
    size = path.stat().st_size
    if size == 0:
        raise VolumeError(
            f"'{name}' is empty (0 bytes): the export or copy probably failed. "
            "Export the stack again.",
            path,
        )
    with _quiet_tifffile() as logged:
        try:
            tif = tifffile.TiffFile(path)
        except tifffile.TiffFileError as exc:
            if "not a TIFF file" in str(exc):
                raise VolumeError(
                    f"'{name}' is not a TIFF file (it does not start with a TIFF header); "
                    "it may be another format renamed to .tif. Open it in Fiji and save "
                    "it as a TIFF stack.",
                    path,
                ) from None
            raise _damaged(path, exc) from None
        except Exception as exc:  # struct errors, OSError on a cut header, ...
            raise _damaged(path, exc) from None
        try:
            with tif:
                nlevels, axes, letter_size, source, metadata = _tiff_info(tif, path, size, logged)
            levels = _tiff_levels(path, nlevels)
        except VolumeError:
            raise
        except Exception as exc:
            raise _damaged(path, exc) from None
    return _make_volume(path, levels, axes, letter_size, source, metadata, allow_2d)


def _tiff_info(tif, path: Path, size: int, logged: list[str]):
    """Check a TIFF for damage and unsupported content; return what building it needs."""
    if not tif.series:
        raise _damaged(path, "no image data found")
    problem = _ifd_chain_problem(path, size)
    series = tif.series[0]
    if problem is None:
        _check_not_empty(path, tuple(series.shape))
        problem = _tiff_extent_problem(series, size)
    structural = [m for m in logged if ("invalid" in m and "offset" in m) or "corrupt" in m]
    if problem is None and structural:
        problem = structural[0]
    if problem is not None:
        raise _damaged(path, problem)

    page0 = series.keyframe
    axes = series.axes.upper()
    shape = tuple(series.shape)
    photometric = getattr(page0.photometric, "name", str(page0.photometric))
    if ("S" in axes and shape[axes.index("S")] in (3, 4)) or photometric in ("RGB", "YCBCR"):
        raise _rgb_error(path, shape)
    _check_codec(path, page0)

    fmt = "ome-tiff" if tif.is_ome else "imagej-tiff" if tif.is_imagej else "tiff"
    metadata: dict[str, Any] = {
        "format": fmt,
        "source_axes": axes,
        "source_shape": shape,
        "dtype": str(series.dtype),
        "series_count": len(tif.series),
    }
    letter_size, source, channel_names = _tiff_voxel_size(tif, page0)
    if channel_names:
        metadata["channel_names"] = channel_names

    return len(series.levels), axes, letter_size, source, metadata


def _tiff_levels(path: Path, nlevels: int) -> list[da.Array]:
    import tifffile
    import zarr

    levels = []
    for level in range(nlevels):
        # imread's store reopens the file on demand; a store made from a TiffFile
        # that is later closed cannot read again once it has read a chunk.
        store = tifffile.imread(path, aszarr=True, series=0, level=level)
        levels.append(_dask_from_zarr(zarr.open(store, mode="r")))
    # Decode the first and last chunk now: a damaged strip or a missing codec shows
    # up here, not later inside napari's slicing thread.
    _probe_chunks(path, levels[0])
    return levels


def _dask_from_zarr(arr) -> da.Array:
    chunks = da.core.normalize_chunks(
        "auto", arr.shape, limit=_DASK_CHUNK_BYTES, dtype=arr.dtype, previous_chunks=arr.chunks
    )
    return da.from_zarr(arr, chunks=chunks)


def _probe_chunks(path: Path, data: da.Array) -> None:
    first = tuple(slice(0, 1) for _ in data.shape)  # one element reads one file chunk
    last = tuple(slice(max(n - 1, 0), n) for n in data.shape)
    try:
        data[first].compute(scheduler="synchronous")
        data[last].compute(scheduler="synchronous")
    except Exception as exc:
        text = str(exc)
        if "imagecodecs" in text:
            raise VolumeError(
                f"'{path.name}' uses a compression that needs the 'imagecodecs' package "
                f"({_short(text)}). Install it with `pip install imagecodecs`, or re-save the "
                "stack uncompressed or with zlib compression.",
                path,
            ) from None
        raise _damaged(path, exc) from None


def _check_codec(path: Path, page) -> None:
    import tifffile

    compression = int(page.compression)
    try:
        tifffile.TIFF.DECOMPRESSORS[compression]
    except KeyError:
        codec = getattr(page.compression, "name", str(compression))
        raise VolumeError(
            f"'{path.name}' is compressed with {codec}, which needs the 'imagecodecs' "
            "package. Install it with `pip install imagecodecs`, or re-save the stack "
            "uncompressed or with zlib compression.",
            path,
        ) from None


def _ifd_chain_problem(path: Path, size: int) -> str | None:
    """Walk the chain of image directories; a pointer past the end means a cut file."""
    with open(path, "rb") as fh:
        head = fh.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return "the TIFF header is incomplete"
        bo = "<" if head[:2] == b"II" else ">"
        version = struct.unpack(bo + "H", head[2:4])[0]
        if version == 42:
            nfmt, nsize, tagsize, ofmt, osize = "H", 2, 12, "I", 4
            offset = struct.unpack(bo + "I", head[4:8])[0]
        elif version == 43 and len(head) == 16:
            nfmt, nsize, tagsize, ofmt, osize = "Q", 8, 20, "Q", 8
            offset = struct.unpack(bo + "Q", head[8:16])[0]
        else:
            return None  # exotic variant; leave it to tifffile
        seen: set[int] = set()
        plane = 0
        while offset and offset not in seen:
            seen.add(offset)
            plane += 1
            if offset + nsize > size:
                return f"the directory of plane {plane} lies beyond the end of the file"
            fh.seek(offset)
            ntags = struct.unpack(bo + nfmt, fh.read(nsize))[0]
            end = offset + nsize + ntags * tagsize
            if end + osize > size:
                return f"the directory of plane {plane} is cut off"
            fh.seek(end)
            offset = struct.unpack(bo + ofmt, fh.read(osize))[0]
    return None


def _tiff_extent_problem(series, size: int) -> str | None:
    """Check that every plane's pixel bytes lie inside the file, without reading them."""
    expected = int(np.prod(series.shape)) * series.dtype.itemsize
    if series.dataoffset is not None:
        end = series.dataoffset + expected
        if end > size:
            return f"the pixel data needs {end:,} bytes but the file has {size:,}"
        return None
    pages = series.pages
    for i, page in enumerate(pages):
        if page is None:
            return f"plane {i + 1} of {len(pages)} is missing"
        offsets, counts = page.dataoffsets, page.databytecounts
        # a multi-file OME-TIFF keeps planes in sibling files: use the plane's own file
        fsize = getattr(getattr(page.parent, "filehandle", None), "size", None) or size
        if offsets and max(o + c for o, c in zip(offsets, counts, strict=False)) > fsize:
            return f"plane {i + 1} of {len(pages)} extends past the end of the file"
    return None


def _tiff_voxel_size(tif, page0) -> tuple[dict[str, float], str | None, list[str]]:
    """Voxel size per axis letter (micrometres), where it came from, and channel names."""
    if tif.is_ome and tif.ome_metadata:
        sizes, names = _ome_xml_voxel_size(tif.ome_metadata)
        if sizes:
            return sizes, "ome-xml", names
        return {}, None, names
    sizes: dict[str, float] = {}
    source = None
    ij = tif.imagej_metadata if tif.is_imagej else None
    if ij:
        unit = str(ij.get("unit", "")).strip()
        factor = _UM_PER_UNIT.get(unit.lower())
        if factor is not None:
            yx = _resolution_sizes(page0, factor)
            sizes.update(yx)
            if "spacing" in ij:
                sizes["Z"] = float(ij["spacing"]) * factor
            source = "imagej"
    else:
        unit = getattr(page0.tags.get("ResolutionUnit"), "value", 1)
        factor = {2: 25400.0, 3: 10000.0}.get(int(unit))  # pixels per inch / per cm
        if factor is not None:
            sizes.update(_resolution_sizes(page0, factor))
            source = "tiff-resolution"
    return sizes, source, []


def _resolution_sizes(page, um_per_unit: float) -> dict[str, float]:
    out = {}
    for letter, tag in (("X", "XResolution"), ("Y", "YResolution")):
        t = page.tags.get(tag)
        if t is None:
            continue
        num, den = t.value if isinstance(t.value, tuple) else (t.value, 1)
        if num and den and (num, den) != (1, 1):
            out[letter] = um_per_unit * den / num  # resolution is pixels per unit
    return out


def _ome_xml_voxel_size(xml: str) -> tuple[dict[str, float], list[str]]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}, []
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"),
                  None)
    if pixels is None:
        return {}, []
    sizes = {}
    for letter in "ZYX":
        value = pixels.get(f"PhysicalSize{letter}")
        unit = pixels.get(f"PhysicalSize{letter}Unit", "µm")
        factor = _UM_PER_UNIT.get(unit.strip().lower())
        if value is not None and factor is not None:
            with contextlib.suppress(ValueError):
                sizes[letter] = float(value) * factor
    names = [
        ch.get("Name", "") for ch in pixels if ch.tag.endswith("Channel")
    ]
    return sizes, names if any(names) else []


# --------------------------------------------------------------------------- Zarr


def _looks_like_zarr(path: Path) -> bool:
    return any((path / f).exists() for f in (".zarray", ".zgroup", "zarr.json"))


def _open_zarr(path: Path, allow_2d: bool) -> Volume:
    import zarr

    name = path.name
    if not path.is_dir():
        raise VolumeError(
            f"'{name}' is a file, but a Zarr store is a folder. Choose the .zarr folder "
            "itself (not a file inside it).",
            path,
        )
    if not _looks_like_zarr(path):
        raise VolumeError(
            f"'{name}' is not a Zarr store: it has no .zarray, .zgroup or zarr.json. "
            "Choose the top folder of the Zarr / OME-Zarr data set.",
            path,
        )
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise VolumeError(
            f"'{name}' could not be opened as Zarr ({_short(exc)}). Check that the folder "
            "was copied completely.",
            path,
        ) from None
    try:
        return _zarr_volume(node, path, allow_2d)
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(
            f"'{name}' has unreadable Zarr / OME-Zarr metadata or data ({_short(exc)}). "
            "Check that the folder was copied completely, or write it again.",
            path,
        ) from None


def _zarr_volume(node, path: Path, allow_2d: bool) -> Volume:
    import zarr

    name = path.name
    if isinstance(node, zarr.Array):
        attrs = dict(node.attrs)
        levels = [_dask_from_zarr(node)]
        # a plain array has no axis names: read it the way numpy code writes it
        named = {2: "YX", 3: "ZYX", 4: "CZYX", 5: "TCZYX"}
        axes = named.get(node.ndim, "Q" * (node.ndim - 2) + "YX")
        sizes = {}
        vs = attrs.get("voxel_size")  # a plain array may carry (z, y, x) um itself
        if isinstance(vs, list | tuple) and len(vs) == 3:
            sizes = dict(zip("ZYX", map(float, vs), strict=True))
        metadata = {"format": "zarr", "source_axes": axes, "source_shape": node.shape,
                    "dtype": str(node.dtype)}
        _check_not_empty(path, node.shape)
        _probe_chunks(path, levels[0])
        return _make_volume(path, levels, axes, sizes, "zarr-attrs" if sizes else None,
                            metadata, allow_2d)

    group = node
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)  # OME-Zarr 0.5 nests its keys under "ome"
    if "multiscales" not in ome and "bioformats2raw.layout" in ome and "0" in group:
        group = group["0"]  # bioformats2raw: the first image lives in the group "0"
        attrs = dict(group.attrs)
        ome = attrs.get("ome", attrs)
    if "multiscales" not in ome:
        arrays = [k for k, _ in group.arrays()]
        if len(arrays) == 1:
            return _zarr_volume(group[arrays[0]], path, allow_2d)
        raise VolumeError(
            f"'{name}' is a Zarr group without OME-Zarr 'multiscales' metadata and with "
            f"{len(arrays)} arrays ({', '.join(arrays[:5]) or 'none'}), so it is unclear "
            "which one is the image. Open the array folder inside it directly.",
            path,
        )
    ms = ome["multiscales"][0]
    version = str(ms.get("version", ome.get("version", "")))
    datasets = ms["datasets"]
    first = group[datasets[0]["path"]]
    ndim = first.ndim
    axes_meta = ms.get("axes")
    if axes_meta is None:  # OME-Zarr 0.1 / 0.2: always 5D tczyx
        axes_meta = list("tczyx")[-ndim:]
    axes_meta = [{"name": a} if isinstance(a, str) else a for a in axes_meta]
    axes = "".join(_ome_axis_letter(a) for a in axes_meta)
    if len(axes) != ndim:
        raise VolumeError(
            f"'{name}' lists {len(axes)} axes in its OME-Zarr metadata but the image has "
            f"{ndim} dimensions. Write the OME-Zarr again with a current tool.",
            path,
        )
    _check_not_empty(path, first.shape)
    levels = [_dask_from_zarr(group[d["path"]]) for d in datasets]
    _probe_chunks(path, levels[0])

    scale = _ome_zarr_scale(datasets[0], ms, ndim)
    sizes: dict[str, float] = {}
    source = None
    if scale is not None:
        units = [a.get("unit") for a in axes_meta]
        for letter, s, unit in zip(axes, scale, units, strict=True):
            if letter not in "ZYX":
                continue
            factor = _UM_PER_UNIT.get(str(unit).lower(), 1.0) if unit else 1.0
            sizes[letter] = float(s) * factor
        spatial_units = [u for a, u in zip(axes, units, strict=True) if a in "ZYX"]
        unitless_ones = not any(spatial_units) and all(
            sizes.get(k) == 1.0 for k in "ZYX"
        )
        if unitless_ones:
            sizes = {}  # a bare scale of 1 says nothing about micrometres
        else:
            source = "ome-zarr"

    metadata: dict[str, Any] = {
        "format": "ome-zarr",
        "ome_zarr_version": version,
        "source_axes": axes,
        "source_shape": tuple(first.shape),
        "dtype": str(first.dtype),
    }
    if "image-label" in ome:
        metadata["kind"] = "labels"
    omero = ome.get("omero") or {}
    names = [c.get("label", "") for c in omero.get("channels", []) if isinstance(c, dict)]
    if any(names):
        metadata["channel_names"] = names
    return _make_volume(path, levels, axes, sizes, source, metadata, allow_2d)


def _ome_axis_letter(axis: dict) -> str:
    name = str(axis.get("name", "")).lower()
    kind = str(axis.get("type", "")).lower()
    if name in ("t", "c", "z", "y", "x"):
        return name.upper()
    if kind == "time":
        return "T"
    if kind == "channel":
        return "C"
    return "Q"


def _ome_zarr_scale(dataset: dict, ms: dict, ndim: int) -> list[float] | None:
    scale = None
    for transforms in (dataset.get("coordinateTransformations"),
                       ms.get("coordinateTransformations")):
        for t in transforms or []:
            if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
                s = [float(v) for v in t["scale"]]
                scale = s if scale is None else [a * b for a, b in zip(scale, s, strict=True)]
    return scale


# ----------------------------------------------------------------- shared helpers


def _make_volume(
    path: Path,
    levels: list[da.Array],
    axes: str,
    letter_size: dict[str, float],
    source: str | None,
    metadata: dict,
    allow_2d: bool,
) -> Volume:
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


def _check_not_empty(path: Path, shape: tuple[int, ...]) -> None:
    if any(n == 0 for n in shape):
        raise VolumeError(
            f"'{path.name}' contains no pixels (shape {tuple(shape)}). Export the stack "
            "again.",
            path,
        )


def _rgb_error(path: Path, shape) -> VolumeError:
    return VolumeError(
        f"'{path.name}' is an RGB image (shape {tuple(shape)}); napari-lsmfm works on "
        "grey-scale fluorescence stacks. In Fiji use Image > Color > Split Channels (or "
        "Image > Type > 16-bit) and save one fluorescence channel as a grey-scale 3D stack.",
        path,
    )


def _damaged(path: Path, detail: Any) -> VolumeError:
    return VolumeError(
        f"'{path.name}' appears truncated or damaged: {_short(detail)}. Re-export the "
        "stack, or copy it again if the copy was interrupted.",
        path,
    )


def _short(detail: Any) -> str:
    text = str(detail).strip() or type(detail).__name__
    text = text.splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


class _Collect(logging.Filter):
    def __init__(self, sink: list[str]):
        super().__init__()
        self.sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.sink.append(record.getMessage())
        return False  # our own message replaces tifffile's log lines


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[list[str]]:
    """Collect tifffile's error log lines while opening instead of printing them."""
    sink: list[str] = []
    logger = logging.getLogger("tifffile")
    flt = _Collect(sink)
    logger.addFilter(flt)
    try:
        yield sink
    finally:
        logger.removeFilter(flt)
