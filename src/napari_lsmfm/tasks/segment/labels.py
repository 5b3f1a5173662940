"""Brush strokes: the annotated voxels of a napari Labels layer, checked and sampled.

Brush convention (a Labels layer of the image's shape): 0 = not annotated,
1 = background, 2, 3, ... = structure classes. :class:`SparseLabels` keeps only the
painted voxels, so a few strokes on a whole brain stay small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["AXES", "BACKGROUND", "MAX_CLASSES", "MAX_CLASS_VALUE", "SparseLabels",
           "class_dtype"]

MAX_CLASSES = 64
BACKGROUND = 1
AXES = "zyx"
# The largest brush value a class map keeps (uint32, the widest labels napari and TIFF
# readers agree on).
MAX_CLASS_VALUE = 2**32 - 1


def class_dtype(values: Sequence[int]) -> np.dtype:
    """The smallest unsigned dtype holding every class value (uint8, uint16 or uint32):
    the dtype of a class map, so that a brush value is kept as painted. ValueError above
    :data:`MAX_CLASS_VALUE`."""
    top = max((int(v) for v in values), default=0)
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"class value {top} is larger than {MAX_CLASS_VALUE}, the largest a class "
                     "map (uint32) keeps; renumber the brushes (1 = background, 2, 3, ...)")


@dataclass(frozen=True)
class SparseLabels:
    """Validated brush strokes: the annotated voxels and their values.

    coords: (N, 3) int64 z, y, x of every annotated voxel; values: (N,) their brush
    values (1 = background, 2, 3, ... = classes); image_shape: (Z, Y, X).
    """

    coords: np.ndarray
    values: np.ndarray
    image_shape: tuple[int, int, int]

    @classmethod
    def from_array(cls, brushes: Any, image_shape: Sequence[int]) -> SparseLabels:
        """Read a brushes array (numpy, dask or zarr, the image's shape) and check it.

        Raises ValueError with what to do when: the shapes differ (strokes outside the
        image), values are not non-negative integers, nothing is painted, background (1)
        or every structure class (2, 3, ...) is missing.
        """
        image_shape = tuple(int(s) for s in image_shape)
        shape = tuple(int(s) for s in getattr(brushes, "shape", ()))
        if shape != image_shape:
            extra = ""
            if len(shape) == len(image_shape) and len(shape) == 3:
                outside = _count_outside(brushes, image_shape)
                if outside:
                    extra = f"; {outside} painted voxels lie outside the image"
            raise ValueError(
                f"the labels have shape {shape} but the image {image_shape}{extra}. Paint in a "
                "Labels layer made for this image (same shape, same scale)"
            )
        dtype = np.dtype(getattr(brushes, "dtype", np.int64))
        if dtype.kind == "b":
            raise ValueError(
                "the labels are a yes/no mask; paint background with 1 and each structure "
                "with 2, 3, ... (0 = not annotated)"
            )
        if dtype.kind not in "iuf":
            raise ValueError(f"the labels must be integers, got {dtype}")
        coords, values = [], []
        for z0, _z1, slab in _slabs(brushes):
            if dtype.kind == "f":
                if not np.isfinite(slab).all() or (slab != np.round(slab)).any():
                    raise ValueError(
                        "the labels hold fractions or NaN; they must be integers "
                        "(0 = not annotated, 1 = background, 2, 3, ... = classes)"
                    )
            if (slab < 0).any():
                raise ValueError(
                    "the labels hold negative values; use 0 = not annotated, 1 = background, "
                    "2, 3, ... = classes"
                )
            nz = np.nonzero(slab)
            if len(nz[0]):
                coords.append(np.stack(nz, 1).astype(np.int64) + [z0, 0, 0])
                values.append(slab[nz].astype(np.int64))
        if not coords:
            raise ValueError(
                "no strokes: paint a few slices first, background with label 1 and each "
                "structure with 2, 3, ..."
            )
        return cls._checked(np.concatenate(coords), np.concatenate(values), image_shape)

    @classmethod
    def from_points(
        cls, coords: Any, values: Any, image_shape: Sequence[int]
    ) -> SparseLabels:
        """Strokes as voxel coordinates (N, 3) z, y, x and values (N,); checked like from_array."""
        image_shape = tuple(int(s) for s in image_shape)
        coords = np.asarray(coords).reshape(-1, 3)
        values = np.asarray(values).reshape(-1)
        if len(coords) != len(values):
            raise ValueError(f"{len(coords)} coordinates but {len(values)} values")
        if len(coords) == 0:
            raise ValueError(
                "no strokes: paint a few slices first, background with label 1 and each "
                "structure with 2, 3, ..."
            )
        if not np.issubdtype(coords.dtype, np.integer):
            if (coords != np.round(coords)).any():
                raise ValueError("stroke coordinates must be whole voxels")
            coords = np.round(coords)
        coords = coords.astype(np.int64)
        outside = ((coords < 0) | (coords >= np.asarray(image_shape))).any(1)
        if outside.any():
            raise ValueError(
                f"{int(outside.sum())} painted voxels lie outside the image of shape "
                f"{image_shape}; paint inside the image"
            )
        if (values < 0).any() or (values != np.round(values)).any():
            raise ValueError(
                "stroke values must be integers >= 0 (0 = not annotated, 1 = background, "
                "2, 3, ... = classes)"
            )
        keep = values > 0
        return cls._checked(coords[keep], values[keep].astype(np.int64), image_shape)

    @classmethod
    def _checked(cls, coords: np.ndarray, values: np.ndarray, shape) -> SparseLabels:
        present = np.unique(values)
        classes = present[present >= 2]
        if len(present) == 0:
            raise ValueError(
                "no strokes: paint a few slices first, background with label 1 and each "
                "structure with 2, 3, ..."
            )
        if BACKGROUND not in present:
            raise ValueError(
                f"only structure strokes ({', '.join(map(str, classes))}) and no background: "
                "paint some background with label 1 too, so the model learns what to leave out"
            )
        if len(classes) == 0:
            raise ValueError(
                "only background (label 1) is painted, one class is not enough: paint the "
                "structure with label 2 (and further classes with 3, 4, ...)"
            )
        if len(classes) and int(classes[-1]) > MAX_CLASS_VALUE:
            raise ValueError(
                f"brush value {int(classes[-1])} is larger than {MAX_CLASS_VALUE}, the largest "
                "class value a class map (uint32) keeps; renumber the brushes (1 = "
                "background, 2, 3, ... = classes)"
            )
        if len(classes) > MAX_CLASSES:
            raise ValueError(
                f"{len(classes)} different label values: brushes use one value per class "
                f"(at most {MAX_CLASSES}); this looks like an instance image, not brush strokes"
            )
        return cls(coords, values, shape)

    @property
    def classes(self) -> tuple[int, ...]:
        """The structure classes painted (values >= 2), sorted."""
        return tuple(int(v) for v in np.unique(self.values) if v >= 2)

    @property
    def n_annotated(self) -> int:
        return int(len(self.values))

    @property
    def counts(self) -> dict[int, int]:
        """Annotated voxels per brush value."""
        vals, n = np.unique(self.values, return_counts=True)
        return {int(v): int(c) for v, c in zip(vals, n, strict=True)}

    @property
    def slices_used(self) -> tuple[str, tuple[int, ...]]:
        """The axis ("z", "y" or "x") whose planes hold the strokes most compactly, and
        those plane indices, e.g. ("z", (10, 24, 38)) for three painted z-slices."""
        best = None
        for a in range(3):
            planes = tuple(int(v) for v in np.unique(self.coords[:, a]))
            if best is None or len(planes) < len(best[1]):
                best = (AXES[a], planes)
        return best  # type: ignore[return-value]

    def targets(self, classes: Sequence[int]) -> np.ndarray:
        """Class index per annotated voxel: 0 for background, i for ``classes[i - 1]``;
        -1 for values not in ``classes``."""
        lut = {BACKGROUND: 0, **{int(c): i + 1 for i, c in enumerate(classes)}}
        present, inverse = np.unique(self.values, return_inverse=True)
        return np.array([lut.get(int(v), -1) for v in present], np.int64)[inverse]

    def subsample(self, n: int, seed: int = 0) -> SparseLabels:
        """At most ``n`` annotated voxels, drawn evenly from every value (a rare class
        keeps all its voxels); the same strokes when there are fewer."""
        if self.n_annotated <= n:
            return self
        rng = np.random.default_rng(seed)
        values, counts = np.unique(self.values, return_counts=True)
        quota = _fair_quota(counts, n)
        keep = [rng.choice(np.flatnonzero(self.values == v), q, replace=False)
                for v, q in zip(values, quota, strict=True)]
        idx = np.sort(np.concatenate(keep))
        return SparseLabels(self.coords[idx], self.values[idx], self.image_shape)

    def summary(self) -> str:
        axis, planes = self.slices_used
        counts = ", ".join(f"{v}: {n}" for v, n in self.counts.items())
        return (
            f"{self.n_annotated} annotated voxels on {len(planes)} {axis}-slices "
            f"(value: voxels {counts})"
        )


def _fair_quota(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` among groups of ``counts``: equal shares, the leftover of a small
    group going to the larger ones (water filling)."""
    quota = np.zeros(len(counts), np.int64)
    left = int(n)
    order = list(np.argsort(counts))
    while order:
        share = left // len(order)
        i = order[0]
        if counts[i] <= share:  # the smallest group fits whole
            quota[i] = counts[i]
            left -= int(counts[i])
            order.pop(0)
            continue
        quota[order] = share
        break
    return quota


def _slabs(array: Any, max_bytes: int = 64 * 2**20):
    """Yield (z0, z1, numpy slab) of a (Z, Y, X) numpy, dask or zarr array."""
    if isinstance(array, np.ndarray):
        yield 0, array.shape[0], array
        return
    plane = max(1, int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize)
    step = max(1, max_bytes // plane)
    for z0 in range(0, array.shape[0], step):
        z1 = min(z0 + step, array.shape[0])
        slab = array[z0:z1]
        slab = slab.compute() if hasattr(slab, "compute") else slab
        yield z0, z1, np.asarray(slab)


def _count_outside(brushes: Any, image_shape: Sequence[int]) -> int:
    total = 0
    for z0, _z1, slab in _slabs(brushes):
        nz = np.stack(np.nonzero(slab), 1) + [z0, 0, 0]
        total += int((nz >= np.asarray(image_shape)).any(1).sum())
    return total
