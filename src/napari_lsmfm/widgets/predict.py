"""Predict whole volume dock widget: a task model over a volume larger than memory.

A short form on :class:`~napari_lsmfm.widgets.base.TaskWidget` that runs
:func:`napari_lsmfm.scale.predict_volume` as a job: block by block into an OME-Zarr store
on disk, never the whole result in memory. The model is the segmentation widget's (the
one it shares through the viewer's :class:`~napari_lsmfm.widgets.state.FoundationSlot`),
the default deblur model, or a saved model folder. As soon as the store exists a layer
"<image> prediction" reads it lazily and shows each block when it finishes; at the end it
becomes the store's pyramid. An existing output is never replaced without asking; Stop
leaves a partial output that Run resumes. Parts: :mod:`.predict_parts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_lsmfm.widgets import predict_parts as parts
from napari_lsmfm.widgets.base import TaskWidget
from napari_lsmfm.widgets.parts import choice, follow, image_data, row

if TYPE_CHECKING:
    import napari

MODELS = [parts.SHARED_MODEL, parts.DEBLUR_MODEL, parts.FOLDER_MODEL]


class PredictWidget(TaskWidget):
    """Predict a whole (large) volume into a Zarr store, shown while it fills."""

    foundation_line = False
    loss_curve = False
    greeting = ("Choose an image and a model, then Run: the result is written to a Zarr "
                "store block by block and shown as it fills.")

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(napari_viewer, parent)
        self.models: dict[tuple, Any] = {}  # loaded here: (choice, folder, device) -> model
        self.run_state: dict[str, Any] | None = None  # the running prediction, for the UI
        self._refresh_pending = False
        self._suggested = ""  # the output path last suggested (another one is the user's)

        self.model_combo = choice(MODELS, changed=self._on_model_changed, tip=(
            "The segmentation widget's model: the one trained (or loaded) there.\n"
            "Default deblur model: the shipped one.\n"
            "Saved model folder: a segmentation or deblur model saved with 'Save model…'."))
        # long entries ("… (trained on '<image>')") do not widen the dock
        self.model_combo.setMinimumContentsLength(12)
        self.model_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.folder_edit = QLineEdit(placeholderText="a saved model folder")
        self.folder_edit.editingFinished.connect(self._suggest_output)
        self.folder_row = row(self.folder_edit, self._browse("Browse…", self._browse_folder))
        self.out_edit = QLineEdit(placeholderText="a new .zarr folder")
        self.block_spins = [QSpinBox(minimum=0, maximum=4096, value=0,
                                     buttonSymbols=QSpinBox.ButtonSymbols.NoButtons,
                                     styleSheet="min-width: 32px")  # three fit a dock
                            for _ in "zyx"]
        for axis, spin in zip("zyx", self.block_spins, strict=True):
            spin.setSpecialValueText("auto")
            spin.setToolTip(f"block size along {axis} in voxels (rounded up to whole "
                            "windows); auto: about 200 x 400 x 400")
        self.skip_box = QCheckBox("Skip empty blocks", checked=True, toolTip=(
            "blocks without structure (dark background, air) are not run through the "
            "network: they get background"))
        self.instances_box = QCheckBox("Instances", toolTip=(
            "segmentation: also split objects into instances, stitched across blocks "
            "(written beside the output as <name>_instances.zarr)"))
        self.run_btn = self.run_button("Run", self.run)
        self.idle_only(self.model_combo, self.folder_row, self.out_edit, self.skip_box,
                       *self.block_spins)  # instances: enabled by the model's task

        self.form = QFormLayout()
        self.form.addRow("Image", self.image_combo)
        self.form.addRow("Model", self.model_combo)
        self.form.addRow("Folder", self.folder_row)
        self.form.addRow("Device", self.device_combo)  # where a model loaded here runs
        self.form.addRow("Output", row(self.out_edit, self._browse("…", self._browse_out)))
        self.form.addRow("Block", row(*self.block_spins))  # z, y, x (short: a narrow dock)
        self.set_layout(self.form, row(self.skip_box, self.instances_box), self.run_btn)

        self.runner.stopped.connect(self._on_stopped)
        self.runner.failed.connect(lambda *_: self._end_run())
        self.runner.finished.connect(self._end_run)
        self.image_combo.currentTextChanged.connect(self._suggest_output)
        follow(self, self.slot.task_model_changed, self._on_task_model)
        self._on_task_model()
        self._on_model_changed()
        self.update_buttons()

    def preload_foundation(self) -> None:
        """Nothing to preload: the models here carry or load their own foundation."""

    # ------------------------------------------------------------- inputs
    def _browse(self, text: str, slot: Any) -> QPushButton:
        button = QPushButton(text)
        button.clicked.connect(lambda *_: slot())
        return button

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Saved model folder")
        if folder:
            self.folder_edit.setText(folder)
            self._suggest_output()

    def _browse_out(self) -> None:
        path = QFileDialog.getSaveFileName(self, "Output (a new .zarr folder)",
                                           self.out_edit.text(), "Zarr (*.zarr)")[0]
        if path:
            self.out_edit.setText(path if path.lower().endswith(".zarr") else f"{path}.zarr")

    def _on_task_model(self, *_: Any) -> None:
        model, name = self.slot.task_model("segment")
        short = "none yet" if model is None else f"on '{name}'" if name else "loaded"
        tip = ("none yet: train one in Few-shot segmentation" if model is None
               else f"trained on '{name}'" if name else "loaded there")
        self.model_combo.setItemText(0, f"Segmentation ({short})")  # short: the dock is narrow
        self.model_combo.setItemData(0, f"{parts.SHARED_MODEL}: {tip}",
                                     Qt.ItemDataRole.ToolTipRole)

    def _on_model_changed(self, *_: Any) -> None:
        chosen = self._choice()
        for widget, shown in ((self.folder_row, chosen == parts.FOLDER_MODEL),
                              (self.device_combo, chosen != parts.SHARED_MODEL)):
            widget.setVisible(shown)
            self.form.labelForField(widget).setVisible(shown)
        self.instances_box.setEnabled(chosen != parts.DEBLUR_MODEL)
        self._suggest_output()

    def _choice(self) -> str:
        return MODELS[max(0, self.model_combo.currentIndex())]

    def _task(self) -> str:
        """The chosen model's task ("segment", "deblur"); ValueError saying what is missing."""
        chosen = self._choice()
        if chosen == parts.SHARED_MODEL:
            return "segment"
        if chosen == parts.DEBLUR_MODEL:
            return "deblur"
        return parts.saved_model_task(self.folder_edit.text().strip())

    def _suggest_output(self, *_: Any) -> None:
        layer, current = self.image_combo.layer(), self.out_edit.text().strip()
        if layer is None or (current and current != self._suggested):
            return  # the user's (or a script's) choice stays
        try:
            task = self._task()
        except ValueError:
            task = ""
        self._suggested = str(parts.default_output(layer, task))
        self.out_edit.setText(self._suggested)

    def _block(self) -> tuple[int, int, int] | None:
        sizes = tuple(int(s.value()) for s in self.block_spins)
        if not any(sizes):
            return None
        if not all(sizes):
            raise ValueError("set the block size along z, y and x, or none of them (auto)")
        return sizes

    def _model(self, task: str, device: str) -> tuple[Any, Any, tuple]:
        """(the loaded model or None, a loader for it, its cache key) for the choice."""
        chosen, folder = self._choice(), self.folder_edit.text().strip()
        if chosen == parts.SHARED_MODEL:
            model = self.slot.task_model("segment")[0]
            if model is None or not model.trained:
                raise ValueError("no segmentation model yet: train one in the Few-shot "
                                 "segmentation widget, or choose a saved model folder")
            return model, None, ()  # predict_volume leaves its settings as they were
        key = (chosen, folder, device)
        foundation = self.slot.foundation
        return self.models.get(key), lambda: parts.load_model(chosen, folder, foundation,
                                                              device), key

    # ------------------------------------------------------------ actions
    def run(self) -> None:
        """Predict the chosen image into the output (what the Run button does); asks first
        when the output exists (resume a partial one, or replace it)."""
        if self.runner.running:
            return
        try:
            layer = self.image_layer()
            task = self._task()
            device = self.device_combo.currentText()
            model, loader, key = self._model(task, device)
            text = self.out_edit.text().strip()
            out = Path(text).expanduser() if text else parts.default_output(layer, task)
            if not out.name.lower().endswith(".zarr"):
                raise ValueError(f"the output is a Zarr folder: end its name in .zarr ({out})")
            block = self._block()
        except ValueError as exc:
            self.say(str(exc), error=True)
            return
        paths = parts.output_paths(out, self.instances_box.isChecked() and task == "segment")
        found, resumable = parts.existing(paths)
        resume = overwrite = False
        if found:
            answer = parts.ask_existing(self, found, resumable)
            if answer not in ("resume", "replace"):
                self.say(f"Not started: {found[0]} exists. Choose another output, or Run "
                         "and answer Replace.")
                return
            resume, overwrite = answer == "resume", answer == "replace"
            if overwrite:
                self._drop_layers_of(paths)
        counts = {"done": 0, "skipped": 0}
        self.out_edit.setText(str(out))
        self.run_state = {"paths": paths, "task": task, "source": layer, "layer": None,
                          "counts": counts, "key": key, "blocks": 0, "block": 0}
        job = parts.prediction_job(
            model, loader, image_data(layer), paths, counts, skip_empty=self.skip_box.isChecked(),
            resume=resume, overwrite=overwrite, block=block, device=device,
            voxel_size=tuple(float(s) for s in layer.scale[-3:]))
        self.start_job(job, f"Predicting '{layer.name}'", self._on_done, button=self.run_btn,
                       message="Resuming…" if resume else "Starting…")

    def show_update(self, update: Any) -> None:
        """Progress of the run: the bar, the status line; the first record with block
        counts means the output exists (the layer appears), later ones that blocks
        finished (the layer is refreshed, once per batch of records)."""
        super().show_update(update)
        state = self.run_state
        if state is None or "blocks" not in update.values:
            return
        state["block"], state["blocks"] = int(update.values["block"]), int(update.values["blocks"])
        if state["layer"] is None:
            state["layer"] = parts.live_layer(self.viewer, state["paths"]["out"],
                                              state["source"], state["task"])
        elif not self._refresh_pending:
            self._refresh_pending = True
            QTimer.singleShot(0, self._refresh_layer)
        resumed = f", {state['block'] - state['counts']['done']} from before" if (
            state["block"] > state["counts"]["done"]) else ""
        self.say(f"Predicting: {state['block']}/{state['blocks']} blocks "
                 f"({state['counts']['skipped']} skipped empty{resumed})…")

    def _refresh_layer(self) -> None:
        self._refresh_pending = False
        layer = (self.run_state or {}).get("layer")
        if layer is not None and layer in self.viewer.layers:
            layer.refresh()

    def _drop_layers_of(self, paths: dict[str, Path]) -> None:
        """Before replacing outputs: no layer of this widget keeps reading them."""
        for layer in list(self.viewer.layers):
            if layer.metadata.get(parts.STORE_KEY) in {str(p) for p in paths.values()}:
                self.viewer.layers.remove(layer)

    def _on_done(self, result: Any) -> None:
        summary, used = result
        state = self.run_state
        if state["key"]:
            self.models[state["key"]] = used  # the default deblur model loads once
        paths, source = state["paths"], state["source"]
        where = {"scale": tuple(source.scale[-3:]), "translate": tuple(source.translate[-3:])}
        layer = parts.show_pyramid(self.viewer, state["layer"], paths["out"],
                                   name=f"{source.name} prediction",
                                   kind="image" if state["task"] == "deblur" else "labels",
                                   **where)
        if "instances" in paths:
            parts.show_pyramid(self.viewer, None, paths["instances"],
                               name=f"{source.name} instances", **where)
        state["layer"] = layer
        self.say(parts.summary_text(summary, paths["out"]))

    def _on_stopped(self) -> None:
        state = self.run_state
        if state is None:
            return
        self._refresh_layer()
        out = state["paths"]["out"]
        if state["layer"] is None:
            self.say(f"Stopped before any block; {out} may hold an empty partial output.")
            return
        self.say(f"Stopped after {state['block']}/{state['blocks']} blocks: {out} is "
                 "partial. Run again and answer Resume to finish it.")

    def _end_run(self) -> None:
        self.run_state = None
