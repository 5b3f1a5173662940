"""Run a :mod:`~napari_lsmfm.engine.jobs` in a napari thread worker.

The job runs in napari's thread pool (``napari.qt.threading.create_worker``); it
talks to the UI only through a queue of :class:`~napari_lsmfm.engine.jobs.Update`
records, drained by a timer on the UI thread. Progress shows in the widget, or, for a
job without one (a menu command), in napari's activity dock (``napari.utils.progress``,
whose spinner repaints the window ~30 times a second: a dock widget's job does without
it, see :data:`POLL_MS`); errors become viewer notifications; the job is cancelled
when its widget leaves the viewer or is destroyed (window closed). :class:`UiPost` and
:func:`in_background` run imports and the model preload off the UI thread.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Callable
from typing import Any, ClassVar

# here, on the UI thread: imported in a job's start they could wait on the preload's lock
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent, QObject, QTimer, Signal, Slot
from qtpy.QtWidgets import QWidget

from napari_lsmfm.engine.jobs import Cancelled, JobContext, QueueContext, Update
from napari_lsmfm.engine.libs import import_quietly, load_torch_libraries

# How often the job's progress reaches the screen. Each repaint of napari's window runs
# inside its Python event handler, so it holds the GIL (about 20 ms each under Xvfb's
# software OpenGL): at 20 repaints a second the job thread, whose every small torch op
# lets go of the GIL and waits to get it back, trained 3-5x slower than in the CLI.
POLL_MS = 200


class UiPost(QObject):
    """``post(fn)`` from any thread runs ``fn()`` on the thread this object was made in
    (the UI thread), at its next event-loop turn; the object stays alive until then."""

    posted = Signal(object)
    _alive: ClassVar[set[UiPost]] = set()  # objects with posts not run yet
    _lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__()
        self._pending = 0
        self.posted.connect(self._run)

    def __call__(self, fn: Callable[[], Any]) -> None:
        with self._lock:
            self._pending += 1
            UiPost._alive.add(self)
        self.posted.emit(fn)

    @Slot(object)
    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        finally:
            with self._lock:
                self._pending -= 1
                if not self._pending:
                    UiPost._alive.discard(self)


def imported(name: str) -> bool:
    """Module ``name`` is imported and done initialising (importing it costs nothing
    now, and does not wait for another thread that is importing it)."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def in_background(work: Callable[[], Any], then: Callable[[Any], Any]) -> threading.Thread:
    """Run ``work()`` in a daemon thread (e.g. a slow import), then ``then(result)`` on the
    UI thread; a failure of ``work`` is passed to ``then`` as the exception."""
    post = UiPost()

    def run() -> None:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - handed to `then`, which decides
            result = exc
        post(lambda: then(result))

    thread = threading.Thread(target=run, name="lsmfm-background", daemon=True)
    thread.start()
    return thread


def when_imported(module: str, owner: QObject, fn: Callable[[], Any]) -> None:
    """``fn()`` now if ``module`` is imported, else once a background thread has imported
    it (on the UI thread; not at all if Qt deleted ``owner`` meanwhile)."""
    if imported(module):
        fn()
        return
    in_background(lambda: import_quietly(module), lambda _: if_alive(owner, fn))


def if_alive(owner: QObject, fn: Callable[[], Any]) -> None:
    """``fn()`` unless Qt deleted ``owner`` (its window closed)."""
    try:
        owner.objectName()
    except RuntimeError:  # wrapped C/C++ object has been deleted
        return
    fn()


