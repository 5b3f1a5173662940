"""The object table of a review: one :class:`ObjectRecord` per object, computed block by
block, so a lazily loaded (dask / zarr) prediction larger than memory is read a block at
a time and only the per-object sums are kept.

Per object: voxels, volume (um^3), centroid and bounding box (voxels), class (majority of
the class map), confidence (mean of the largest class probability inside the object)
and mean uncertainty.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = ["DEFAULT_CLASS", "STATUSES", "Box", "ObjectRecord", "ObjectTable", "ReviewError",
           "as_numpy", "box_of", "box_union", "iter_blocks", "record_from_dict"]

STATUSES = ("pending", "accepted", "rejected", "corrected")
DEFAULT_CLASS = 2  # the first structure class of the brush convention
Box = tuple[slice, slice, slice]


class ReviewError(ValueError):
    """A refused review step: the message says what was wrong and what to do; nothing
    changed (labels, table, history and the state file are as they were)."""


@dataclass
class ObjectRecord:
    """One row of the review table.

    id: the object's label value; cls: its class (brush value 2, 3, ...); voxels: its
    size in voxels; volume_um3: in cubic micrometres; centroid: (z, y, x) in voxels;
    bbox: three slices (z, y, x) holding it; confidence: mean largest class probability
    inside it (None without probabilities); uncertainty: mean uncertainty inside it
    (None without an uncertainty map); status: pending / accepted / rejected / corrected.
    """

    id: int
    cls: int
    voxels: int
    volume_um3: float
    centroid: tuple[float, float, float]
    bbox: Box
    confidence: float | None = None
    uncertainty: float | None = None
    status: str = "pending"

    def to_dict(self) -> dict:
        """A JSON-ready dict (bbox as [[start, stop], ...])."""
        out = asdict(self)
        out["bbox"] = [[s.start, s.stop] for s in self.bbox]
        out["centroid"] = list(self.centroid)
        return out

    def copy(self, **changes: Any) -> ObjectRecord:
        return replace(self, **changes)


def record_from_dict(d: Mapping[str, Any]) -> ObjectRecord:
    """The inverse of :meth:`ObjectRecord.to_dict`."""
    d = dict(d)
    d["bbox"] = tuple(slice(int(a), int(b)) for a, b in d["bbox"])
    d["centroid"] = tuple(float(c) for c in d["centroid"])
    return ObjectRecord(**d)


# ------------------------------------------------------------------------ boxes


def box_union(*boxes: Box | None) -> Box | None:
    """The smallest box holding every given box (None ones skipped); None if none."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes))
                 for a in range(3))  # type: ignore[return-value]


def box_of(mask: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> Box | None:
    """The bounding box of the True voxels of ``mask`` (shifted by ``offset``); None when
    there are none."""
    box = []
    for a in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(i for i in range(3) if i != a)))
        if not len(hit):
            return None
        box.append(slice(int(hit[0]) + offset[a], int(hit[-1]) + 1 + offset[a]))
    return tuple(box)  # type: ignore[return-value]


def as_numpy(array: Any, box: Box | None = None) -> np.ndarray:
    """``array[box]`` (numpy, dask or zarr) read into memory: a copy, never a view."""
    part = array if box is None else array[box]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.array(part) if isinstance(part, np.ndarray) else np.asarray(part)


def iter_blocks(shape: Sequence[int], block: Sequence[int],
                box: Box | None = None) -> Iterator[Box]:
    """The boxes of a grid of ``block``-sized blocks covering ``box`` (all of ``shape``)."""
    box = box or tuple(slice(0, int(n)) for n in shape)
    ranges = [range(b.start, b.stop, max(1, int(s))) for b, s in zip(box, block, strict=True)]
    for corner in itertools.product(*ranges):
        yield tuple(slice(c, min(c + int(s), b.stop))
                    for c, s, b in zip(corner, block, box, strict=True))  # type: ignore[misc]


# ------------------------------------------------------------------------ table

_FIELDS = ("n", "sz", "sy", "sx", "z0", "y0", "x0", "z1", "y1", "x1", "conf", "unc")


