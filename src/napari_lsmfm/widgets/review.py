"""Review predictions dock widget: walk a prediction's objects, least certain first, and
accept, reject, relabel, merge or split them; undo / redo every decision.

A short form on :class:`~napari_lsmfm.widgets.base.TaskWidget` over a
:class:`~napari_lsmfm.review.ReviewSession` (all the logic is there): Start review
opens the session on the chosen prediction (its classes, probabilities and uncertainty
found by name, "{image} segmentation" ...), shows the reviewed labels as a new layer
"{prediction} reviewed" (the prediction layer itself is never changed) and fills the
table. Decisions are saved after each one next to the image's file (or where Start
asked); opening the same data again restores them. Keys (the dock or the reviewed
layer focused): A accept, R reject, L relabel, M merge, S split, N / P next / previous,
Ctrl+Z undo, Ctrl+Shift+Z redo. Click corrections, retraining, scores and export:
:class:`~napari_lsmfm.widgets.review_tools.ReviewTools`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import QCheckBox, QFileDialog, QFormLayout, QLabel, QPushButton, QWidget

from napari_lsmfm.engine.jobs import JobContext
from napari_lsmfm.widgets.base import TaskWidget
from napari_lsmfm.widgets.parts import int_spin, put_result_layer, row
from napari_lsmfm.widgets.review_inputs import (
    KEYS,
    PredictionCombo,
    bind_keys,
    follow_paint,
    session_inputs,
    source_file,
    split_stroke,
)
from napari_lsmfm.widgets.review_table import ObjectTable
from napari_lsmfm.widgets.review_tools import ReviewTools


class ReviewWidget(TaskWidget):
    """Review the objects of a prediction; every decision undoable and saved."""

    loss_curve = False
    foundation_line = False
    greeting = "Choose the prediction (a labels layer) and its image, then Start review."

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.session: Any = None
        self.layer: Any = None  # the reviewed labels layer
        self.source: Any = None  # the prediction layer (never written)
        self.state_path: str | None = None  # where decisions go (None: next to the image)
        self.pending_merge: int | None = None  # M with one row: merge the next row into it
        self.prediction_combo = PredictionCombo(napari_viewer, "Labels")
        self.image_combo.currentTextChanged.connect(self._prefer_instances)
        self._prefer_instances(self.image_combo.currentText())
        self.start_button = self.run_button("Start review", self.start)
        self.table = ObjectTable()
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.class_spin = int_spin(2, 65535, 2)
        self.class_spin.setToolTip("the class Relabel gives (2, 3, ... as brushed)")
        self.seeds_spin = int_spin(0, 64, 0)
        self.seeds_spin.setSpecialValueText("auto")
        self.seeds_spin.setToolTip("parts Split makes (auto: from the object's size)")
        self.only_box = QCheckBox("Show the selected object only", checked=True)
        self.only_box.toggled.connect(lambda *_: self._highlight(self.table.current_id()))
        buttons = {name: self._button(text, name) for name, text in (
            ("accept", "Accept (A)"), ("reject", "Reject (R)"), ("relabel", "Relabel (L)"),
            ("merge", "Merge (M)"), ("split", "Split (S)"), ("undo", "Undo"),
            ("redo", "Redo"), ("previous_object", "◀ Previous (P)"),
            ("next_object", "Next (N) ▶"))}
        self.buttons = buttons
        buttons["split"].setToolTip("along the last line drawn in a Shapes layer named "
                                    "'split line', else into 'parts' by a seeded watershed")
        buttons["undo"].setToolTip("Ctrl+Z")
        buttons["redo"].setToolTip("Ctrl+Shift+Z")
        self.tools = ReviewTools(self)
        self.idle_only(self.prediction_combo, *buttons.values())
        self.shortcuts = [QShortcut(QKeySequence(key), self, activated=getattr(self, name),
                                    context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
                          for key, name in KEYS.items()]

        form = QFormLayout()
        form.addRow("Prediction", self.prediction_combo)
        form.addRow("Image", self.image_combo)
        form.addRow("Ground truth", self.tools.truth_combo)
        self.set_layout(form, self.start_button, self.table, self.only_box,
                        row(buttons["previous_object"], buttons["next_object"]),
                        row(buttons["accept"], buttons["reject"], buttons["undo"],
                            buttons["redo"]),
                        row(buttons["relabel"], QLabel("class"), self.class_spin),
                        row(buttons["merge"], buttons["split"], QLabel("parts"),
                            self.seeds_spin), *self.tools.parts())
        self.update_buttons()

    def _button(self, text: str, method: str) -> QPushButton:
        button = QPushButton(text)
        button.clicked.connect(lambda *_: getattr(self, method)())
        return button

    def _prefer_instances(self, image: str) -> None:
        self.prediction_combo.preferred = f"{image} instances"
        if self.prediction_combo.preferred in self.viewer.layers:
            self.prediction_combo.refresh()
            self.prediction_combo.setCurrentText(self.prediction_combo.preferred)

    # ----------------------------------------------------------------- start
    def start(self) -> None:
        """Open a review session on the chosen prediction (what Start review does)."""
        prediction, image = self.prediction_combo.layer(), self.image_combo.layer()
        if prediction is None:
            self.say("Choose the prediction to review (a labels layer).", error=True)
            return
        inputs = session_inputs(self.viewer, prediction, image)
        data_file = next((p for p in map(source_file, (image, prediction)) if p), None)
        path = self.state_path or (None if data_file else self.ask_state())

        def job(ctx: JobContext) -> Any:
            # imported here: the review's click part needs torch (seconds to import)
            from napari_lsmfm.review import ReviewSession

            ctx.report(0.0, f"reading the objects of '{prediction.name}'")
            state = path or (data_file and ReviewSession.default_state_path(data_file))
            return ReviewSession(state_path=state, **inputs)

        self.start_job(job, "Opening the review", lambda s: self.opened(s, prediction, image))

    def ask_state(self) -> str | None:
        """Where to save the decisions (a dialog; None: cancelled, nothing saved)."""
        return QFileDialog.getSaveFileName(self, "Save the review's decisions in", "",
                                           "Review state (*.json)")[0] or None

    def opened(self, session: Any, prediction: Any, image: Any) -> None:
        """Show a new session: the reviewed layer (over the prediction) and the table."""
        if self.session is not None and self.session is not session:
            self.session.close()
        self.session, self.source, self.pending_merge = session, prediction, None
        self.layer = put_result_layer(
            self.viewer, f"{prediction.name} reviewed", session.labels, "labels",
            scale=prediction.scale[-3:], translate=prediction.translate[-3:])
        prediction.visible = False  # hidden, not changed: the reviewed layer is on top
        bind_keys(self.layer, self)
        follow_paint(self.layer, self)
        self.tools.opened(session, image)
        self.table.clear_objects()
        self.table.sync(session)
        where = (f"saved to {session.state_path} after each one"
                 if getattr(session, "state_path", None) else "NOT saved (no state file)")
        restored = f"{len(session.history)} earlier decisions restored; " if session.history \
            else ""
        self.say(f"{len(session.objects)} objects, least certain first. {restored}"
                 f"Decisions are {where}.")
        first = self.table.neighbour(None, 1, pending=True) or self.table.neighbour(None, 1)
        if first is not None:
            self.select(first)

    # ------------------------------------------------------------- decisions
    def _ready(self) -> bool:
        if self.session is None:
            self.say("Start review first.", error=True)
        elif self.busy:
            self.say("Wait for the running job to end.", error=True)
        return self.session is not None and not self.busy

    def decide(self, op: str, *args: Any, said: str = "", advance: bool = False,
               **kwargs: Any) -> bool:
        """Apply ``session.<op>(*args, **kwargs)`` and say ``said`` (``{out}``: what it
        returned); a refusal (ReviewError) only shows its message and returns False.
        The layer and the table show the change; ``advance``: on to the next undecided
        object."""
        from napari_lsmfm.review import ReviewError

        current = self.table.current_id()
        try:
            out = getattr(self.session, op)(*args, **kwargs)
        except ReviewError as exc:
            self.say(str(exc), error=True)
            return False
        self.changed()
        nxt = self.table.neighbour(current, 1, pending=True) if advance else None
        self.select(out[0] if op == "split" else nxt if nxt is not None else current)
        self.say(said.format(out=", ".join(map(str, out)) if op == "split" else out))
        return True

    def changed(self, region: Any = None) -> None:
        """The session changed: refresh the reviewed layer, the table and the scores."""
        if self.layer.data is not self.session.labels:
            self.layer.data = self.session.labels
        else:
            self.layer.refresh()
        self.table.sync(self.session)
        self.tools.changed()

    def _one(self, what: str) -> int | None:
        oid = self.table.current_id() if self._ready() else None
        if self.session is not None and not self.busy and oid is None:
            self.say(f"Select the object to {what} in the table.", error=True)
        return oid

    def accept(self) -> None:
        if (oid := self._one("accept")) is not None:
            self.decide("accept", oid, advance=True, said=f"Accepted {oid}.")

    def reject(self) -> None:
        if (oid := self._one("reject")) is not None:
            self.decide("reject", oid, advance=True,
                        said=f"Rejected {oid}: removed from the reviewed labels.")

    def relabel(self, cls: int | None = None) -> None:
        cls = int(self.class_spin.value() if cls is None else cls)
        if (oid := self._one("relabel")) is not None:
            self.decide("relabel", oid, cls, advance=True, said=f"{oid} is now class {cls}.")

    def merge(self) -> None:
        """Merge the two selected rows (the one clicked last into the other); with one
        selected, the next row selected merges into it (M again: cancelled)."""
        if not self._ready():
            return
        ids = self.table.selected_ids()
        if ids and ids == [self.pending_merge]:  # M again: no merge after all
            self.pending_merge = None
            self.say("Merge cancelled.")
        elif len(ids) == 1:
            self.pending_merge = ids[0]
            self.say(f"Select the object to merge into {ids[0]} (Ctrl+click or N / P).")
        elif len(ids) == 2:
            self._merge(ids[0], ids[1])
        else:
            self.say("Select the two objects to merge (Ctrl+click a second row).", error=True)

    def _merge(self, a: int, b: int) -> None:
        self.pending_merge = None
        self.decide("merge", a, b, said=f"Merged {b} into {a}.")

    def split(self) -> None:  # along the "split line" Shapes layer's last line, if any
        n, stroke = int(self.seeds_spin.value()) or None, split_stroke(self.viewer, self.layer)
        if (oid := self._one("split")) is not None:
            self.decide("split", oid, n=n, stroke=stroke, said=f"Split {oid} into {{out}}.")

    def undo(self) -> None:
        if self._ready():
            done = self.session.undo()
            if done:
                self.changed()
            self.say("Undone." if done else "Nothing to undo.")

    def redo(self) -> None:
        if self._ready():
            done = self.session.redo()
            if done:
                self.changed()
            self.say("Redone." if done else "Nothing to redo.")

    # ------------------------------------------------------------ navigation
    def next_object(self) -> None:
        self._walk(1)

    def previous_object(self) -> None:
        self._walk(-1)

    def _walk(self, step: int) -> None:
        if self.session is not None:
            oid = self.table.neighbour(self.table.current_id(), step)
            if oid is not None:
                self.select(oid, add=self.pending_merge is not None)

    def select(self, oid: int, *, add: bool = False) -> None:
        """Select ``oid``'s row: the camera goes to the object and it is highlighted."""
        if not self.table.select_id(oid, add=add):
            self.go_to(oid)  # not in the table (e.g. just rejected and filtered)

    def _on_selection(self) -> None:
        oid = self.table.current_id()
        if self.pending_merge is not None and oid is not None and oid != self.pending_merge:
            self._merge(self.pending_merge, oid)
            return
        if oid is not None:
            self.go_to(oid)

    def go_to(self, oid: int) -> None:
        """Centre the camera on object ``oid`` (and step to its z plane in 2D)."""
        if self.session is None or oid not in self.session.objects:
            return
        record = self.session.record(oid)
        world = np.asarray(record.centroid) * np.asarray(self.layer.scale[-3:]) + np.asarray(
            self.layer.translate[-3:])
        self.viewer.camera.center = tuple(float(v) for v in world)
        axis = self.viewer.dims.ndim - 3
        if self.viewer.dims.ndisplay == 2:
            self.viewer.dims.set_point(axis, float(world[0]))
        self._highlight(oid)

    def _highlight(self, oid: int | None) -> None:
        if self.layer is None or oid is None:
            return
        self.layer.selected_label = int(oid)
        self.layer.show_selected_label = self.only_box.isChecked()
