"""Long work as a job: progress records, a cancel flag, no Qt.

Every long task (load a model, finetune, predict, deblur, pretrain) is a plain
function ``fn(ctx: JobContext) -> result`` that calls ``ctx.report(...)`` at each
step. ``ctx.report`` also checks the cancel flag, so a cancelled job stops at its
next step with :class:`Cancelled`. The same function runs synchronously from a
script or the CLI (:func:`run_job`) and in a thread behind a napari widget
(:mod:`napari_lsmfm.widgets.runner`), which reads the records from a queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside a job when the user asked it to stop."""


@dataclass(frozen=True)
class Update:
    """One progress record.

    fraction: overall progress in [0, 1], or None when unknown.
    message: one line for a status bar.
    values: numbers to plot or log (e.g. ``{"step": 12, "loss": 0.31}``).
    """

    fraction: float | None
    message: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.monotonic)


class JobContext:
    """What a running job sees: report progress, check for cancellation."""

    def __init__(self, on_update: Callable[[Update], None] | None = None) -> None:
        self._cancel = threading.Event()
        self._on_update = on_update
        self.last: Update | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the job to stop at its next step (thread-safe)."""
        self._cancel.set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if a stop was requested."""
        if self._cancel.is_set():
            raise Cancelled("stopped by the user")

    def report(self, fraction: float | None, message: str = "", **values: Any) -> None:
        """Publish progress, then stop here if a cancel was requested."""
        if fraction is not None:
            fraction = min(max(float(fraction), 0.0), 1.0)
        update = Update(fraction, message, dict(values))
        self.last = update
        if self._on_update is not None:
            self._on_update(update)
        self.check()

    def progress_callback(self, start: float = 0.0, stop: float = 1.0) -> Callable[..., None]:
        """A ``callback(fraction, message)`` mapping a sub-task's [0, 1] onto [start, stop]
        (the ``report`` of :func:`span`, for APIs that take a callback)."""
        return Span(self, start, stop).report


class QueueContext(JobContext, Generic[T]):
    """A context whose updates go to a queue, drained by the UI thread."""

    def __init__(self) -> None:
        self.updates: queue.Queue[Update] = queue.Queue()
        super().__init__(self.updates.put)

    def drain(self) -> list[Update]:
        """All updates published since the last call (call from the UI thread)."""
        out = []
        while True:
            try:
                out.append(self.updates.get_nowait())
            except queue.Empty:
                return out


def run_job(
    fn: Callable[[JobContext], T],
    on_update: Callable[[Update], None] | None = None,
    context: JobContext | None = None,
) -> T:
    """Run a job in this thread (scripts, CLI, tests); returns what ``fn`` returns."""
    ctx = context if context is not None else JobContext(on_update)
    return fn(ctx)


def terminal_progress(prefix: str = "") -> Callable[[Update], None]:
    """An ``on_update`` printing a one-line progress bar to stderr (for the CLI)."""
    import sys

    last = [0.0]

    def show(update: Update) -> None:
        now = time.monotonic()
        if update.fraction is not None and update.fraction < 1.0 and now - last[0] < 0.2:
            return
        last[0] = now
        frac = update.fraction if update.fraction is not None else 0.0
        bar = "#" * int(30 * frac)
        vals = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in update.values.items()
        )
        sys.stderr.write(f"\r{prefix}[{bar:<30}] {100 * frac:5.1f}% {update.message} {vals}"[:160])
        if update.fraction is not None and update.fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


class Span:
    """A job context seen through a [start, stop] part of its parent's progress: a step
    of a longer job reports its own 0..1 and the parent's bar moves within the part.
    ``values=False`` drops the step values (a loss) on the way: for side fits whose
    curve is not the one the user watches."""

    def __init__(self, ctx: Any, start: float, stop: float, *, values: bool = True) -> None:
        self.ctx, self.start, self.stop = ctx, float(start), float(stop)
        self.values = bool(values)

    @property
    def cancelled(self) -> bool:
        return bool(getattr(self.ctx, "cancelled", False))

    def check(self) -> None:
        self.ctx.check()

    def report(self, fraction: float | None, message: str = "", **values: Any) -> None:
        if fraction is not None:
            fraction = self.start + (self.stop - self.start) * float(fraction)
        self.ctx.report(fraction, message, **(values if self.values else {}))


def span(ctx: Any, start: float, stop: float, *, values: bool = True) -> Span | None:
    """``ctx`` narrowed to the [start, stop] part of its progress (None stays None)."""
    return None if ctx is None else Span(ctx, start, stop, values=values)
