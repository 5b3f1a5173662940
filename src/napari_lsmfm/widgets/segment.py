"""Few-shot segmentation dock widget: brush a few slices, Train, Predict.

Brush convention: 0 = not annotated, 1 = background, 2, 3, ... = structure classes.
Training and prediction run as jobs (:mod:`napari_lsmfm.workers`); the results come
back as new layers named after the image, never over the user's own layers.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_lsmfm.engine.jobs import JobContext, Update
from napari_lsmfm.widgets.parts import (
    DeviceCombo,
    LayerCombo,
    LayerQueue,
    LossPlot,
    put_result_layer,
    row,
    show_update,
)
from napari_lsmfm.widgets.runner import JobRunner
from napari_lsmfm.widgets.state import foundation_slot

if TYPE_CHECKING:
    import napari

LIVE_DELAY_MS = 1500
VIEW_MARGIN = 8  # z planes around the current one for "current view only"


class SegmentWidget(QWidget):
    """Train a segmentation head on brushed slices and segment the whole volume."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.slot = foundation_slot(napari_viewer)
        self.runner = JobRunner(self)
        self._layers = LayerQueue()
        self.segmenter: Any = None
        self._segmenter_key: tuple | None = None
        self._pending_predict = False

        self.image_combo = LayerCombo(napari_viewer, "Image")
        self.brush_combo = LayerCombo(napari_viewer, "Labels")
        self.new_brush_button = QPushButton("New brush layer")
        self.new_brush_button.clicked.connect(self.add_brush_layer)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["quick", "full"])
        self.mode_combo.setToolTip(
            "quick: frozen foundation features + a small head (seconds on a CPU)\n"
            "full: start from the quick model, then finetune decoder and encoder "
            "(GPU recommended)"
        )
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(10, 100_000)
        self.steps_spin.setValue(300)
        self.device_combo = DeviceCombo()
        self.live_box = QCheckBox("Live: retrain when strokes change (quick mode)")
        self.view_box = QCheckBox("Predict only around the current slice")
        self.instances_box = QCheckBox("Split objects into instances")
        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self._on_train_clicked)
        self.predict_button = QPushButton("Predict")
        self.predict_button.clicked.connect(self._on_predict_clicked)
        self.save_button = QPushButton("Save model…")
        self.save_button.clicked.connect(self._on_save_clicked)
        self.load_button = QPushButton("Load model…")
        self.load_button.clicked.connect(self._on_load_clicked)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.loss_plot = LossPlot()
        self.status = QLabel(
            "Paint 1 = background, 2, 3, … = structures on a few slices, then Train."
        )
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Brushes", row(self.brush_combo, self.new_brush_button))
        form.addRow("Mode", self.mode_combo)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Device", self.device_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for box in (self.live_box, self.view_box, self.instances_box):
            layout.addWidget(box)
        layout.addWidget(row(self.train_button, self.predict_button))
        layout.addWidget(row(self.save_button, self.load_button))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.loss_plot)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.setInterval(LIVE_DELAY_MS)
        self._live_timer.timeout.connect(self._live_retrain)
        self._watched: Any = None
        self.brush_combo.currentTextChanged.connect(self._watch_brushes)
        self._watch_brushes()

        self._after: Any = None  # what to do with the running job's result
        self.runner.updated.connect(self._on_update)
        self.runner.succeeded.connect(lambda out: self._after(out))
        self.runner.failed.connect(self._on_failed)
        self.runner.stopped.connect(lambda: self.status.setText("Stopped."))
        self.runner.finished.connect(self._on_finished)
        self._update_buttons()

    # ------------------------------------------------------------- inputs
    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.device_combo.list_devices()  # imports torch: when first shown, not at import
        super().showEvent(event)

    def add_brush_layer(self) -> Any:
        """Add an empty Labels layer matching the image, ready to paint class 2."""
        image = self.image_combo.layer()
        if image is None:
            self._say("Open or select a 3D image first.")
            return None
        name = f"{image.name} brushes"
        n = 1
        while name in self.viewer.layers:
            n += 1
            name = f"{image.name} brushes [{n}]"
        layer = self.viewer.add_labels(
            np.zeros(image.data.shape[-3:], np.uint8), name=name,
            scale=image.scale[-3:], translate=image.translate[-3:],
        )
        layer.mode = "paint"
        layer.selected_label = 2
        layer.brush_size = 5
        self.brush_combo.refresh()
        self.brush_combo.setCurrentText(name)
        self._say("Brush 1 = background, 2, 3, … = structures, on two or three slices.")
        return layer

    def _inputs(self) -> tuple[Any, Any, Any]:
        image = self.image_combo.layer()
        brushes = self.brush_combo.layer()
        if image is None:
            raise ValueError("choose an image layer (a 3D stack)")
        if brushes is None:
            raise ValueError("choose or add a brush (Labels) layer and paint a few strokes")
        if getattr(image, "rgb", False):
            raise ValueError(f"'{image.name}' is RGB: use one grey-scale fluorescence channel")
        return image, brushes, image.data

    def _segmenter_for(self, image_layer: Any, foundation: Any) -> Any:
        from napari_lsmfm.tasks import Segmenter

        mode = self.mode_combo.currentText()
        key = (id(image_layer), mode, id(foundation))
        if self.segmenter is None or self._segmenter_key != key:
            self.segmenter = Segmenter(
                foundation, mode=mode, voxel_size=tuple(float(s) for s in image_layer.scale[-3:]),
                device=None if mode == "quick" else self.device_combo.currentText(),
            )
            self._segmenter_key = key
        self.segmenter.config.steps = int(self.steps_spin.value())
        return self.segmenter

    def _foundation(self, ctx: JobContext) -> Any:
        """The model loaded in the Foundation widget, else the embedded default."""
        if self.slot.foundation is not None:
            return self.slot.foundation
        from napari_lsmfm.model import load_foundation

        ctx.report(0.0, "loading the default foundation model")
        return load_foundation(None, device=self.device_combo.currentText())

    # ------------------------------------------------------------ actions
    def train(self, *, then_predict: bool = False, live: bool = False) -> None:
        """Start training on the current strokes (what the Train button does)."""
        try:
            image_layer, brush_layer, data = self._inputs()
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        brushes = np.asarray(brush_layer.data)

        def job(ctx: JobContext) -> Any:
            foundation = self._foundation(ctx)
            segmenter = self._segmenter_for(image_layer, foundation)
            fit = segmenter.fit(data, brushes, ctx=ctx)
            result = None
            if then_predict:
                result = segmenter.predict(data, ctx=ctx, roi=self._view_roi(data.shape),
                                           instances=self.instances_box.isChecked())
            return foundation, fit, result

        self.loss_plot.clear()
        self._say("Training… (live)" if live else "Training…")
        self._after = self._on_trained
        self.runner.start(job, "Training segmentation")
        self._update_buttons()

    def predict(self) -> None:
        """Segment the image with the trained model (what the Predict button does)."""
        if self.segmenter is None or not self.segmenter.trained:
            self._say("Train first (or load a saved model).", error=True)
            return
        image_layer = self.image_combo.layer()
        if image_layer is None:
            self._say("Choose an image layer.", error=True)
            return
        data = image_layer.data
        roi = self._view_roi(data.shape) if self.view_box.isChecked() else None
        instances = self.instances_box.isChecked()
        segmenter = self.segmenter

        def job(ctx: JobContext) -> Any:
            return None, None, segmenter.predict(data, ctx=ctx, roi=roi, instances=instances)

        self._say("Predicting…")
        self._after = self._on_trained
        self.runner.start(job, "Segmenting")
        self._update_buttons()

    def _view_roi(self, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        if not self.view_box.isChecked():
            return None
        z = int(round(self.viewer.dims.current_step[-3]))
        z0, z1 = max(0, z - VIEW_MARGIN), min(shape[-3], z + VIEW_MARGIN + 1)
        return (slice(z0, z1), slice(0, shape[-2]), slice(0, shape[-1]))

    def _on_train_clicked(self) -> None:
        if self.runner.running:
            self.runner.cancel()
        else:
            self.train(then_predict=True)

    def _on_predict_clicked(self) -> None:
        if self.runner.running:
            self.runner.cancel()
        else:
            self.predict()

    def _on_save_clicked(self) -> None:
        if self.segmenter is None or not self.segmenter.trained:
            self._say("Nothing to save yet: train first.", error=True)
            return
        folder = QFileDialog.getSaveFileName(self, "Save segmentation model", "", "")[0]
        if folder:
            self.save_model(folder)

    def save_model(self, folder: str) -> None:
        try:
            path = self.segmenter.save(folder)
        except (ValueError, OSError) as exc:
            self._say(f"Not saved: {exc}", error=True)
            return
        self._say(f"Saved to {path}")

    def _on_load_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Load segmentation model")
        if folder:
            self.load_model(folder)

    def load_model(self, folder: str) -> None:
        from napari_lsmfm.tasks import Segmenter

        foundation = self.slot.foundation

        def job(ctx: JobContext) -> Any:
            ctx.report(0.1, f"loading {Path(folder).name}")
            return Segmenter.load(folder, foundation)

        def done(segmenter: Any) -> None:
            self.segmenter = segmenter
            self._segmenter_key = None
            self.mode_combo.setCurrentText(segmenter.config.mode)
            self._say(f"Loaded a {segmenter.config.mode} model for classes "
                      f"{list(segmenter.classes)}. Press Predict.")

        self._after = done
        self.runner.start(job, "Loading segmentation model")
        self._update_buttons()

    # ------------------------------------------------------- live retrain
    def _watch_brushes(self, *_: Any) -> None:
        if self._watched is not None:
            try:
                self._watched.events.paint.disconnect(self._on_paint)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._watched = self.brush_combo.layer()
        if self._watched is not None:
            self._watched.events.paint.connect(self._on_paint)

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
    def _on_update(self, update: Update) -> None:
        show_update(update, self.progress_bar, self.status, self.loss_plot)

    def _on_trained(self, out: Any) -> None:
        foundation, fit, result = out
        if foundation is not None and self.slot.foundation is None:
            self.slot.set(foundation)
        parts = []
        if fit is not None:
            state = "stopped early, best model kept" if fit.get("stopped") else "trained"
            parts.append(
                f"{state}: {fit['steps_done']} steps in {fit['seconds']:.1f} s, "
                f"best loss {fit['best_loss']:.4g}, classes {fit['classes']}"
            )
        if result is not None:
            self._show_result(result)
            parts.append(f"segmented in {result.stats.get('predict_seconds', 0):.1f} s")
        self.progress_bar.setValue(1000)
        self._say("; ".join(parts) or "done")

    def _show_result(self, result: Any) -> None:
        image = self.image_combo.layer()
        shape = tuple(image.data.shape[-3:])
        scale = tuple(image.scale[-3:])
        translate = np.asarray(image.translate[-3:], float)
        if result.region is not None:
            translate = translate + np.array([s.start for s in result.region]) * scale
        geometry = {"scale": scale, "translate": tuple(translate)}
        name = image.name
        classes = result.classes
        if result.region is not None and self._full_layer(f"{name} segmentation", shape):
            # update the slab of the existing full-volume result in place
            layer = self.viewer.layers[f"{name} segmentation"]
            layer.data[result.region] = classes
            layer.refresh()
        else:
            put_result_layer(self.viewer, f"{name} segmentation", classes, "labels", **geometry)
        # the hidden extra layers follow one per event-loop turn (see LayerQueue)
        if result.uncertainty is not None:
            self._layers.add(lambda: put_result_layer(
                self.viewer, f"{name} uncertainty", result.uncertainty, "image",
                colormap="magma", blending="additive", opacity=0.5, visible=False,
                contrast_limits=(0.0, 1.0), **geometry,
            ))
        if result.probabilities is not None:
            for i, value in enumerate(result.channel_values):
                if value == 0:
                    continue
                self._layers.add(lambda i=i, value=value: put_result_layer(
                    self.viewer, f"{name} probability {value}", result.probabilities[i],
                    "image", colormap="green", blending="additive", visible=False,
                    **geometry,
                ))
        if result.instances is not None:
            self._layers.add(lambda: put_result_layer(
                self.viewer, f"{name} instances", result.instances, "labels", **geometry))
        if result.uncertainty is not None:
            z = result.suggest_slices(axis=0, n=1)[0]
            if result.region is not None:
                z += result.region[0].start
            self.status.setToolTip(f"Most uncertain slice: z = {z}; a stroke there helps most.")

    @property
    def busy(self) -> bool:
        """A job runs, or its result layers are still being added."""
        return self.runner.running or self._layers.pending

    def _full_layer(self, name: str, shape: tuple[int, ...]) -> bool:
        if name not in self.viewer.layers:
            return False
        layer = self.viewer.layers[name]
        return (layer.metadata.get("napari-lsmfm") == name
                and tuple(layer.data.shape) == shape)

    def _on_failed(self, exc: Exception) -> None:
        self.progress_bar.setValue(0)
        self._say(f"Failed: {exc}", error=True)

    def _on_finished(self) -> None:
        self._update_buttons()

    def _update_buttons(self) -> None:
        running = self.runner.running
        self.train_button.setText("Stop" if running else "Train")
        self.predict_button.setText("Stop" if running else "Predict")
        for button in (self.save_button, self.load_button, self.new_brush_button):
            button.setEnabled(not running)

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(f"<b>{html.escape(text)}</b>" if error else html.escape(text))
