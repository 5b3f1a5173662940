"""The base of the plugin's dock widgets: everything a task form shares.

A task widget is a short form plus its job. :class:`TaskWidget` holds the rest:

- an image picker (``image_combo``) and a device picker (``device_combo``);
- run buttons (:meth:`run_button`) and the one way to stop a job: while a job runs,
  the button that started it reads "Stop" and asks the job to stop at its next step
  (training keeps the best model so far); the other run buttons and the idle-only
  controls wait, disabled;
- one job at a time (:class:`~napari_lsmfm.widgets.runner.JobRunner`): progress bar,
  a plain-text status line, the loss curve, errors in the status line and the
  viewer's notifications;
- "Save model…" / "Load model…" where the task has them (:attr:`model_buttons`);
- the viewer's one foundation model (:func:`~napari_lsmfm.widgets.state.foundation_slot`):
  shown in every widget, shared by every job; the first widget of a viewer preloads the
  default one in the background (jobs wait for it; ``LSMFM_NO_PRELOAD=1``: off);
- cleanup: the job stops when the widget leaves the viewer or is destroyed, and the
  viewer's signals let go of the widget when Qt deletes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from qtpy.QtWidgets import (
    QFileDialog,
    QLayout,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_lsmfm.engine.jobs import JobContext, Update
from napari_lsmfm.widgets.layout import plain_label, scrolled
from napari_lsmfm.widgets.parts import (
    DeviceCombo,
    LayerCombo,
    LayerQueue,
    LossPlot,
    follow,
    volume_layer,
)
from napari_lsmfm.widgets.runner import JobRunner, UiPost, when_imported
from napari_lsmfm.widgets.state import default_loader, describe_foundation, foundation_slot

Job = Callable[[JobContext], Any]


class TaskWidget(QWidget):
    """A dock widget running one task's jobs; subclasses add the form and the jobs.

    Class settings: ``uses_image`` (an image picker), ``foundation_line`` (a line naming
    the viewer's foundation model), ``loss_curve`` (a loss plot),
    ``model_buttons`` (``"save"``, ``"load"``), ``model_name`` (for the file dialogs),
    ``greeting`` (the first status line), ``failed_prefix`` / ``stopped_message`` (the
    status after a failed / stopped job), ``nothing_to_save`` (said by Save with no model).
    """

    uses_image: ClassVar[bool] = True
    foundation_line: ClassVar[bool] = True
    loss_curve: ClassVar[bool] = True
    model_buttons: ClassVar[tuple[str, ...]] = ()
    model_name: ClassVar[str] = "task"
    greeting: ClassVar[str] = ""
    failed_prefix: ClassVar[str] = "Failed:"
    stopped_message: ClassVar[str] = "Stopped."
    nothing_to_save: ClassVar[str] = "Nothing to save yet."

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.slot = slot = foundation_slot(napari_viewer)
        slot.attach()
        self.destroyed.connect(lambda *_: slot.detach())  # the closure does not hold self
        self.runner = JobRunner(self, activity=False)  # the widget shows the progress
        self.layer_queue = LayerQueue()
        self.image_combo = LayerCombo(napari_viewer, "Image") if self.uses_image else None
        self.device_combo = DeviceCombo()
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.loss_plot = LossPlot() if self.loss_curve else None
        self.status = plain_label(self.greeting)
        self.foundation_label = plain_label() if self.foundation_line else None
        if self.foundation_label is not None:
            self.foundation_label.setToolTip(
                "The viewer's foundation model (Foundation model widget); the tasks use it")
        self.save_button = self._dialog_button("save", "Save model…", self.ask_save_model)
        self.load_button = self._dialog_button("load", "Load model…", self.ask_load_model)
        self._run_buttons: list[tuple[QPushButton, str, Callable[[], Any]]] = []
        self._idle_only: list[QWidget] = [b for b in (self.save_button, self.load_button) if b]
        self._stopper: QPushButton | None = None
        self._after: Callable[[Any], Any] | None = None  # what the running job's result is for

        self.runner.updated.connect(self.show_update)
        self.runner.succeeded.connect(self._on_succeeded)
        self.runner.failed.connect(self.on_failed)
        self.runner.stopped.connect(lambda: self.say(self.stopped_message))
        self.runner.finished.connect(self._on_finished)
        follow(self, self.slot.changed, self.show_foundation)
        follow(self, self.slot.preload_changed, self.show_preload)
        self.show_foundation(self.slot.foundation)
        self.preload_foundation()

    # ------------------------------------------------------------------ form
    def set_layout(self, *parts: QWidget | QLayout) -> None:
        """Stack the form's ``parts`` in a scroll area (docks stacked on a small screen
        still fit), then the progress bar, status and foundation lines below it."""
        scroll = scrolled(*parts)
        layout = QVBoxLayout(self)
        layout.addWidget(scroll, 1)
        for widget in (self.progress_bar, self.status, self.foundation_label):
            if widget is not None:
                layout.addWidget(widget)

    def run_button(self, text: str, action: Callable[[], Any]) -> QPushButton:
        """A button that runs ``action`` (which starts a job with ``button=`` this one); it
        reads "Stop" and stops the job while that job runs."""
        button = QPushButton(text)
        self._run_buttons.append((button, text, action))
        button.clicked.connect(lambda *_: self._on_run_clicked(button))
        return button

    def idle_only(self, *widgets: QWidget) -> None:
        """``widgets`` are disabled while a job runs."""
        self._idle_only.extend(widgets)

    @property
    def stop_button(self) -> QPushButton | None:
        """The button that stops the running job (the run button that started it); None
        when no job runs."""
        return self._stopper if self.runner.running else None

    @property
    def busy(self) -> bool:
        """A job runs, or its result layers are still being added."""
        return self.runner.running or self.layer_queue.pending

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        # listing the GPUs needs torch: imported in the background (seconds, which would
        # freeze the viewer), then listed on the UI thread
        when_imported("napari_lsmfm.model", self.device_combo, self.device_combo.list_devices)
        super().showEvent(event)

    def image_layer(self) -> Any:
        """The chosen image layer, or ValueError saying what to choose."""
        return volume_layer(self.image_combo.layer() if self.image_combo else None)

    # ------------------------------------------------------------------ jobs
    def start_job(self, job: Job, description: str, done: Callable[[Any], Any] | None = None,
                  *, button: QPushButton | None = None, message: str | None = None) -> bool:
        """Run ``job(ctx)`` in a worker thread; ``done(result)`` runs on the UI thread when it
        returns. ``button``: the run button that started it (it reads "Stop" meanwhile);
        ``message``: the status line meanwhile (default ``description…``). Starts nothing
        and returns False while another job runs."""
        if self.runner.running:
            return False
        self._after = done
        self._stopper = button
        self.progress_bar.setValue(0)
        self.say(f"{description}…" if message is None else message)
        self.runner.start(job, description)
        self.update_buttons()
        return True

    def preload_foundation(self) -> None:
        """Load the default model in the background (:meth:`FoundationSlot.start_preload`)."""
        self.slot.start_preload(default_loader(self.device_combo.currentText()), UiPost())

    def foundation_for(self, ctx: JobContext, device: str) -> Any:
        """(In a job.) The viewer's foundation model, else the default one being preloaded
        (waited for), else the embedded default loaded on ``device`` now (pass it to
        :meth:`share_foundation` when the job is done)."""
        return self.slot.foundation_or_default(ctx, device)

    def share_foundation(self, foundation: Any) -> None:
        """Make ``foundation`` the viewer's when it has none yet (every widget shows it)."""
        if foundation is not None and self.slot.foundation is None:
            self.slot.set(foundation)

    # --------------------------------------------------------------- results
    def say(self, text: str, error: bool = False) -> None:
        """Show ``text`` (plain text) in the status line; bold for an error."""
        font = self.status.font()
        font.setBold(error)
        self.status.setFont(font)
        self.status.setText(text)

    def show_update(self, update: Update) -> None:
        """A job's progress record: the bar (0-1000), the loss curve, the message."""
        if update.fraction is not None:
            self.progress_bar.setValue(int(1000 * update.fraction))
        if self.loss_plot is not None and "loss" in update.values:
            self.loss_plot.add(float(update.values["loss"]))
        if update.message:
            self.say(update.message)

    def show_preload(self, text: str) -> None:
        """News of the default model's preload: ``text`` says why it failed, if it did."""
        if self.foundation_label is None or self.slot.foundation is not None:
            return
        if text and not self.slot.preloading():
            self.foundation_label.setText(f"Foundation: {text}")
        else:
            self.show_foundation(None)

    def show_foundation(self, foundation: Any) -> None:
        """The viewer's foundation model changed (loaded here or in another widget)."""
        if self.foundation_label is None:
            return
        when = "loading in the background…" if self.slot.preloading() else "loaded on first use"
        self.foundation_label.setText(
            f"Foundation: the embedded default ({when})" if foundation is None
            else f"Foundation: {describe_foundation(foundation)}")

    def on_failed(self, exc: Exception) -> None:
        self.progress_bar.setValue(0)
        self.say(f"{self.failed_prefix} {exc}", error=True)

    def update_buttons(self) -> None:
        """Run buttons and idle-only controls for the current state (running or not)."""
        running = self.runner.running
        for button, text, _ in self._run_buttons:
            stops = running and button is self._stopper
            button.setText("Stop" if stops else text)
            button.setEnabled(stops or not running)
        for widget in self._idle_only:
            widget.setEnabled(not running)

    # ---------------------------------------------------------- task models
    def current_model(self) -> Any:
        """The model Save would write (None: nothing to save yet)."""
        return None

    def save_model(self, folder: str) -> None:
        """Save :meth:`current_model` to a new ``folder``; the status says where or why not."""
        model = self.current_model()
        if model is None:
            self.say(self.nothing_to_save, error=True)
            return
        try:
            path = model.save(folder)
        except (ValueError, OSError) as exc:
            self.say(f"Not saved: {exc}", error=True)
            return
        self.say(f"Saved to {path}")

    def load_model(self, folder: str) -> None:
        """Load a saved model ``folder`` in a job (tasks with a Load button)."""
        raise NotImplementedError

    def ask_save_model(self) -> None:
        title = f"Save {self.model_name} model (a new folder)"
        folder = QFileDialog.getSaveFileName(self, title, "", "")[0]
        if folder:
            self.save_model(folder)

    def ask_load_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, f"Load {self.model_name} model folder")
        if folder:
            self.load_model(folder)

    # -------------------------------------------------------------- private
    def _dialog_button(self, kind: str, text: str, slot: Callable[[], Any]
                       ) -> QPushButton | None:
        if kind not in self.model_buttons:
            return None
        button = QPushButton(text)
        button.clicked.connect(lambda *_: slot())
        return button

    def _on_run_clicked(self, button: QPushButton) -> None:
        if self.runner.running:
            if button is self._stopper:
                self.runner.cancel()
            return
        next(action for b, _, action in self._run_buttons if b is button)()

    def _on_succeeded(self, result: Any) -> None:
        self.progress_bar.setValue(1000)
        if self._after is not None:
            self._after(result)

    def _on_finished(self) -> None:
        self._after = None
        self._stopper = None
        self.update_buttons()

