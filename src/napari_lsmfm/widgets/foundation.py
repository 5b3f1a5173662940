"""Foundation model dock widget: pick weights, load them in a worker, choose a device.

Thin: it reads the form, runs :func:`napari_lsmfm.model.load_foundation` as a job and
puts the result in the viewer's :class:`~napari_lsmfm.widgets.state.FoundationSlot`,
where the task widgets find it. torch is imported only when a job runs, so the
Plugins menu opens fast.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_lsmfm.engine.jobs import JobContext, Update
from napari_lsmfm.widgets.parts import DeviceCombo, row, show_update
from napari_lsmfm.widgets.runner import JobRunner
from napari_lsmfm.widgets.state import foundation_slot

if TYPE_CHECKING:
    import napari

WEIGHT_FILTER = "Weights (*.ckpt *.pt *.pth *.safetensors config.json);;All files (*)"


class FoundationWidget(QWidget):
    """Load a foundation model (a published lsm_fm checkpoint, ours, or the default)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.slot = foundation_slot(napari_viewer)
        self.runner = JobRunner(self)

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
        self.device_combo = DeviceCombo()
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(self._on_load_clicked)
        self.move_button = QPushButton("Move to device")
        self.move_button.setEnabled(False)
        self.move_button.clicked.connect(self._on_move_clicked)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.status = QLabel("No model loaded.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Weights", row(self.path_edit, browse))
        form.addRow("Vocabulary", row(self.vocab_edit, browse_vocab))
        form.addRow("", self.trust_box)
        form.addRow("Device", self.device_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(row(self.load_button, self.move_button))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.runner.updated.connect(self._on_update)
        self.runner.succeeded.connect(self._on_loaded)
        self.runner.failed.connect(self._on_failed)
        self.runner.stopped.connect(lambda: self.status.setText("Loading stopped."))
        self.runner.finished.connect(self._on_finished)
        if self.slot.foundation is not None:
            self._show_info(self.slot.foundation)

    # --- actions ---------------------------------------------------------
    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.device_combo.list_devices()  # imports torch: when first shown, not at import
        super().showEvent(event)

    def load(self) -> None:
        """Start loading the weights named in the form (what the Load button does)."""
        from napari_lsmfm.model import load_foundation

        path = self.path_edit.text().strip() or None
        vocab = self.vocab_edit.text().strip() or None
        device = self.device_combo.currentText()
        trusted = self.trust_box.isChecked()

        def job(ctx: JobContext) -> Any:
            ctx.report(0.0, "reading weights")
            return load_foundation(
                path, device=device, trusted=trusted, vocab=vocab,
                progress=ctx.progress_callback(0.0, 1.0),
            )

        self.status.setText(f"Loading {path or 'the default model'}…")
        self.load_button.setText("Stop")
        self.move_button.setEnabled(False)
        self.runner.start(job, "Loading foundation model")

    def _on_load_clicked(self) -> None:
        if self.runner.running:
            self.runner.cancel()
        else:
            self.load()

    def _on_move_clicked(self) -> None:
        foundation = self.slot.foundation
        if foundation is None or self.runner.running:
            return
        device = self.device_combo.currentText()

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.model import resolve_device

            ctx.report(0.1, f"moving to {device}")
            foundation.to_device(resolve_device(device))
            return foundation

        self.load_button.setEnabled(False)
        self.runner.start(job, "Moving foundation model")

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Foundation weights", "", WEIGHT_FILTER)
        if path:
            self.path_edit.setText(path)

    def _browse_vocab(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "BERT vocabulary", "", "vocab.txt (*.txt)")
        if path:
            self.vocab_edit.setText(path)

    # --- results ---------------------------------------------------------
    def _on_update(self, update: Update) -> None:
        show_update(update, self.progress_bar, self.status)

    def _on_loaded(self, foundation: Any) -> None:
        self.progress_bar.setValue(1000)
        self.slot.set(foundation)
        self._show_info(foundation)

    def _on_failed(self, exc: Exception) -> None:
        self.progress_bar.setValue(0)
        self.status.setText(f"<b>Not loaded.</b> {html.escape(str(exc))}")

    def _on_finished(self) -> None:
        self.load_button.setText("Load")
        self.load_button.setEnabled(True)
        self.move_button.setEnabled(self.slot.foundation is not None)

    def _show_info(self, foundation: Any) -> None:
        info = foundation.info()
        size = info.get("feature_size") or info.get("channels")
        text = "available" if info["text_tower"] else "not available"
        reason = getattr(foundation, "text_unavailable_reason", None)
        if reason and not info["text_tower"]:
            text += f" ({reason})"
        rows = [
            ("Architecture", f"{info['architecture']} ({size})"),
            ("Parameters", f"{info['parameters'] / 1e6:.1f} M"),
            ("Variant", info["variant"]),
            ("Text tower", text),
            ("Device", str(info.get("device", ""))),
            ("Source", str(info["source"])),
        ]
        self.status.setText(
            "<table>"
            + "".join(f"<tr><td><b>{k}</b></td><td>{html.escape(v)}</td></tr>" for k, v in rows)
            + "</table>"
        )

