"""Few-shot segmentation dock widget: brush a few slices, Train, Predict.

Brush convention: 0 = not annotated, 1 = background, 2, 3, ... = structure classes.
A short form on :class:`~napari_lsmfm.widgets.base.TaskWidget`: training and prediction
run as jobs (:class:`~napari_lsmfm.tasks.segment.Segmenter`); the results come back as
the layers :meth:`SegmentationResult.layers` names, never over the user's own layers.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QFormLayout, QLabel, QPushButton, QWidget

from napari_lsmfm.engine.jobs import JobContext
from napari_lsmfm.widgets.base import TaskWidget
from napari_lsmfm.widgets.brushes import BRUSH_ROLE, BrushCombo, check_brush_layer, keep_selected
from napari_lsmfm.widgets.parts import (
    PLUGIN_KEY,
    choice,
    follow,
    image_data,
    int_spin,
    put_layer,
    row,
)
from napari_lsmfm.widgets.segment_form import (
    CANDIDATE_TIP,
    diameter_spin,
    fit_summary,
    training_message,
)

if TYPE_CHECKING:
    import napari

LIVE_DELAY_MS = 1500
VIEW_MARGIN = 8  # z planes around the current one for "current view only"


class SegmentWidget(TaskWidget):
    """Train a segmentation head on brushed slices and segment the whole volume."""

    model_buttons = ("save", "load")
    model_name = "segmentation"
    greeting = "Paint 1 = background, 2, 3, … = structures on a few slices, then Train."
    nothing_to_save = "Nothing to save yet: train first."

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(napari_viewer, parent)
        self.segmenter: Any = None
        self._segmenter_key: tuple | None = None  # the form values it was built with

        self.brush_combo = BrushCombo(napari_viewer, "none yet")
        self.new_brush_button = QPushButton("New brush layer")
        self.new_brush_button.clicked.connect(self.add_brush_layer)
        self.mode_combo = choice(["quick", "full"], changed=self._show_mode, tip=(
            "quick: frozen foundation features + a small head (seconds on a CPU)\n"
            "full: start from the quick model, then finetune decoder and encoder "
            "(GPU recommended)"))
        self.steps_spin = int_spin(10, 100_000, 300)
        self.steps_spin.setToolTip("training steps")
        self.candidate_combo = choice(["auto", "foundation", "filters", "forest"],
                                      tip=CANDIDATE_TIP)
        self.diameter_spin = diameter_spin()
        self.live_box = QCheckBox("Live", toolTip="retrain when the strokes change (quick)")
        self.view_box = QCheckBox("Near this slice", toolTip=(
            f"predict only {VIEW_MARGIN} planes either side of the current slice"))
        self.instances_box = QCheckBox("Instances", toolTip="split objects into instances")
        self.train_button = self.run_button("Train", lambda: self.train(then_predict=True))
        self.predict_button = self.run_button("Predict", self.predict)
        self.idle_only(self.new_brush_button)

        self.form = QFormLayout()
        self.form.addRow("Image", self.image_combo)
        self.form.addRow("Brushes", row(self.brush_combo, self.new_brush_button))
        self.form.addRow("Mode", row(self.mode_combo, QLabel("steps"), self.steps_spin))
        self.form.addRow("Model", row(self.candidate_combo, QLabel("diameter"),
                                      self.diameter_spin))
        self.form.addRow("Device", self.device_combo)  # full mode only: quick runs on CPU
        self.set_layout(self.form, row(self.live_box, self.view_box, self.instances_box),
                        row(self.train_button, self.predict_button, self.save_button,
                            self.load_button), self.loss_plot)

        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.setInterval(LIVE_DELAY_MS)
        self._live_timer.timeout.connect(self._live_retrain)
        self._unwatch: Any = None
        self.brush_combo.currentTextChanged.connect(self._watch_brushes)
        self._watch_brushes()
        self._show_mode()
        self.update_buttons()

    # ------------------------------------------------------------- inputs
    def add_brush_layer(self) -> Any:
        """Add an empty Labels layer matching the image, ready to paint class 2."""
        image = self.image_combo.layer()
        if image is None:
            self.say("Open or select a 3D image first.")
            return None
        name = f"{image.name} brushes"
        n = 1
        while name in self.viewer.layers:
            n += 1
            name = f"{image.name} brushes [{n}]"
        layer = self.viewer.add_labels(
            np.zeros(image_data(image).shape[-3:], np.uint8), name=name,
            scale=image.scale[-3:], translate=image.translate[-3:],
            metadata={BRUSH_ROLE: "brushes"},
        )
        layer.mode = "paint"
        layer.selected_label = 2
        layer.brush_size = 5
        self.brush_combo.refresh()
        self.brush_combo.setCurrentText(name)
        self.say("Brush 1 = background, 2, 3, … = structures, on two or three slices.")
        return layer

    def _show_mode(self, *_: Any) -> None:
        full = self.mode_combo.currentText() == "full"
        self.device_combo.setVisible(full)
        self.form.labelForField(self.device_combo).setVisible(full)

    def _settings(self, image_layer: Any) -> dict:
        """The Segmenter's settings from the form (read on the UI thread)."""
        mode = self.mode_combo.currentText()
        diameter = float(self.diameter_spin.value())
        return {"mode": mode, "steps": int(self.steps_spin.value()),
                "candidate": self.candidate_combo.currentText(),
                "object_diameter": diameter if diameter > 0 else None,
                "voxel_size": tuple(float(s) for s in image_layer.scale[-3:]),
                "device": None if mode == "quick" else self.device_combo.currentText()}

    def _segmenter_for(self, image_layer: Any, foundation: Any, settings: dict) -> Any:
        """The Segmenter for these settings: the last one while they are the same (it keeps
        its feature cache and warm start), else a new one built with them."""
        from napari_lsmfm.tasks.segment import Segmenter

        key = (id(image_layer), id(foundation), tuple(sorted(settings.items())))
        if self.segmenter is None or self._segmenter_key != key:
            self.segmenter = Segmenter(foundation, **settings)
            self._segmenter_key = key
        return self.segmenter

    # ------------------------------------------------------------ actions
    def train(self, *, then_predict: bool = False, live: bool = False) -> None:
        """Start training on the current strokes (what the Train button does)."""
        try:  # checked here, in a few ms, before a model loads or anything slow starts
            image_layer = self.image_layer()
            brush_layer = self.brush_combo.layer()
            check_brush_layer(brush_layer, image_data(image_layer).shape)
        except ValueError as exc:
            self.say(str(exc), error=True)
            return
        data, brushes = image_data(image_layer), np.asarray(brush_layer.data)
        settings, device = self._settings(image_layer), self.device_combo.currentText()
        region = self._view_region(data.shape)
        instances = self.instances_box.isChecked()

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.tasks.segment.labels import SparseLabels

            strokes = SparseLabels.from_array(brushes, data.shape)  # fails fast, no model yet
            foundation = self.foundation_for(ctx, device)
            segmenter = self._segmenter_for(image_layer, foundation, settings)
            fit = segmenter.fit(data, strokes, ctx=ctx)
            result = None
            if then_predict:
                result = segmenter.predict(data, ctx=ctx, region=region, instances=instances)
            return foundation, fit, result

        self.loss_plot.clear()
        self.start_job(job, "Training segmentation", lambda out: self._on_trained(
            image_layer, *out, brushes=brush_layer), button=self.train_button,
            message="Training… (live)" if live else training_message(settings, self.device_combo))

    def predict(self) -> None:
        """Segment the image with the trained model (what the Predict button does)."""
        if self.segmenter is None or not self.segmenter.trained:
            self.say("Train first (or load a saved model).", error=True)
            return
        image_layer = self.image_combo.layer()
        if image_layer is None:
            self.say("Choose an image layer.", error=True)
            return
        data = image_data(image_layer)
        region = self._view_region(data.shape)
        instances = self.instances_box.isChecked()
        segmenter = self.segmenter

        def job(ctx: JobContext) -> Any:
            return segmenter.predict(data, ctx=ctx, region=region, instances=instances)

        self.start_job(job, "Segmenting", lambda result: self._on_trained(
            image_layer, None, None, result, brushes=self.brush_combo.layer()),
            button=self.predict_button,
            message="Predicting…")

    def _view_region(self, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        if not self.view_box.isChecked():
            return None
        z = int(round(self.viewer.dims.current_step[-3]))
        z0, z1 = max(0, z - VIEW_MARGIN), min(shape[-3], z + VIEW_MARGIN + 1)
        return (slice(z0, z1), slice(0, shape[-2]), slice(0, shape[-1]))

    def current_model(self) -> Any:
        trained = self.segmenter is not None and self.segmenter.trained
        return self.segmenter if trained else None

    def load_model(self, folder: str) -> None:
        """Load a saved segmentation model folder in a job; Predict then uses it."""
        from napari_lsmfm.tasks.segment import Segmenter

        foundation = self.slot.foundation

        def job(ctx: JobContext) -> Any:
            ctx.report(0.1, f"loading {Path(folder).name}")
            return Segmenter.load(folder, foundation)

        def done(segmenter: Any) -> None:
            self.segmenter = segmenter
            self._segmenter_key = None
            self.share_foundation(segmenter.foundation)  # every widget shows it loaded
            self.slot.share_task_model("segment", segmenter)
            self.mode_combo.setCurrentText(segmenter.config.mode)
            self.say(f"Loaded a {segmenter.config.mode} model for classes "
                     f"{list(segmenter.classes)}. Press Predict.")

        self.start_job(job, "Loading segmentation model", done)

    # ------------------------------------------------------- live retrain
    def _watch_brushes(self, *_: Any) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        layer = self.brush_combo.layer()
        if layer is not None:
            self._unwatch = follow(self, layer.events.paint, self._on_paint)
        # no brush layer to offer: the button to make one stands out
        self.new_brush_button.setStyleSheet("" if layer else "font-weight: bold")

    def _on_paint(self, *_: Any) -> None:
        if self.live_box.isChecked() and self.mode_combo.currentText() == "quick":
            self._live_timer.start()

    def _live_retrain(self) -> None:
        if self.runner.running:
            self._live_timer.start()  # try again once the current job ends
            return
        self.view_box.setChecked(True)
        self.train(then_predict=True, live=True)

    # ------------------------------------------------------------ results
    def _on_trained(self, image: Any, foundation: Any, fit: Any, result: Any, *,
                    brushes: Any = None) -> None:
        self.share_foundation(foundation)
        if self.current_model() is not None:  # the review widget corrects with it
            self.slot.share_task_model("segment", self.segmenter, image.name)
        parts = [] if fit is None else [fit_summary(fit)]
        if result is not None:
            self.show_result(image, result)
            parts.append(f"segmented in {result.stats.get('predict_seconds', 0):.1f} s")
        # napari selects each layer it adds: the brushes come back once all are in
        self.layer_queue.add(lambda: keep_selected(self.viewer, brushes))
        self.say("; ".join(parts) or "done")

    def show_result(self, image: Any, result: Any) -> None:
        """Put ``result`` (of ``image``) in the viewer, updating this widget's layers of
        the image in place (a region's result into the full-volume layers): the
        segmentation now, the hidden extra layers one per event-loop turn."""
        shape = tuple(image_data(image).shape[-3:])
        layers = result.layers(image.name, scale=image.scale[-3:],
                               translate=image.translate[-3:])
        first, *extra = [partial(self._put, d, result.region, shape) for d in layers]
        first()
        for place in extra:
            self.layer_queue.add(place)
        if result.uncertainty is not None:
            z = result.suggest_slices(axis=0, n=1)[0]
            if result.region is not None:
                z += result.region[0].start
            self.status.setToolTip(f"Most uncertain slice: z = {z}; a stroke there helps most.")

    def _put(self, layer_data: tuple, region: Any, shape: tuple[int, ...]) -> None:
        data, kwargs, _ = layer_data
        name = kwargs["name"]
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if (region is not None and layer is not None and layer.metadata.get(PLUGIN_KEY) == name
                and tuple(layer.data.shape) == shape):
            layer.data[region] = data
            layer.refresh()
        else:
            put_layer(self.viewer, layer_data)