class JobRunner(QObject):
    """Start one job at a time behind a widget; signals arrive on the UI thread.

    Signals: ``updated(Update)``, ``succeeded(result)``, ``failed(Exception)``,
    ``stopped()`` (cancelled by the user), ``finished()`` (always, last).
    """

    updated = Signal(object)
    succeeded = Signal(object)
    failed = Signal(object)
    stopped = Signal()
    finished = Signal()

    def __init__(self, owner: QWidget, *, activity: bool = True) -> None:
        super().__init__(owner)
        self.activity = activity  # show the job in napari's activity dock
        # A list, so the destroyed-callback can reach the live context without `self`.
        self._ctx_box: list[QueueContext | None] = [None]
        self._worker: Any = None
        self._done = threading.Event()  # set by the job thread when fn returns or raises
        self._done.set()
        self._active = False  # UI-thread view: True from start() until `finished` is emitted
        self._showing = False  # inside _poll (napari's progress bar may process events)
        self._pbar: Any = None
        self._description = ""
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)
        # Stop the job when the widget goes away: removed from the viewer (its parent
        # becomes None) or destroyed with the window. The closure does not touch `self`.
        owner.installEventFilter(self)
        done, box = self._done, self._ctx_box
        owner.destroyed.connect(lambda *_: _cancel_and_wait(box[0], done))

    @property
    def _ctx(self) -> QueueContext | None:
        return self._ctx_box[0]

    @property
    def running(self) -> bool:
        """True from :meth:`start` until every result signal has been delivered."""
        return self._active

    @property
    def context(self) -> JobContext | None:
        return self._ctx

    def start(self, fn: Callable[[JobContext], Any], description: str) -> None:
        """Run ``fn(ctx)`` in a worker thread. Raises RuntimeError if a job is running."""

        if self.running:
            raise RuntimeError(f"{self._description} is still running; stop it first.")
        _pause_gc()
        ctx = QueueContext()
        self._ctx_box[0] = ctx
        self._description = description
        self._done.clear()
        self._active = True
        done = self._done

        def run() -> Any:
            try:
                load_torch_libraries()  # before a job's first torch import, without the GIL
                return fn(ctx)
            finally:
                done.set()

        worker = create_worker(run, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._later(self._on_returned))
        worker.errored.connect(self._later(self._on_errored))
        worker.finished.connect(self._later(self._on_finished))
        self._worker = worker
        self._pbar = progress(total=1000, desc=description) if self.activity else None
        self._timer.start()
        worker.start()

    def cancel(self) -> None:
        """Ask the running job to stop at its next step."""
        if self._ctx is not None:
            self._ctx.cancel()

    def wait(self, timeout: float = 5.0) -> bool:
        """Block until the job thread ends; True if it did within ``timeout`` s."""
        return self._done.wait(timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel and wait: used when the widget or the viewer closes."""
        _cancel_and_wait(self._ctx, self._done, timeout)

    # --- UI thread -------------------------------------------------------
    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Type.ParentChange and isinstance(obj, QWidget):
            if obj.parent() is None and self.running:
                self.cancel()
        return False

    def _later(self, handler: Callable[..., None]) -> Callable[..., None]:
        """Run ``handler`` now, or, if it arrives while progress is being shown, after.

        napari's progress bar calls ``QApplication.processEvents()`` when its value
        changes, which would otherwise run the job's result handlers in the middle of
        :meth:`_poll` and out of order (``finished`` before ``returned``).
        """

        def call(*args: Any) -> None:
            if self._showing:
                QTimer.singleShot(0, lambda: call(*args))
            else:
                handler(*args)

        return call

    def _poll(self) -> None:
        if self._ctx is None or self._showing:
            return
        self._showing = True
        try:
            updates = self._ctx.drain()
            if updates:  # napari's bar once per poll (it processes events); widgets see all
                self._show(_latest(updates))
            for update in updates:
                self.updated.emit(update)
        finally:
            self._showing = False

    def _show(self, update: Update) -> None:
        if self._pbar is None:
            return
        if update.fraction is not None:
            self._pbar.n = int(1000 * update.fraction)
        if update.message:
            self._pbar.set_description(f"{self._description}: {update.message}")
        else:
            self._pbar.refresh()

    def _on_returned(self, result: Any) -> None:
        self._poll()
        self.succeeded.emit(result)

    def _on_errored(self, exc: Exception) -> None:

        self._poll()
        if isinstance(exc, Cancelled):
            show_info(f"{self._description} stopped.")
            self.stopped.emit()
            return
        show_error(f"{self._description} failed: {exc}")
        self.failed.emit(exc)

    def _on_finished(self) -> None:
        self._timer.stop()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._worker = None
        self._active = False
        _resume_gc()
        self.finished.emit()


def _latest(updates: list[Update]) -> Update:
    """One record for a batch: the last fraction and the last message of ``updates``."""
    fraction = next((u.fraction for u in reversed(updates) if u.fraction is not None), None)
    message = next((u.message for u in reversed(updates) if u.message), "")
    return Update(fraction, message, dict(updates[-1].values))


_GC_PAUSES = [0]


def _pause_gc() -> None:
    """No cyclic garbage collection while jobs run: a full collection, triggered on the
    UI thread while a job allocates, pauses the viewer for 0.2-0.6 s (napari and vispy
    hold millions of objects). What lives now is frozen out of later scans too."""
    if _GC_PAUSES[0] == 0:
        gc.freeze()
        gc.disable()
    _GC_PAUSES[0] += 1


def _resume_gc() -> None:
    _GC_PAUSES[0] = max(0, _GC_PAUSES[0] - 1)
    if _GC_PAUSES[0] == 0:
        gc.enable()


def _cancel_and_wait(ctx: JobContext | None, done: threading.Event, timeout: float = 5.0) -> None:
    if ctx is not None:
        ctx.cancel()
    done.wait(timeout)
