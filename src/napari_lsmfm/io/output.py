"""The one output allocator: where a task's result is written while it is computed.

- :func:`check_output_path`: a command-line output name is acceptable (suffix, folder,
  not there unless ``overwrite``) before any work starts;
- :class:`Outputs`: the named outputs of one run: a ``.zarr`` target is allocated on
  disk and filled block by block (memory bounded by the block, not the volume); a TIFF
  target is a numpy array written at :meth:`Outputs.finish`;
- :func:`scratch_output`: an unnamed output (widgets, scripts): numpy up to
  ``max_bytes``, above it an empty Zarr array in a temporary folder removed when Python
  exits (or by :func:`remove_scratch`).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IN_MEMORY_BYTES",
    "VOLUME_SUFFIXES",
    "ZARR_CHUNKS",
    "Outputs",
    "check_output_path",
    "remove_scratch",
    "scratch_output",
]

IN_MEMORY_BYTES = 2 * 2**30  # inputs up to this are read into memory; results up to it stay numpy
VOLUME_SUFFIXES = (".tif", ".tiff", ".zarr")
ZARR_CHUNKS = (64, 256, 256)


def check_output_path(path: str | None, overwrite: bool, *, folder: bool = False
                      ) -> Path | None:
    """The output ``path`` as a Path, or an error saying what to do: it must end in .tif,
    .tiff or .zarr (unless ``folder``), not exist unless ``overwrite``, and its folder
    must exist. None stays None."""
    if path is None:
        return None
    target = Path(path).expanduser()
    if not folder and not target.name.lower().endswith(VOLUME_SUFFIXES):
        raise ValueError(f"{target.name}: outputs end in .tif, .tiff or .zarr (e.g. out.tif)")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    if not target.parent.exists():
        raise FileNotFoundError(2, "the output folder does not exist", str(target.parent))
    return target


class Outputs:
    """The named outputs of one run: zarr arrays filled in place, or numpy written at the
    end. ``written`` lists the paths made."""

    def __init__(self, voxel_size: Any, overwrite: bool) -> None:
        self.voxel_size = voxel_size
        self.overwrite = overwrite
        self.pending: list[tuple[Path, Any, str]] = []
        self.written: list[str] = []

    def array(self, path: Path | None, shape: tuple[int, ...], dtype: Any, kind: str) -> Any:
        """An array of ``shape`` and ``dtype`` to fill for ``path`` (None: no output)."""
        if path is None:
            return None
        if path.name.lower().endswith(".zarr"):
            import dask.array as da
            import zarr

            from napari_lsmfm.io.write import write_volume

            empty = da.zeros(shape, dtype=dtype, chunks=(1,) * (len(shape) - 3) + ZARR_CHUNKS)
            write_volume(path, empty, voxel_size=self.voxel_size, kind=kind,
                         overwrite=self.overwrite, chunks=ZARR_CHUNKS)
            self.written.append(str(path))
            return zarr.open_array(str(path / "0"), mode="r+")
        array = np.zeros(shape, dtype)
        self.pending.append((path, array, kind))
        return array

    def finish(self) -> None:
        """Write the numpy outputs to their files."""
        from napari_lsmfm.io.write import write_volume

        for path, array, kind in self.pending:
            write_volume(path, array, voxel_size=self.voxel_size, kind=kind,
                         overwrite=self.overwrite)
            self.written.append(str(path))


def scratch_output(shape: tuple[int, ...], dtype: Any, *, max_bytes: int = 2**30,
                   prefix: str = "lsmfm-", chunks: tuple[int, ...] = (32, 256, 256)
                   ) -> tuple[Any, str | None]:
    """``(None, None)`` when a result of ``shape`` and ``dtype`` fits in ``max_bytes`` (the
    task allocates numpy), else ``(empty zarr array, its temporary folder)``; the folder
    is removed when Python exits."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize <= max_bytes:
        return None, None
    import zarr

    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    chunks = tuple(min(s, c) for s, c in zip(shape, chunks, strict=False))
    out = zarr.open(str(Path(folder) / "result.zarr"), mode="w", shape=shape, dtype=dtype,
                    chunks=chunks)
    return out, folder


def remove_scratch(folder: str | None) -> None:
    """Remove a folder made by :func:`scratch_output` (when its layer is gone)."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
