"""Foundation model dock widget: pick weights, load them in a job, choose a device.

A short form on :class:`~napari_lsmfm.widgets.base.TaskWidget`: it runs
:func:`napari_lsmfm.model.load_foundation` as a job and puts the result in the viewer's
:class:`~napari_lsmfm.widgets.state.FoundationSlot`, where every task widget finds it.
torch is imported only when a job runs, so the Plugins menu opens fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import QCheckBox, QFileDialog, QFormLayout, QLineEdit, QPushButton, QWidget

from napari_lsmfm.engine.jobs import JobContext, span
from napari_lsmfm.widgets.base import TaskWidget
from napari_lsmfm.widgets.parts import Section, row
from napari_lsmfm.widgets.state import foundation_rows

if TYPE_CHECKING:
    import napari

WEIGHT_FILTER = "Weights (*.ckpt *.pt *.pth *.safetensors config.json);;All files (*)"


class FoundationWidget(TaskWidget):
    """Load a foundation model (a published lsm_fm checkpoint, ours, or the default)."""

    uses_image = False
    foundation_line = False  # the status line describes the model in full
    loss_curve = False
    greeting = ("No model loaded yet: the tasks load the embedded default on first use, or "
                "press Load.")
    failed_prefix = "Not loaded."
    stopped_message = "Loading stopped."

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(napari_viewer, parent)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("empty: the embedded default model")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_weights)
        self.vocab_edit = QLineEdit()
        self.vocab_edit.setPlaceholderText("optional: BERT vocab.txt for published text towers")
        browse_vocab = QPushButton("Browse…")
        browse_vocab.clicked.connect(self._browse_vocab)
        self.trust_box = QCheckBox("Trust this file (allow code in the pickle)")
        self.trust_box.setToolTip(
            "Only for checkpoints from a source you trust: unpickling can run code."
        )
        self.load_button = self.run_button("Load", self.load)
        self.move_button = self.run_button("Move to device", self.move)

        form = QFormLayout()
        form.addRow("Weights", row(self.path_edit, browse))
        form.addRow("Device", self.device_combo)
        self.options = Section("Published checkpoints: vocabulary, trust")
        self.options.form.addRow("Vocabulary", row(self.vocab_edit, browse_vocab))
        self.options.form.addRow(self.trust_box)
        self.set_layout(form, self.options, row(self.load_button, self.move_button))
        self.update_buttons()

    # --- actions ---------------------------------------------------------
    def load(self) -> None:
        """Start loading the weights named in the form (what the Load button does)."""
        from napari_lsmfm.model import load_foundation

        path = self.path_edit.text().strip() or None
        vocab = self.vocab_edit.text().strip() or None
        device = self.device_combo.currentText()
        trusted = self.trust_box.isChecked()

        def job(ctx: JobContext) -> Any:
            preloaded = self.slot.await_preload(ctx) if path is None else None
            if preloaded is not None and not trusted and vocab is None:  # the default
                return preloaded.to_device(device)  # on the device chosen here
            ctx.report(0.0, "reading weights")
            return load_foundation(
                path, device=device, trusted=trusted, vocab=vocab,
                progress=span(ctx, 0.0, 1.0).report,
            )

        self.start_job(job, "Loading foundation model", self.slot.set, button=self.load_button,
                       message=f"Loading {path or 'the default model'}…")

    def move(self) -> None:
        """Move the loaded model to the chosen device (what Move to device does)."""
        foundation = self.slot.foundation
        if foundation is None:
            return
        device = self.device_combo.currentText()

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.model import resolve_device

            ctx.report(0.1, f"moving to {device}")
            foundation.to_device(resolve_device(device))
            return foundation

        self.start_job(job, "Moving foundation model", self.slot.set, button=self.move_button)

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Foundation weights", "", WEIGHT_FILTER)
        if path:
            self.path_edit.setText(path)

    def _browse_vocab(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "BERT vocabulary", "", "vocab.txt (*.txt)")
        if path:
            self.vocab_edit.setText(path)

    # --- results ---------------------------------------------------------
    def show_foundation(self, foundation: Any) -> None:
        """Loaded here or by a task widget (the default model): describe it."""
        if foundation is not None:  # two facts a line: the dock stays short
            rows = [f"{k}: {v}" for k, v in foundation_rows(foundation)]
            self.say("\n".join("; ".join(rows[i:i + 2]) for i in range(0, len(rows), 2)))
        if hasattr(self, "move_button"):
            self.update_buttons()

    def update_buttons(self) -> None:
        super().update_buttons()
        if not self.runner.running:
            self.move_button.setEnabled(self.slot.foundation is not None)