class ObjectTable:
    """Per-object statistics of instance labels, read block by block.

    classes: optional (Z, Y, X) class map; probabilities: optional (C, Z, Y, X) (float, or
    uint8 with 255 = 1) and channel_values (class value of each channel);
    uncertainty: optional (Z, Y, X). All numpy, dask or zarr.
    """

    def __init__(self, shape: Sequence[int], *, classes: Any = None, probabilities: Any = None,
                 channel_values: Sequence[int] = (), uncertainty: Any = None,
                 voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                 block: Sequence[int] = (64, 256, 256)) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.classes = classes
        self.probabilities = probabilities
        self.channel_values = tuple(int(v) for v in channel_values)
        self.uncertainty = uncertainty
        self.voxel_um3 = float(math.prod(float(v) for v in voxel_size))
        self.block = tuple(int(b) for b in block)

    def scan(self, labels: Any, box: Box | None = None, ids: Sequence[int] | None = None,
             each: Callable[[Box, np.ndarray], None] | None = None) -> dict[int, ObjectRecord]:
        """Records (status pending) of the objects of ``labels`` inside ``box`` (all of
        it), only ``ids`` when given; a record is exact when its object lies inside
        ``box``. ``each(block_box, block)`` sees every block read (to copy or check it).
        ReviewError on negative labels."""
        sums: dict[str, list[np.ndarray]] = {k: [] for k in ("id", *_FIELDS)}
        votes: list[np.ndarray] = []
        wanted = None if ids is None else np.asarray(sorted(int(i) for i in ids), np.int64)
        for sub in iter_blocks(self.shape, self.block, box):
            lab = as_numpy(labels, sub)
            if lab.dtype.kind == "i" and lab.size and lab.min() < 0:
                raise ReviewError(
                    "the labels hold negative values; instance labels must be 0 (background) "
                    "and 1, 2, ... (one id per object): choose an instance labels layer")
            if each is not None:
                each(sub, lab)
            self._block_sums(lab, sub, wanted, sums, votes)
        return self._records(sums, votes)

    def _block_sums(self, lab: np.ndarray, sub: Box, wanted, sums, votes) -> None:
        fg = lab != 0
        if wanted is not None:
            fg &= np.isin(lab, wanted)
        if not fg.any():
            return
        coords = np.nonzero(fg)
        ids, inv = np.unique(lab[coords], return_inverse=True)
        n = np.bincount(inv, minlength=len(ids)).astype(np.float64)
        sums["id"].append(ids.astype(np.int64))
        sums["n"].append(n)
        for a, name in enumerate("zyx"):
            c = coords[a] + sub[a].start
            sums["s" + name].append(np.bincount(inv, c, minlength=len(ids)))
            lo = np.full(len(ids), np.iinfo(np.int64).max)
            hi = np.full(len(ids), -1)
            np.minimum.at(lo, inv, c)
            np.maximum.at(hi, inv, c)
            sums[name + "0"].append(lo.astype(np.float64))
            sums[name + "1"].append(hi.astype(np.float64) + 1)
        for key, source in (("conf", self.probabilities), ("unc", self.uncertainty)):
            if source is None:
                sums[key].append(np.full(len(ids), np.nan))
                continue
            values = self._confidence(sub) if key == "conf" else as_numpy(source, sub)
            sums[key].append(np.bincount(inv, values[coords].astype(np.float64),
                                         minlength=len(ids)))
        if self.classes is not None:
            cls = as_numpy(self.classes, sub)[coords]
            values, cinv = np.unique(cls, return_inverse=True)
            code = inv.astype(np.int64) * len(values) + cinv
            pairs, count = np.unique(code, return_counts=True)
            votes.append(np.stack([ids[pairs // len(values)].astype(np.int64),
                                   values[pairs % len(values)].astype(np.int64), count], 1))

    def _confidence(self, sub: Box) -> np.ndarray:
        probs = as_numpy(self.probabilities, (slice(None), *sub))
        top = probs.max(axis=0).astype(np.float32)
        return top / 255.0 if probs.dtype == np.uint8 else top

    def _records(self, sums, votes) -> dict[int, ObjectRecord]:
        if not sums["id"]:
            return {}
        every = {k: np.concatenate(v) for k, v in sums.items()}
        ids, inv = np.unique(every["id"], return_inverse=True)
        total = {}
        for key in ("n", "sz", "sy", "sx", "conf", "unc"):
            total[key] = np.bincount(inv, every[key], minlength=len(ids))
        for key in ("z0", "y0", "x0"):
            total[key] = np.full(len(ids), np.inf)
            np.minimum.at(total[key], inv, every[key])
        for key in ("z1", "y1", "x1"):
            total[key] = np.full(len(ids), -np.inf)
            np.maximum.at(total[key], inv, every[key])
        cls_of = _majority(votes)
        records = {}
        for i, oid in enumerate(ids.tolist()):
            n = total["n"][i]
            conf, unc = total["conf"][i] / n, total["unc"][i] / n
            records[oid] = ObjectRecord(
                id=int(oid), cls=cls_of.get(oid, DEFAULT_CLASS), voxels=int(n),
                volume_um3=float(n * self.voxel_um3),
                centroid=tuple(float(total["s" + a][i] / n) for a in "zyx"),
                bbox=tuple(slice(int(total[a + "0"][i]), int(total[a + "1"][i]))
                           for a in "zyx"),
                confidence=None if np.isnan(conf) else float(conf),
                uncertainty=None if np.isnan(unc) else float(unc),
            )
        return records


def _majority(votes: list[np.ndarray]) -> dict[int, int]:
    """The most voted class of each object (the smaller class on a tie); class 0 (no
    class under the object) loses to any other."""
    if not votes:
        return {}
    v = np.concatenate(votes)
    code = v[:, 0] * (int(v[:, 1].max()) + 1) + v[:, 1]
    codes, inv = np.unique(code, return_inverse=True)
    count = np.bincount(inv, v[:, 2])
    oid, cls = codes // (int(v[:, 1].max()) + 1), codes % (int(v[:, 1].max()) + 1)
    count = np.where(cls == 0, -1, count)  # class 0 only where nothing else votes
    best: dict[int, tuple[float, int]] = {}
    for o, c, k in zip(oid.tolist(), cls.tolist(), count.tolist(), strict=True):
        if o not in best or k > best[o][0]:
            best[o] = (k, c)
    return {o: (c if c else DEFAULT_CLASS) for o, (k, c) in best.items()}
