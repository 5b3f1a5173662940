"""Blocks of a large volume and the record of which are finished.

A :class:`BlockPlan` cuts a (Z, Y, X) volume into output blocks (whole Zarr chunks of
the output, so two workers never write the same chunk); each block is one unit of
work: predicted, skipped as empty, split into objects or relabelled on its own, in any
order, on any worker. A :class:`Ledger` records the blocks a phase has finished, one
small file per block inside the output store (written atomically, so workers on
several machines can record at once without a lock); a resumed run skips them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_BLOCK", "LEDGER_DIR", "BlockPlan", "Ledger"]

DEFAULT_BLOCK = (128, 256, 256)
LEDGER_DIR = ".lsmfm-blocks"


@dataclass(frozen=True)
class BlockPlan:
    """A (Z, Y, X) volume of ``shape`` cut into blocks of ``block`` voxels (the last
    block of an axis may be smaller). Blocks are numbered in C order (z slowest)."""

    shape: tuple[int, int, int]
    block: tuple[int, int, int]

    @classmethod
    def build(cls, shape: Sequence[int], block: Sequence[int] | int | None = None, *,
              chunks: Sequence[int] | None = None) -> BlockPlan:
        """A plan for ``shape``; ``block`` defaults to :data:`DEFAULT_BLOCK`, clipped to
        the volume and rounded up to whole ``chunks`` (the output's Zarr chunks)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"expected a (Z, Y, X) shape, got {shape}")
        if block is None:
            block = DEFAULT_BLOCK
        if isinstance(block, int):
            block = (block,) * 3
        block = [int(b) for b in block]
        if len(block) != 3 or min(block) < 1:
            raise ValueError(f"block must be three positive sizes (z, y, x), got {block}")
        if chunks is not None:
            block = [max(c, math.ceil(b / c) * c) for b, c in zip(block, chunks, strict=True)]
        return cls(shape, tuple(min(b, s) for b, s in zip(block, shape, strict=True)))

    @property
    def counts(self) -> tuple[int, int, int]:
        """Blocks per axis."""
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block, strict=True))

    def __len__(self) -> int:
        return math.prod(self.counts)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def position(self, index: int) -> tuple[int, int, int]:
        """The block's (iz, iy, ix) in the block grid."""
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        nz, ny, nx = self.counts
        return index // (ny * nx), (index // nx) % ny, index % nx

    def index(self, position: Sequence[int]) -> int:
        nz, ny, nx = self.counts
        iz, iy, ix = (int(p) for p in position)
        return (iz * ny + iy) * nx + ix

    def box(self, index: int) -> tuple[slice, slice, slice]:
        """The block's region of the volume."""
        pos = self.position(index)
        return tuple(slice(p * b, min((p + 1) * b, s))  # type: ignore[return-value]
                     for p, b, s in zip(pos, self.block, self.shape, strict=True))

    def expanded(self, index: int, halo: Sequence[int] | int) -> tuple[slice, slice, slice]:
        """The block's region grown by ``halo`` voxels on every side, clipped to the volume."""
        halo = (halo,) * 3 if isinstance(halo, int) else tuple(int(h) for h in halo)
        return tuple(slice(max(0, s.start - h), min(n, s.stop + h))  # type: ignore[return-value]
                     for s, h, n in zip(self.box(index), halo, self.shape, strict=True))

    def neighbours(self, index: int) -> list[int]:
        """The blocks sharing a face, an edge or a corner with this one (up to 26)."""
        pos = self.position(index)
        found = []
        for step in itertools.product((-1, 0, 1), repeat=3):
            if step == (0, 0, 0):
                continue
            other = [p + d for p, d in zip(pos, step, strict=True)]
            if all(0 <= o < c for o, c in zip(other, self.counts, strict=True)):
                found.append(self.index(other))
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "block": list(self.block)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> BlockPlan:
        return cls(tuple(record["shape"]), tuple(record["block"]))  # type: ignore[arg-type]


class Ledger:
    """Which blocks of ``phase`` are finished: ``<store>/.lsmfm-blocks/<phase>/<i>.json``,
    each written under a temporary name and renamed (atomic, lock-free across workers
    and machines sharing the store)."""

    def __init__(self, store: str | os.PathLike, phase: str) -> None:
        self.folder = Path(store) / LEDGER_DIR / phase
        self.phase = phase

    def mark(self, index: int, **info: Any) -> None:
        """Record block ``index`` as finished, with JSON-ready ``info`` (e.g. skipped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{index}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, self.folder / f"{index}.json")

    def done(self) -> set[int]:
        """The blocks recorded as finished."""
        if not self.folder.is_dir():
            return set()
        return {int(p.stem) for p in self.folder.glob("*.json") if p.stem.isdigit()}

    def info(self, index: int) -> dict[str, Any]:
        """What :meth:`mark` recorded for ``index`` ({} when not finished)."""
        try:
            return json.loads((self.folder / f"{index}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def records(self) -> dict[int, dict[str, Any]]:
        """Every finished block's record."""
        return {i: self.info(i) for i in sorted(self.done())}
