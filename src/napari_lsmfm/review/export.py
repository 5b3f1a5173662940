"""Export a review: the reviewed labels (OME-TIFF / OME-Zarr, block by block through
:func:`napari_lsmfm.io.write.write_volume`) and the object table (CSV, one row per
object). Neither replaces an existing file unless ``overwrite=True``."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from napari_lsmfm.engine.store import atomic_write
from napari_lsmfm.io.write import write_volume

from .objects import ObjectRecord, ReviewError

__all__ = ["TABLE_COLUMNS", "export_labels", "export_table", "table_rows"]

TABLE_COLUMNS = ("id", "class", "class_name", "status", "voxels", "volume_um3", "centroid_z",
                 "centroid_y", "centroid_x", "bbox_z", "bbox_y", "bbox_x", "confidence",
                 "uncertainty")


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ReviewError(f"{path} already exists; choose another name or pass "
                          "overwrite=True to replace it")


def export_labels(path: str | os.PathLike, labels: Any, voxel_size: Sequence[float], *,
                  overwrite: bool = False) -> Path:
    """Write ``labels`` (Z, Y, X; numpy, dask or zarr) to ``path``: OME-TIFF for .tif /
    .ome.tif, OME-Zarr for .zarr / .ome.zarr, ``voxel_size`` (z, y, x) in micrometres.
    Returns the path."""
    path = Path(path).expanduser()
    _refuse_existing(path, overwrite)
    try:
        return write_volume(path, labels, voxel_size=voxel_size, kind="labels",
                            overwrite=overwrite)
    except (ValueError, FileExistsError) as err:
        raise ReviewError(str(err)) from None


def table_rows(records: Iterable[ObjectRecord],
               class_names: Mapping[int, str] | None = None) -> list[dict]:
    """The CSV rows of ``records``: :data:`TABLE_COLUMNS`, bbox as "start:stop"."""
    names = dict(class_names or {})
    rows = []
    for r in records:
        rows.append({
            "id": r.id, "class": r.cls, "class_name": names.get(r.cls, ""), "status": r.status,
            "voxels": r.voxels, "volume_um3": f"{r.volume_um3:.6g}",
            **{f"centroid_{a}": f"{c:.3f}" for a, c in zip("zyx", r.centroid, strict=True)},
            **{f"bbox_{a}": f"{s.start}:{s.stop}" for a, s in zip("zyx", r.bbox, strict=True)},
            "confidence": "" if r.confidence is None else f"{r.confidence:.6g}",
            "uncertainty": "" if r.uncertainty is None else f"{r.uncertainty:.6g}",
        })
    return rows


def export_table(path: str | os.PathLike, records: Iterable[ObjectRecord],
                 class_names: Mapping[int, str] | None = None, *,
                 overwrite: bool = False) -> Path:
    """Write one CSV row per object (columns :data:`TABLE_COLUMNS`), atomically; returns
    the path."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".csv":
        raise ReviewError(f"the table is saved as CSV: end the name in .csv, not {path.name}")
    _refuse_existing(path, overwrite)
    rows = table_rows(records, class_names)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write, replace=overwrite)
