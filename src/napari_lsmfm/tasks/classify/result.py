"""What a classification returns: one row per object, point or tile, in input order, and
the layers that show it (a labels layer coloured by class, a points layer whose features
table holds class / confidence / unknown, a tile class map)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.tasks.base import LayerData, TaskResult

from .examples import write_rows_csv

__all__ = ["UNKNOWN", "ClassificationResult"]

UNKNOWN = "unknown"


@dataclass
class ClassificationResult(TaskResult):
    """Classes of N items, in input order.

    kind: "objects", "points" or "tiles".
    class_names: the classifier's classes; label value i + 1 in the layers is class i,
        ``len(class_names) + 1`` is unknown, 0 is background.
    centres: (N, 3) float64 z, y, x voxels (an object's centroid, a tile's centre).
    predicted: (N,) int64 index into ``class_names`` of the best class (also for unknown).
    confidence: (N,) float32 probability of the best class.
    unknown: (N,) bool, rejected by the open-set test.
    probabilities: (N, C) float32.
    scores: (N,) float32 open-set score (similarity to the nearest class prototype).
    labels: (N,) int64 object label values (objects), else None.
    mask_source: the objects' labels array (objects), for the class-coloured labels layer.
    tile / grid: tile size and tiles per axis (tiles).
    region: the (z, y, x) slices the items came from (None = the whole image).
    """

    kind: str
    class_names: tuple[str, ...]
    centres: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    unknown: np.ndarray
    probabilities: np.ndarray
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    mask_source: Any = None
    tile: tuple[int, int, int] | None = None
    grid: tuple[int, int, int] | None = None
    region: tuple[slice, ...] | None = None
    stats: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """(N,) the class of each item: a class name or "unknown"."""
        return [UNKNOWN if u else self.class_names[int(p)]
                for p, u in zip(self.predicted, self.unknown, strict=True)]

    @property
    def values(self) -> np.ndarray:
        """(N,) int64 label value of each item's class: i + 1 for class i, C + 1 for unknown."""
        return np.where(self.unknown, len(self.class_names) + 1, self.predicted + 1)

    @property
    def legend(self) -> dict[int, str]:
        """{label value: class name} of the class-coloured layers (0 = background)."""
        return {0: "background", **{i + 1: n for i, n in enumerate(self.class_names)},
                len(self.class_names) + 1: UNKNOWN}

    def columns(self) -> list[str]:
        return ["z", "y", "x", *(["label"] if self.kind == "objects" else []), "class",
                "confidence"]

    def table(self) -> list[dict[str, Any]]:
        """One row per item in input order: z, y, x (voxels; an object's centroid), label
        (objects), class ("unknown" when rejected), confidence (0-1); plus unknown, score."""
        rows = []
        offset = np.array([s.start or 0 for s in self.region]) if self.region else np.zeros(3)
        for i, name in enumerate(self.classes):
            z, y, x = (float(v) for v in self.centres[i] + offset)
            row: dict[str, Any] = {"z": round(z, 2), "y": round(y, 2), "x": round(x, 2)}
            if self.kind == "objects":
                row["label"] = int(self.labels[i])
            row.update({"class": name, "confidence": round(float(self.confidence[i]), 4),
                        "unknown": bool(self.unknown[i])})
            if self.scores is not None:
                row["score"] = round(float(self.scores[i]), 4)
            rows.append(row)
        return rows

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`table` (the issue's columns) to ``path``, in input order."""
        return write_rows_csv(path, self.table(), self.columns())

    def class_map(self) -> Any:
        """The objects' labels with each object's value replaced by its class value (same
        shape; dask stays lazy), or for tiles the (nz, ny, nx) map of tile classes."""
        if self.kind == "tiles":
            return self.values.reshape(self.grid).astype(np.uint8)
        if self.kind != "objects":
            raise ValueError("points have no class map; see the points layer")
        top = int(max(int(self.labels.max()), 0))
        lut = np.zeros(top + 1, np.uint8)
        lut[self.labels] = self.values
        source = self.mask_source
        if hasattr(source, "map_blocks"):  # dask: stays lazy
            return source.map_blocks(lambda b: lut[np.clip(b, 0, top)], dtype=np.uint8)
        return lut[np.clip(np.asarray(source), 0, top)]

    def layers(self, name: str = "image", *, scale: Any = None,
               translate: Any = None) -> list[LayerData]:
        """napari layers: objects -> ``"{name} classes"`` (labels, one value per class,
        legend in its features and metadata) and ``"{name} class table"`` (points at the
        centroids with features label / class / confidence / unknown); points -> the points
        layer; tiles -> ``"{name} tile classes"`` (labels at tile resolution)."""
        geometry = self.geometry(scale, translate)
        legend = self.legend
        legend_features = {"index": list(legend), "class": list(legend.values())}
        meta = {"classes": {str(k): v for k, v in legend.items()}}
        out: list[LayerData] = []
        if self.kind == "tiles":
            s = np.asarray(geometry["scale"])
            tile_scale = tuple(float(v) for v in s * np.asarray(self.tile))
            shift = np.asarray(geometry["translate"]) + (np.asarray(self.tile) - 1) / 2 * s
            out.append((self.class_map(), {
                "name": f"{name} tile classes", "scale": tile_scale,
                "translate": tuple(float(v) for v in shift), "features": legend_features,
                "metadata": meta, "opacity": 0.5}, "labels"))
            return out
        if self.kind == "objects":
            out.append((self.class_map(), {"name": f"{name} classes", **geometry,
                                           "features": legend_features, "metadata": meta},
                        "labels"))
        rows = self.table()
        features = {key: [r[key] for r in rows] for key in rows[0] if key not in "zyx"}
        out.append((np.asarray(self.centres, float), {
            "name": f"{name} class table", **geometry, "features": features,
            "face_color": "class" if len(set(features["class"])) > 1 else "white",
            "size": 5, "metadata": meta, "visible": self.kind == "points"}, "points"))
        return out
