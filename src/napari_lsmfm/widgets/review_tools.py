"""The review widget's lower half: click corrections, retraining with the corrections,
scores against a ground truth and export (all of it runs through the session).

- Click corrections (on: a left click on the reviewed layer adds to the object there,
  Shift+click removes): each click is a job, ``session.click(point, positive,
  corrector)`` with a :class:`~napari_lsmfm.review.ClickCorrector` over the viewer's
  fitted segmentation model (the one the Few-shot segmentation widget shares in the
  viewer's :class:`~napari_lsmfm.widgets.state.FoundationSlot`); clicks made while one
  runs wait their turn.
- Retrain with corrections: ``session.retrain`` in a job (Stop keeps the best model), the
  table re-ranked after it.
- Scores (a ground-truth layer chosen): Dice, precision, recall and F1 before and after
  the review, updated after each decision.
- Export labels (OME-TIFF / OME-Zarr) and the table (CSV); an existing file is replaced
  only when the user says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QFileDialog, QMessageBox, QPushButton, QWidget

from napari_lsmfm.engine.jobs import JobContext
from napari_lsmfm.widgets.layout import plain_label
from napari_lsmfm.widgets.parts import follow, image_data, row, subform
from napari_lsmfm.widgets.review_inputs import OptionalLayerCombo, click_callback
from napari_lsmfm.widgets.segment_form import fit_summary

SCORE_DELAY_MS = 300  # scores once the decisions pause
NO_MODEL = ("Click corrections and retraining need a trained segmentation model: train one "
            "in the Few-shot segmentation widget of this viewer (quick mode) first.")
EXPORTS = {"labels": ("Export reviewed labels", "OME-TIFF (*.ome.tif);;OME-Zarr (*.ome.zarr)"),
           "table": ("Export the object table", "CSV (*.csv)")}


class ReviewTools:
    """Clicks, retraining, scores and export for a :class:`ReviewWidget` (``owner``)."""

    def __init__(self, owner: Any) -> None:
        self.owner, viewer = owner, owner.viewer
        self.segmenter: Any = None  # a Segmenter to use; None: the viewer's shared one
        self.corrector: Any = None
        self.image: Any = None  # the image layer of the session
        self.pending: list[tuple[tuple[float, ...], bool]] = []  # clicks waiting their turn
        self.truth_combo = OptionalLayerCombo(viewer, "Labels")
        self.truth_combo.currentTextChanged.connect(lambda *_: self.show_scores())
        self.brushes_combo = OptionalLayerCombo(viewer, "Labels")
        self.brushes_combo.setToolTip("the strokes the model was trained on (retraining "
                                      "keeps them; none: the corrections alone)")
        self.click_box = QCheckBox("Click corrections (Shift+click: remove)")
        self.click_box.setToolTip("a click on the reviewed layer (2D) adds the model's object "
                                  "there; Shift+click removes; nothing changes far from it")
        self.click_box.toggled.connect(self.set_clicking)
        self.retrain_button = owner.run_button("Retrain with corrections", self.retrain)
        self.scores_label = plain_label()
        self.export_buttons = []
        for kind, (text, _) in EXPORTS.items():
            button = QPushButton(text.replace("Export the object", "Export") + "…")
            button.clicked.connect(lambda *_, k=kind: self.ask_export(k))
            self.export_buttons.append(button)
        owner.idle_only(self.truth_combo, self.brushes_combo, *self.export_buttons)
        self.timer = QTimer(owner, singleShot=True, interval=SCORE_DELAY_MS)
        self.timer.timeout.connect(self.show_scores)
        owner.runner.finished.connect(lambda: QTimer.singleShot(0, self._next_click))
        follow(owner, owner.slot.task_model_changed, self._on_model)

    def parts(self) -> list[QWidget]:
        box = QWidget()
        form = subform(box)
        form.addRow("Strokes", self.brushes_combo)
        return [self.click_box, box, self.retrain_button, self.scores_label,
                row(*self.export_buttons)]

    def opened(self, session: Any, image: Any) -> None:
        self.image, self.corrector, self.pending = image, None, []
        if self.click_box.isChecked():
            self.set_clicking(True)
        self.show_scores()

    def changed(self) -> None:
        self.timer.start()

    def model(self) -> Any:
        """The fitted Segmenter clicks and retraining use (None: there is none)."""
        model = self.segmenter or self.owner.slot.task_model("segment")[0]
        return model if model is not None and getattr(model, "trained", False) else None

    def _on_model(self, task: str) -> None:
        if task == "segment" and self.click_box.isChecked() and self.model() is not None:
            name = self.owner.slot.task_model("segment")[1]
            self.owner.say("Click corrections use the segmentation model" + (
                f" trained on '{name}'." if name else "."))

    # ---------------------------------------------------------------- clicks
    def set_clicking(self, on: bool) -> None:
        """Turn click corrections on the reviewed layer on or off."""
        layer = self.owner.layer
        if layer is None:
            return
        callbacks = layer.mouse_drag_callbacks
        for cb in [cb for cb in callbacks if getattr(cb, "review_clicks", False)]:
            callbacks.remove(cb)
        if on:
            callbacks.append(click_callback(self))
            layer.mode = "pan_zoom"  # a click corrects instead of painting
            self.owner.viewer.layers.selection.active = layer
            if self.model() is None:
                self.owner.say(NO_MODEL, error=True)

    def click_at(self, point: Any, positive: bool = True) -> bool:
        """Correct at ``point`` (z, y, x voxels of the labels): positive adds the model's
        object there, negative removes. Runs as a job (or after the running one); False
        when it cannot run (no session, no model, outside the volume)."""
        session, seg = self.owner.session, self.model()
        if session is None or seg is None or self.image is None:
            self.owner.say("Start review first." if session is None else NO_MODEL
                           if seg is None else "Choose the image to correct.", error=True)
            return False
        p = tuple(float(v) for v in point)[-3:]
        if not all(0 <= round(v) < n for v, n in zip(p, session.labels.shape, strict=True)):
            return False
        if self.owner.busy:
            self.pending.append((p, bool(positive)))
            return True
        image, corrector = image_data(self.image), self.corrector
        strokes = self.brushes_combo.layer()
        strokes = None if strokes is None else np.asarray(strokes.data)

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.review import ClickCorrector

            c = corrector
            if c is None or c.segmenter is not seg:
                ctx.report(0.0, "preparing click corrections (the model's features)")
                c = ClickCorrector(seg, image, strokes=strokes)
            return c, session.click(p, positive, c)

        def done(out: Any) -> None:
            self.corrector, region = out
            self.owner.changed(region)
            sign = "added at" if positive else "removed at"
            self.owner.say(f"Corrected: {sign} {tuple(round(v) for v in p)}.")

        return self.owner.start_job(job, "Correcting", done, message="Correcting…")

    def _next_click(self) -> None:
        if self.pending and not self.owner.busy:
            self.click_at(*self.pending.pop(0))

    # --------------------------------------------------------------- retrain
    def retrain(self) -> None:
        """Refit the model on the strokes and the corrections, then re-rank the queue."""
        session, seg = self.owner.session, self.model()
        if session is None or seg is None or self.image is None:
            self.owner.say("Start review first." if session is None else NO_MODEL
                           if seg is None else "Choose the image to retrain on.", error=True)
            return
        image = image_data(self.image)
        brushes = self.brushes_combo.layer()
        brushes = None if brushes is None else np.asarray(brushes.data)

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.tasks.segment import SparseLabels

            strokes = None if brushes is None else SparseLabels.from_array(brushes, image.shape)
            out = session.retrain(seg, image, strokes=strokes, ctx=ctx)
            return {**out, "from_review": session.training_labels().n_annotated}

        def done(out: dict) -> None:
            self.corrector = None  # conditioned on the old model
            self.owner.changed()
            text = fit_summary(out["fit"]) if out.get("fit") is not None else "done"
            self.owner.say(f"Retrained with corrections on {out['n_annotated']} labelled "
                           f"voxels ({out['from_review']} from the review): {text}. The "
                           "queue is re-ranked.")

        self.owner.start_job(job, "Retraining with corrections", done,
                             button=self.retrain_button)

    # ---------------------------------------------------------------- scores
    def show_scores(self) -> dict | None:
        """Scores against the chosen ground truth, before and after the review."""
        truth, session = self.truth_combo.layer(), self.owner.session
        if truth is None or session is None:
            self.scores_label.setText("")
            return None
        from napari_lsmfm.review import ReviewError

        try:
            scores = session.scores(image_data(truth))
        except ReviewError as exc:
            self.scores_label.setText(f"Scores: {exc}")
            return None
        b, a = scores["before"], scores["after"]
        self.scores_label.setText(f"Against '{truth.name}' (before → after): " + ", ".join(
            f"{k} {b[k]:.3f} → {a[k]:.3f}" for k in ("dice", "precision", "recall", "f1")))
        return scores

    # ---------------------------------------------------------------- export
    def export(self, kind: str, path: str, *, overwrite: bool = False) -> Path | None:
        """Write the reviewed labels (``kind`` "labels") or the table ("table") to
        ``path``; an existing file only with ``overwrite``. The status says where."""
        session = self.owner.session
        if session is None:
            self.owner.say("Start review first.", error=True)
            return None
        try:
            written = getattr(session, f"export_{kind}")(path, overwrite=overwrite)
        except (ValueError, OSError) as exc:
            self.owner.say(f"Not exported: {exc}", error=True)
            return None
        self.owner.say(f"Exported the reviewed {kind} to {written}")
        return written

    def ask_export(self, kind: str) -> None:
        title, filters = EXPORTS[kind]
        options = QFileDialog.Option.DontConfirmOverwrite  # asked below, .zarr folders too
        path = QFileDialog.getSaveFileName(self.owner, title, "", filters, options=options)[0]
        if not path:
            return
        overwrite = Path(path).exists()
        if overwrite and QMessageBox.question(
                self.owner, title, f"{path} exists. Replace it?") != QMessageBox.StandardButton.Yes:
            return
        self.export(kind, path, overwrite=overwrite)
