"""The :class:`ReviewSession`: an expert's review of a prediction, from Python or the
widget. Decisions (accept, reject, relabel, merge, split, click) change a working copy of
the labels, are undoable within a memory budget (:mod:`.history`), saved after every one
(:mod:`.state`), and become training labels (:mod:`.training`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import decisions, training
from .export import export_labels, export_table
from .history import Change, History
from .objects import (
    Box,
    ObjectRecord,
    ObjectTable,
    ReviewError,
    as_numpy,
    box_union,
)
from .state import StateFile, default_state_path, fingerprint
from .working import WorkingLabels, check_inputs

__all__ = ["ReviewSession"]


class ReviewSession:
    """Review of instance ``labels`` (Z, Y, X; numpy, dask or zarr; 0 = background).

    The caller's arrays are never written: :attr:`labels` is a working copy (numpy for
    numpy input; for lazy input a zarr store beside ``state_path``, else in a temporary
    folder). ``classes``: class map (brush values 2, 3, ...) giving each object's class
    by majority (without it: class 2). ``probabilities`` (C, Z, Y, X) with
    ``channel_values``, and ``uncertainty`` (Z, Y, X) give each object's confidence and
    mean uncertainty. ``image``: only for the data fingerprint. ``state_path``: a JSON
    file, saved after every decision; reopened when it matches this data and prediction,
    ReviewError when it does not. ``voxel_size`` (z, y, x) in micrometres;
    ``undo_budget_bytes``: labels kept for undo; ``block``: the reading block (voxels).
    Every refusal is a ReviewError saying what to do, with nothing changed.
    """

    def __init__(self, labels: Any, *, image: Any = None, classes: Any = None,
                 probabilities: Any = None, channel_values: Sequence[int] = (),
                 uncertainty: Any = None, class_names: Mapping[int, str] | None = None,
                 voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                 state_path: str | os.PathLike | None = None, model_fingerprint: str = "",
                 undo_budget_bytes: int = 256 * 2**20,
                 block: Sequence[int] = (64, 256, 256)) -> None:
        self.shape, self.voxel_size, block = check_inputs(
            labels, image, classes, probabilities, channel_values, uncertainty, voxel_size,
            block)
        self.original = labels
        self.class_names = dict(class_names or {})
        self.model_fingerprint = str(model_fingerprint)
        self.table = ObjectTable(self.shape, classes=classes, probabilities=probabilities,
                                 channel_values=channel_values, uncertainty=uncertainty,
                                 voxel_size=self.voxel_size, block=block)
        self._undo = History(undo_budget_bytes)
        self._state = StateFile(state_path) if state_path is not None else None
        self.data_fingerprint = fingerprint(image) if image is not None else None
        self.prediction_fingerprint = fingerprint(labels, classes)
        doc = self._state.read() if self._state is not None else None
        if doc is not None:
            self._state.check(doc, self.data_fingerprint, self.prediction_fingerprint)
        near = None if self._state is None else self._state.path.with_suffix(".labels.zarr")
        self._work = WorkingLabels(labels, block, near)
        try:
            self.objects: dict[int, ObjectRecord] = self.table.scan(labels, each=self._work.fill)
        except BaseException:
            self._work.abort()
            raise
        self.labels = self._work.array
        self.next_id = max(self.objects, default=0) + 1  # the id a new object gets
        self._entries: list[dict] = []
        self._samples: list[tuple[np.ndarray, np.ndarray] | None] = []
        self._applied = 0
        self.version = 0
        if doc is not None:
            self._replay(doc)

    # ---------------------------------------------------------------- reading

    def record(self, id: int) -> ObjectRecord:
        """The table row of object ``id``; ReviewError for an unknown id."""
        try:
            return self.objects[int(id)]
        except (KeyError, TypeError, ValueError):
            raise ReviewError(f"there is no object {id} in the labels; pick one from the "
                              "table") from None

    def queue(self, key: str = "confidence", ascending: bool = True,
              status: str | Collection[str] | None = None) -> list[int]:
        """Object ids sorted by ``key`` (a record field; "confidence" falls back to
        1 - uncertainty, then to the id, so the least certain come first), only those of
        ``status`` (one or several) when given; objects without the value come last."""
        return training.ranked(self.objects.values(), key, ascending, status)

    @property
    def history(self) -> list[dict]:
        """The decisions in force, in order: op, ids, cls, time, version (and point,
        positive for a click; box for a change of labels)."""
        return [dict(e) for e in self._entries[:self._applied]]

    @property
    def clicks(self) -> list[tuple[tuple[int, int, int], bool]]:
        """The click corrections in force: ((z, y, x), positive)."""
        return [(tuple(e["point"]), bool(e["positive"])) for e in self.history
                if e["op"] == "click"]

    @property
    def corrections(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The training voxels the decisions in force add, in order: (coords (N, 3),
        values (N,)) each (rejections: background 1; clicks: the voxels changed)."""
        return [s for s in self._samples[:self._applied] if s is not None]

    @property
    def can_undo(self) -> bool:
        return bool(self._undo.done)

    @property
    def can_redo(self) -> bool:
        return bool(self._undo.undone)

    @property
    def state_path(self) -> Path | None:
        return None if self._state is None else self._state.path

    # -------------------------------------------------------------- decisions

    def _live(self, id: int) -> ObjectRecord:
        rec = self.record(id)
        if rec.status == "rejected":
            raise ReviewError(f"object {rec.id} was rejected; undo the rejection to bring "
                              "it back first")
        return rec

    def accept(self, id: int) -> None:
        """Mark object ``id`` correct (its class becomes training labels)."""
        rec = self._live(id)
        self._commit(Change("accept", [rec.id], rows_before={rec.id: rec},
                            rows_after={rec.id: rec.copy(status="accepted")}))

    def reject(self, id: int) -> None:
        """Remove object ``id`` from the labels (its voxels become 0, and background
        training labels)."""
        rec = self._live(id)
        before = as_numpy(self.labels, rec.bbox)
        inside = before == rec.id
        after = np.where(inside, 0, before).astype(before.dtype)
        samples = training.sample_voxels(inside, rec.bbox, 1, seed=rec.id)
        self._commit(Change("reject", [rec.id], box=rec.bbox, before=before, after=after,
                            rows_before={rec.id: rec},
                            rows_after={rec.id: rec.copy(status="rejected")},
                            samples=samples))

    def relabel(self, id: int, cls: int) -> None:
        """Give object ``id`` the class ``cls`` (a brush value 2, 3, ...)."""
        rec = self._live(id)
        if isinstance(cls, bool) or not isinstance(cls, int | np.integer) or cls < 2:
            raise ReviewError(f"a class is a brush value 2, 3, ... (1 is background: reject "
                              f"the object instead), got {cls!r}")
        self._commit(Change("relabel", [rec.id], cls=int(cls), rows_before={rec.id: rec},
                            rows_after={rec.id: rec.copy(cls=int(cls), status="corrected")}))

    def merge(self, a: int, b: int) -> int:
        """Object ``b``'s voxels become ``a``; returns ``a``."""
        ra, rb = self._live(a), self._live(b)
        if ra.id == rb.id:
            raise ReviewError(f"a merge needs two different objects, got {ra.id} twice; pick "
                              "a second object to merge into it")
        box = box_union(ra.bbox, rb.bbox)
        before = as_numpy(self.labels, box)
        after = np.where(before == rb.id, ra.id, before).astype(before.dtype)
        rows = decisions.rows_of(self.table, after, box, [ra.id], "corrected", ra.cls)
        self._commit(Change("merge", [ra.id, rb.id], box=box, before=before, after=after,
                            rows_before={ra.id: ra, rb.id: rb}, rows_after={**rows, rb.id: None}))
        return ra.id

    def split(self, id: int, *, stroke: Any = None, n: int | None = None) -> list[int]:
        """Split object ``id``: along ``stroke`` ((N, 3) voxel coordinates z, y, x of a
        line across it; a line drawn on one slice cuts through every slice), else by a
        seeded watershed with ``n`` seeds (default: its size in median objects, at least
        2). Returns the ids of the parts, ``id`` (the largest) first."""
        change = decisions.split_change(self, self._live(id), stroke, n)
        self._commit(change)
        return change.ids

    def click(self, point: Sequence[float], positive: bool, corrector: Any) -> Box:
        """A click correction at voxel ``point`` (z, y, x): ``corrector.correct(self,
        point, positive)`` names a region and the foreground it predicts there; only that
        region changes (:func:`.edits.apply_click`), and the changed voxels become
        training labels. Returns the region."""
        change, region = decisions.click_change(self, point, bool(positive), corrector)
        self._commit(change)
        return region

    def paint(self, box: Sequence[slice], painted: Any) -> None:
        """Labels corrected by hand: ``painted``, the labels of ``box`` (three slices) as
        the expert left them (0, an object's id or a new one); its voxels train as painted."""
        self._commit(decisions.paint_change(self, box, painted))

    def _apply(self, box: Box | None, data: np.ndarray | None, rows: Mapping) -> None:
        if box is not None:
            self._work.write(box, data)
        for i, rec in rows.items():
            if rec is None:
                self.objects.pop(i, None)
            else:
                self.objects[i] = rec.copy()
                self.next_id = max(self.next_id, i + 1)

    def _commit(self, change: Change) -> None:
        change.version = self.version + 1
        entry = change.entry()
        if self._state is not None:  # the patch first: the JSON only names finished ones
            entry["patch"] = self._state.write_patch(self._applied, change)
        self._apply(change.box, change.after, change.rows_after)
        self.version = change.version
        del self._entries[self._applied:], self._samples[self._applied:]
        self._entries.append(entry)
        self._samples.append(change.samples)
        self._applied += 1
        self._undo.push(change)
        self._autosave()

    def undo(self) -> bool:
        """Undo the last decision in force; False when none is kept."""
        change = self._undo.pop_undo()
        if change is None:
            return False
        self._apply(change.box, change.before,
                    training.current_scores(self, change.rows_before, change.box, change.before))
        self._applied -= 1
        self.version += 1
        self._autosave()
        return True

    def redo(self) -> bool:
        """Redo the last undone decision; False when none is kept."""
        change = self._undo.pop_redo()
        if change is None:
            return False
        self._apply(change.box, change.after,
                    training.current_scores(self, change.rows_after, change.box, change.after))
        self._applied += 1
        self.version += 1
        self._autosave()
        return True

    # ---------------------------------------------------------------- on disk

    def _autosave(self) -> None:
        if self._state is not None:
            self.save()
            self._state.remove_patches_from(len(self._entries))

    def save(self) -> Path:
        """Write the state JSON atomically (done after every decision); returns its path."""
        if self._state is None:
            raise ReviewError("this review has no state file; open it with state_path= "
                              "(ReviewSession.default_state_path(image_path)) to save it")
        return self._state.write(data=self.data_fingerprint,
                                 prediction=self.prediction_fingerprint,
                                 model=self.model_fingerprint, shape=self.shape,
                                 entries=self._entries, applied=self._applied,
                                 version=self.version)

    def _replay(self, doc: dict) -> None:
        entries, applied = list(doc.get("decisions", [])), int(doc.get("applied", 0))
        undone = []
        for i, entry in enumerate(entries):
            change = self._state.read_patch(entry)
            if i < applied:
                self._apply(change.box, change.after, training.current_scores(
                    self, change.rows_after, change.box, change.after))
                self._undo.push(change)  # keeps the newest within the budget
            else:
                undone.append(change)
            self._samples.append(change.samples)
        self._undo.undone.extend(reversed(undone))
        self._undo.fit_budget()
        self._entries, self._applied = entries, applied
        self.version = int(doc.get("version", 0))

    @staticmethod
    def default_state_path(image_path: str | os.PathLike) -> Path:
        """``<stem>.lsmfm-review.json`` next to the data."""
        return default_state_path(image_path)

    def close(self) -> None:
        """Remove a temporary working copy (lazy input without a state path)."""
        self._work.close()

    # ------------------------------------------------------ training and output

    def training_labels(self, per_object: int = training.PER_OBJECT) -> Any:
        """The review as sparse training labels (SparseLabels, brush convention): accepted
        and corrected objects = their class, rejected = 1, clicked voxels as given; at most
        ``per_object`` voxels per object or decision, so a big volume stays small."""
        return training.training_labels(self, per_object)

    def rescore(self, probabilities: Any = None, channel_values: Sequence[int] = (),
                uncertainty: Any = None) -> None:
        """New confidences / uncertainties (e.g. after a retrain) for every object."""
        training.rescore(self, probabilities, channel_values, uncertainty)

    def retrain(self, segmenter: Any, image: Any, strokes: Any = None, ctx: Any = None
                ) -> dict:
        """Fit ``segmenter`` on ``strokes`` (SparseLabels or brush array) plus the review's
        training labels, predict ``image`` again and rescore. Returns {"fit", "version",
        "result", "n_annotated"}."""
        return training.retrain(self, segmenter, image, strokes, ctx)

    def scores(self, truth: Any) -> dict:
        """{"before": ..., "after": ...}: foreground dice and per-object precision, recall
        and f1 at IoU 0.5 of the original and the reviewed labels against ``truth``."""
        return training.scores(self, truth)

    def export_labels(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """The reviewed labels as OME-TIFF (.tif) or OME-Zarr (.zarr); returns the path."""
        return export_labels(path, self.labels, self.voxel_size, overwrite=overwrite)

    def export_table(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """One CSV row per object (rejected ones with status "rejected"); returns the path."""
        rows = [self.objects[i] for i in sorted(self.objects)]
        return export_table(path, rows, self.class_names, overwrite=overwrite)

