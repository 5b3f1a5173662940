"""Undo / redo of review decisions within a memory budget.

A :class:`Change` keeps only the bounding box a decision changed (labels before and
after inside it) and the table rows it touched, never a whole volume. :class:`History`
holds the undo and redo stacks; beyond ``budget_bytes`` the oldest changes are dropped
(they can no longer be undone, but stay in the saved state).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .objects import Box, ObjectRecord

__all__ = ["Change", "History"]


@dataclass
class Change:
    """One decision. op: accept / reject / relabel / merge / split / click; ids: the
    objects it names; cls: the class given (relabel) or None; box: the region whose labels
    changed (None: only the table); before / after: the labels in ``box``;
    rows_before / rows_after: the table rows touched (None = no such row);
    samples: (coords (N, 3), values (N,)) training voxels it adds (brush convention);
    point / positive: the click of a click correction."""

    op: str
    ids: list[int]
    cls: int | None = None
    box: Box | None = None
    before: np.ndarray | None = None
    after: np.ndarray | None = None
    rows_before: dict[int, ObjectRecord | None] = field(default_factory=dict)
    rows_after: dict[int, ObjectRecord | None] = field(default_factory=dict)
    samples: tuple[np.ndarray, np.ndarray] | None = None
    point: tuple[int, int, int] | None = None
    positive: bool | None = None
    time: float = field(default_factory=time.time)
    version: int = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.before, self.after) if a is not None)

    def entry(self) -> dict[str, Any]:
        """The decision as the history and the state file list it."""
        out: dict[str, Any] = {"op": self.op, "ids": [int(i) for i in self.ids], "cls": self.cls,
                               "time": self.time, "version": self.version}
        if self.point is not None:
            out["point"] = [int(p) for p in self.point]
            out["positive"] = bool(self.positive)
        if self.box is not None:
            out["box"] = [[s.start, s.stop] for s in self.box]
        return out


class History:
    """Undo and redo stacks of :class:`Change`, at most ``budget_bytes`` of labels kept."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"undo_budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.done: list[Change] = []
        self.undone: list[Change] = []  # the last undone last
        self.dropped = 0  # changes dropped for the budget

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.done) + sum(c.nbytes for c in self.undone)

    def push(self, change: Change) -> None:
        """A new decision: kept for undo; the redo stack is cleared."""
        self.undone.clear()
        self.done.append(change)
        self.fit_budget()

    def pop_undo(self) -> Change | None:
        if not self.done:
            return None
        change = self.done.pop()
        self.undone.append(change)
        return change

    def pop_redo(self) -> Change | None:
        if not self.undone:
            return None
        change = self.undone.pop()
        self.done.append(change)
        return change

    def fit_budget(self) -> None:
        """Drop the oldest undo entries, then the farthest redo entries, until the kept
        labels fit the budget."""
        while self.nbytes > self.budget_bytes and (self.done or self.undone):
            if self.done:
                self.done.pop(0)
            else:
                self.undone.pop(0)
            self.dropped += 1
