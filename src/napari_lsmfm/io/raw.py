"""What a file reader hands to :func:`~napari_lsmfm.io.volume.open_volume`, and what the
readers share: :class:`VolumeError`, the lazy dask view of a Zarr array, the probe read
that finds damage at open time, the length units, the one-line error details.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da

# Dask chunks group small file chunks (TIFF pages, Zarr chunks) so a whole-volume
# computation is not drowned in tiny tasks. Kept small: after a transpose or a channel
# split dask no longer narrows a slice to the file chunks, and reads the whole chunk.
_DASK_CHUNK_BYTES = 8 * 2**20

# Length units of OME-XML, OME-Zarr and ImageJ, as micrometres per unit.
UM_PER_UNIT = {
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
class RawVolume:
    """A volume as its file stores it, before :func:`~napari_lsmfm.io.volume.open_volume`
    arranges the axes. ``levels``: dask arrays, full resolution first; ``axes``: one
    letter per axis (T, C, Z, Y, X, Q for unnamed, S for samples); ``sizes``: micrometres
    per axis letter where the metadata say; ``source``: where those sizes came from
    (None when none); ``metadata``: what the reader found (format, source axes, ...)."""

    levels: list[da.Array]
    axes: str
    sizes: dict[str, float]
    source: str | None
    metadata: dict


def dask_from_zarr(arr) -> da.Array:
    """A zarr array as dask, in chunks of about 8 MiB that follow the file's own chunks."""
    chunks = da.core.normalize_chunks(
        "auto", arr.shape, limit=_DASK_CHUNK_BYTES, dtype=arr.dtype, previous_chunks=arr.chunks
    )
    return da.from_zarr(arr, chunks=chunks)


def probe_chunks(path: Path, data: da.Array) -> None:
    """Decode the first and last chunk now, so a damaged file or a missing codec fails at open
    time (not later inside napari's slicing thread); raises VolumeError."""
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
                f"({short_detail(text)}). Install it with `pip install imagecodecs`, or re-save "
                "the stack uncompressed or with zlib compression.",
                path,
            ) from None
        raise damaged_error(path, exc) from None


def check_not_empty(path: Path, shape: tuple[int, ...]) -> None:
    """Raise VolumeError when ``shape`` has a zero-length axis."""
    if any(n == 0 for n in shape):
        raise VolumeError(
            f"'{path.name}' contains no pixels (shape {tuple(shape)}). Export the stack "
            "again.",
            path,
        )


def damaged_error(path: Path, detail: Any) -> VolumeError:
    """The error for a truncated or damaged file (to raise)."""
    return VolumeError(
        f"'{path.name}' appears truncated or damaged: {short_detail(detail)}. Re-export the "
        "stack, or copy it again if the copy was interrupted.",
        path,
    )


def short_detail(detail: Any) -> str:
    """The first line of an error's text, at most 200 characters."""
    text = str(detail).strip() or type(detail).__name__
    text = text.splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."
