"""TIFF / OME-TIFF / ImageJ TIFF stacks, read lazily through tifffile's zarr store.

Before any pixel is shown the file is checked for what users meet in practice: a cut
copy (the chain of image directories, the pixel extents), a renamed non-TIFF, RGB
images, compressions that need ``imagecodecs``. The voxel size comes from OME-XML,
ImageJ metadata or the TIFF resolution tags, in micrometres.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .raw import (
    UM_PER_UNIT,
    RawVolume,
    VolumeError,
    check_not_empty,
    damaged_error,
    dask_from_zarr,
    probe_chunks,
)


def read_tiff(path: Path) -> RawVolume:
    """The first series of a TIFF file (every pyramid level), checked for damage; raises
    VolumeError saying what is wrong and what to do."""
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
            raise damaged_error(path, exc) from None
        except Exception as exc:  # struct errors, OSError on a cut header, ...
            raise damaged_error(path, exc) from None
        try:
            with tif:
                nlevels, axes, letter_size, source, metadata = _tiff_info(tif, path, size, logged)
            levels = _tiff_levels(path, nlevels)
        except VolumeError:
            raise
        except Exception as exc:
            raise damaged_error(path, exc) from None
    return RawVolume(levels, axes, letter_size, source, metadata)


def _tiff_info(tif, path: Path, size: int, logged: list[str]):
    """Check a TIFF for damage and unsupported content; return what building it needs."""
    if not tif.series:
        raise damaged_error(path, "no image data found")
    problem = _ifd_chain_problem(path, size)
    series = tif.series[0]
    if problem is None:
        check_not_empty(path, tuple(series.shape))
        problem = _tiff_extent_problem(series, size)
    structural = [m for m in logged if ("invalid" in m and "offset" in m) or "corrupt" in m]
    if problem is None and structural:
        problem = structural[0]
    if problem is not None:
        raise damaged_error(path, problem)

    page0 = series.keyframe
    axes = series.axes.upper()
    shape = tuple(series.shape)
    photometric = getattr(page0.photometric, "name", str(page0.photometric))
    rgb = ("S" in axes and shape[axes.index("S")] in (3, 4)) or photometric in ("RGB", "YCBCR")
    if rgb and not _planes_saved_as_rgb(axes, shape, series.dtype):
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
        levels.append(dask_from_zarr(zarr.open(store, mode="r")))
    # Decode the first and last chunk now: a damaged strip or a missing codec shows
    # up here, not later inside napari's slicing thread.
    probe_chunks(path, levels[0])
    return levels


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
        factor = UM_PER_UNIT.get(unit.lower())
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
        factor = UM_PER_UNIT.get(unit.strip().lower())
        if value is not None and factor is not None:
            with contextlib.suppress(ValueError):
                sizes[letter] = float(value) * factor
    names = [
        ch.get("Name", "") for ch in pixels if ch.tag.endswith("Channel")
    ]
    return sizes, names if any(names) else []


def _planes_saved_as_rgb(axes: str, shape: tuple[int, ...], dtype) -> bool:
    """A 3- or 4-plane stack a writer tagged RGB (tifffile does so for a (3, Y, X)
    array): the samples are separate planes (axes "SYX") of more than 8 bits, which
    colour pictures are not; read as (Z, Y, X)."""
    return axes == "SYX" and shape[0] in (3, 4) and np.dtype(dtype).itemsize > 1


def _rgb_error(path: Path, shape) -> VolumeError:
    return VolumeError(
        f"'{path.name}' is an RGB image (shape {tuple(shape)}); napari-lsmfm works on "
        "grey-scale fluorescence stacks. In Fiji use Image > Color > Split Channels (or "
        "Image > Type > 16-bit) and save one fluorescence channel as a grey-scale 3D stack.",
        path,
    )


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
