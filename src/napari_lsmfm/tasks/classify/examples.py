"""What gets classified and what the user showed: objects of a labels layer, points,
tiles; examples with a class; the CSV formats of the issue.

CSV formats (voxel coordinates, z first):

- points: columns ``z,y,x`` (napari's own points CSV with ``axis-0,axis-1,axis-2`` is
  accepted too; other columns are ignored);
- examples: ``z,y,x,class``;
- output: one row per point or object, in input order: ``z,y,x`` (the centroid of an
  object), ``label`` (objects), ``class`` (``unknown`` when rejected), ``confidence``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Examples",
    "Items",
    "object_items",
    "point_items",
    "read_examples_csv",
    "read_points_csv",
    "tile_items",
    "write_rows_csv",
]

AXES = (("z", "y", "x"), ("axis-0", "axis-1", "axis-2"))


@dataclass
class Items:
    """The things to classify, in input order.

    kind: "objects", "points" or "tiles".
    centres: (N, 3) float64 voxel coordinates z, y, x (an object's centroid, a tile's centre).
    boxes: (N, 3, 2) int64 [start, stop) of each object's bounding box or tile; None for points.
    labels: (N,) int64 label value of each object (objects only).
    mask_source: the labels array the objects come from (objects only).
    tile: (z, y, x) tile size (tiles only); grid: tiles per axis (tiles only).
    """

    kind: str
    centres: np.ndarray
    boxes: np.ndarray | None = None
    labels: np.ndarray | None = None
    mask_source: Any = None
    tile: tuple[int, int, int] | None = None
    grid: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.centres)


@dataclass
class Examples:
    """Examples the user marked: positions (N, 3) z, y, x voxels and a class name each;
    ``classes``: every class the user declared (each needs an example; default: those
    in ``names``, in order of first appearance)."""

    points: np.ndarray
    names: list[str]
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, np.float64).reshape(-1, 3)
        self.names = [str(n).strip() for n in self.names]
        if len(self.names) != len(self.points):
            raise ValueError(
                f"{len(self.points)} example positions but {len(self.names)} class names"
            )
        if any(not n for n in self.names):
            raise ValueError("an example has an empty class name; give every example a class")
        seen = list(dict.fromkeys(self.names))
        self.classes = list(dict.fromkeys([str(c) for c in self.classes] + seen))

    @classmethod
    def from_mapping(cls, picks: Mapping[Any, str], centres: Mapping[int, Sequence[float]]
                     ) -> Examples:
        """Objects picked in a labels layer: ``picks`` {label value: class name}, ``centres``
        {label value: (z, y, x)}."""
        missing = [k for k in picks if int(k) not in centres]
        if missing:
            raise ValueError(f"picked label(s) {missing[:5]} are not objects of the labels layer")
        keys = [int(k) for k in picks]
        return cls(np.array([centres[k] for k in keys], float).reshape(-1, 3),
                   [picks[k] for k in picks])

    def check(self) -> None:
        """ValueError for a declared class with no example, or fewer than two classes."""
        counts = {c: self.names.count(c) for c in self.classes}
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise ValueError(
                f"class {empty[0]!r} has no example; mark at least one object or point of "
                "it, or remove the class"
            )
        if len(counts) < 2:
            only = next(iter(counts), None)
            raise ValueError(
                f"only one class ({only!r}) has examples; a classifier needs examples of at "
                "least two classes (add examples of another class, e.g. 'other')"
            )

    def counts(self) -> dict[str, int]:
        return {c: self.names.count(c) for c in self.classes}


# ------------------------------------------------------------------------------ items


def object_items(labels: Any) -> Items:
    """The objects of a (Z, Y, X) labels array (numpy, dask or zarr): one item per label
    value > 0, in increasing label order, with centroid and bounding box. ValueError for
    an empty labels layer."""
    from scipy import ndimage

    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"the labels must be a (Z, Y, X) volume, got shape {lab.shape}")
    if lab.dtype.kind not in "iu":
        raise ValueError(f"the labels must hold integers, not {lab.dtype}")
    values = np.unique(lab)
    values = values[values > 0]
    if len(values) == 0:
        raise ValueError("the labels layer has no objects (every voxel is 0); segment or "
                         "paint the objects first")
    slices = ndimage.find_objects(lab)
    boxes = np.array([[[s.start, s.stop] for s in slices[v - 1]] for v in values], np.int64)
    centres = np.array(ndimage.center_of_mass(np.ones(lab.shape, np.float32), lab, values),
                       np.float64).reshape(-1, 3)
    return Items("objects", centres, boxes, values.astype(np.int64), lab)


def point_items(points: Any, shape: Sequence[int]) -> Items:
    """Points (N, 3) z, y, x voxels as items; ValueError naming the first point outside a
    volume of ``shape`` (or when there are none)."""
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be (N, 3) z, y, x voxel coordinates, got {pts.shape}")
    if len(pts) == 0:
        raise ValueError("there are no points to classify; add points first")
    if not np.isfinite(pts).all():
        raise ValueError("a point has a missing or non-numeric coordinate")
    limit = np.asarray(shape, float) - 0.5
    outside = np.flatnonzero(((pts < -0.5) | (pts > limit)).any(1))
    if len(outside):
        i = int(outside[0])
        raise ValueError(
            f"{len(outside)} point(s) lie outside the volume of shape {tuple(shape)} (the "
            f"first, row {i + 1}: z,y,x = {', '.join(f'{v:g}' for v in pts[i])}); points are "
            "voxel coordinates z,y,x of this image"
        )
    return Items("points", pts)


def tile_items(shape: Sequence[int], tile: Sequence[int]) -> Items:
    """Non-overlapping tiles of ``tile`` voxels covering a volume of ``shape`` (the engine's
    window grid with no overlap; the last tile of an axis ends at the volume's end)."""
    from napari_lsmfm.engine.grid import TileGrid

    grid = TileGrid.build(shape, tile, 0.0)
    starts = [np.asarray(s) for s in grid.starts]
    zz, yy, xx = np.meshgrid(*starts, indexing="ij")
    lo = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1).astype(np.int64)
    hi = lo + np.asarray(grid.tile)
    boxes = np.stack([lo, hi], 2)
    centres = (lo + hi - 1) / 2.0
    return Items("tiles", centres, boxes, tile=grid.tile,
                 grid=tuple(len(s) for s in starts))


# -------------------------------------------------------------------------------- CSV


def _read_rows(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    path = Path(path).expanduser()
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = [h.strip() for h in (reader.fieldnames or [])]
    return header, [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]


def _coordinates(path: Any, header: list[str], rows: list[dict[str, str]], what: str
                 ) -> np.ndarray:
    axes = next((a for a in AXES if set(a) <= set(header)), None)
    if axes is None:
        missing = [a for a in AXES[0] if a not in header]
        raise ValueError(
            f"{Path(path).name}: missing column(s) {', '.join(missing)}; {what} has columns "
            "z,y,x in voxels (or napari's axis-0,axis-1,axis-2)"
        )
    try:
        return np.array([[float(r[a]) for a in axes] for r in rows], np.float64).reshape(-1, 3)
    except ValueError:
        raise ValueError(f"{Path(path).name}: a z,y,x value is not a number") from None


def read_points_csv(path: str | os.PathLike) -> np.ndarray:
    """Points (N, 3) float64 z, y, x voxels from a CSV with columns z,y,x (or napari's
    axis-0,axis-1,axis-2)."""
    header, rows = _read_rows(path)
    return _coordinates(path, header, rows, "a points CSV")


def read_examples_csv(path: str | os.PathLike) -> Examples:
    """Examples from a CSV with columns z,y,x,class (voxels)."""
    header, rows = _read_rows(path)
    points = _coordinates(path, header, rows, "an examples CSV")
    if "class" not in header:
        raise ValueError(f"{Path(path).name}: missing column class; an examples CSV has "
                         "columns z,y,x,class")
    return Examples(points, [r["class"] for r in rows])


def write_rows_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts) with ``columns`` to a CSV file, all at once (atomic)."""
    from napari_lsmfm.engine.store import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(Path(path).expanduser(), write)
