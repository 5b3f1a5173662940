"""Per-viewer state shared by the plugin's widgets (no Qt).

The Foundation model widget loads a model; the task widgets of the same viewer use
it. One :class:`FoundationSlot` per viewer, dropped when the viewer is collected.

When the first plugin widget of a viewer opens, the slot starts loading the default
foundation model in a background thread (:class:`Preload`; ``LSMFM_NO_PRELOAD=1``
turns it off): a job that needs a model waits for it instead of loading a second
copy, and a model the user loads meanwhile wins. The preload stops (its result is
dropped) when the last widget of the viewer closes.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from psygnal import Signal

from napari_lsmfm.engine.jobs import Cancelled
from napari_lsmfm.engine.libs import preload_enabled

Post = Callable[[Callable[[], None]], None]  # runs a function on the UI thread, later


def default_loader(device: str) -> Callable[[Callable[[float, str], None] | None], Any]:
    """``load(progress)``: the embedded default foundation model, loaded on ``device``."""

    def load(progress: Callable[[float, str], None] | None) -> Any:
        from napari_lsmfm.engine.libs import load_torch_libraries, warm_up

        warm_up()  # torch's training parts too, in parallel (a no-op when it ran)
        load_torch_libraries()  # without the GIL: the viewer keeps drawing meanwhile
        from napari_lsmfm.model import load_foundation

        return load_foundation(None, device=device, progress=progress)

    return load


class Preload:
    """One background load: ``load(progress)`` runs in a daemon thread; when it ends,
    ``post(finish)`` hands the outcome to the UI thread. Thread-safe to wait on and to
    cancel (a cancelled load stops at its next progress step).

    Attributes: ``started`` (time.monotonic() of the request), ``seconds`` (from
    ``started`` to the end, None while running), ``foundation`` / ``error`` (the
    outcome), ``done`` (an Event), ``message`` (the load's last progress message).
    """

    def __init__(self, load: Callable[[Callable[[float, str], None]], Any], post: Post,
                 finish: Callable[[Preload], None], started: float | None = None) -> None:
        self.started = time.monotonic() if started is None else float(started)
        self.seconds: float | None = None
        self.foundation: Any = None
        self.error: BaseException | None = None
        self.message = "starting"
        self.done = threading.Event()
        self._cancel = threading.Event()
        self._load, self._post, self._finish = load, post, finish
        self.thread = threading.Thread(target=self._run, name="lsmfm-preload", daemon=True)

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def start(self) -> Preload:
        self.thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True when the load has ended (loaded, failed or cancelled) within ``timeout``."""
        return self.done.wait(timeout)

    def _progress(self, fraction: float, message: str) -> None:
        self.message = message
        if self._cancel.is_set():
            raise Cancelled("the viewer closed")

    def _run(self) -> None:
        try:
            self.foundation = self._load(self._progress)
        except BaseException as exc:  # noqa: BLE001 - shown as a status, never a traceback
            self.error = exc
        finally:
            self.seconds = time.monotonic() - self.started
            self.done.set()
        if not self._cancel.is_set():
            self._post(lambda: self._finish(self))


class FoundationSlot:
    """Holds the foundation model loaded for one viewer; ``changed`` fires on load.

    ``preload``: the background load of the default model (None before the first widget
    opened or when turned off); ``preload_seconds``: from the first widget opening to
    the model being ready (None until then); ``preload_changed(text)``: a status line
    about the preload for the widgets ("" once it is in the slot).
    """

    changed = Signal(object)
    preload_changed = Signal(str)
    task_model_changed = Signal(str)  # the task whose fitted model changed

    def __init__(self) -> None:
        self.foundation: Any = None
        self.generation = 0  # counts set(): a preload started earlier does not overwrite
        self.preload: Preload | None = None
        self.preload_seconds: float | None = None
        self.users = 0  # open widgets of the viewer
        self.task_models: dict[str, tuple[Any, str]] = {}  # task -> (model, image name)

    def share_task_model(self, task: str, model: Any, image_name: str = "") -> None:
        """A widget fitted or loaded ``model`` for ``task`` ("segment", ...) on the image
        layer ``image_name``: other widgets of the viewer (review) can use it."""
        self.task_models[task] = (model, image_name)
        self.task_model_changed.emit(task)

    def task_model(self, task: str) -> tuple[Any, str]:
        """(model, image name) last shared for ``task``; (None, "") when none."""
        return self.task_models.get(task, (None, ""))

    def set(self, foundation: Any) -> None:
        self.foundation = foundation
        self.generation += 1
        self.changed.emit(foundation)

    # ------------------------------------------------------------ preload
    def start_preload(self, load: Callable[[Callable[[float, str], None]], Any], post: Post,
                      started: float | None = None) -> Preload | None:
        """Start ``load(progress)`` (the default model) in the background, unless the slot
        holds a model, a preload ran already, or preloading is off (``LSMFM_NO_PRELOAD``).
        ``post(fn)`` must run ``fn`` on the UI thread; ``started``: when the widget opened
        (time.monotonic()). Returns the preload started, else None."""
        if self.foundation is not None or self.preload is not None or not preload_enabled():
            return None
        generation = self.generation
        self.preload = Preload(load, post, lambda p: self._preloaded(p, generation), started)
        self.preload.start()
        self.preload_changed.emit("loading the embedded default in the background…")
        return self.preload

    def wait_for_preload(self, check: Callable[[], None] | None = None,
                         poll: float = 0.1) -> Any:
        """(In a job thread.) Wait for a running preload (``check()`` between waits may
        raise to stop waiting) and return the model it loaded: None when there was no
        preload, it failed or it was cancelled."""
        preload = self.preload
        if preload is None:
            return None
        while not preload.wait(poll):
            if check is not None:
                check()
        return None if preload.cancelled else preload.foundation

    def await_preload(self, ctx: Any) -> Any:
        """(In a job.) The model a running preload loads, waited for (the status says so);
        None when none runs, or it failed or was cancelled."""
        if not self.preloading():
            return None
        ctx.report(0.0, "waiting for the default foundation model (loading in the background)")
        return self.wait_for_preload(ctx.check)

    def foundation_or_default(self, ctx: Any, device: str) -> Any:
        """(In a job, ``ctx`` a JobContext.) The slot's model; else the one a running
        preload loads (waited for: no second copy); else the embedded default, loaded on
        ``device`` now."""
        if self.foundation is None:
            preloaded = self.await_preload(ctx)
            if self.foundation is None and preloaded is not None:
                return preloaded
        if self.foundation is not None:
            return self.foundation
        ctx.report(0.0, "loading the default foundation model")
        return default_loader(device)(None)

    def preloading(self) -> bool:
        """A preload runs now."""
        return self.preload is not None and self.preload.running and not self.preload.cancelled

    def attach(self) -> None:
        """A widget of the viewer opened."""
        self.users += 1

    def detach(self) -> None:
        """A widget of the viewer closed: the last one cancels a running preload."""
        self.users = max(0, self.users - 1)
        if self.users == 0 and self.preloading():
            self.preload.cancel()
            self.preload = None  # a widget opened later may preload again

    def _preloaded(self, preload: Preload, generation: int) -> None:
        """(UI thread.) The preload ended: its model goes in the slot unless the user
        chose one meanwhile."""
        if preload is not self.preload or preload.cancelled:
            return
        if preload.error is not None:
            self.preload_changed.emit(
                f"the default model could not be preloaded ({_one_line(preload.error)}); "
                "it loads when a task needs it")
            return
        self.preload_seconds = preload.seconds
        if self.foundation is None and self.generation == generation:
            self.set(preload.foundation)
        self.preload_changed.emit("")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


_SLOTS: dict[int, FoundationSlot] = {}


def foundation_slot(viewer: Any) -> FoundationSlot:
    """The slot of ``viewer`` (created on first use)."""
    # Plugin widgets get napari's PublicOnlyProxy of the viewer: key on the real one.
    viewer = getattr(viewer, "__wrapped__", viewer)
    key = id(viewer)
    if key not in _SLOTS:
        _SLOTS[key] = FoundationSlot()
        weakref.finalize(viewer, _SLOTS.pop, key, None)
    return _SLOTS[key]


def foundation_rows(foundation: Any) -> list[tuple[str, str]]:
    """(label, value) rows describing a loaded foundation model, for the widgets."""
    info = foundation.info()
    size = info.get("feature_size") or info.get("channels")
    text = "available" if info["text_tower"] else "not available"
    reason = getattr(foundation, "text_unavailable_reason", None)
    if reason and not info["text_tower"]:
        text += f" ({reason})"
    return [
        ("Architecture", f"{info['architecture']} ({size})"),
        ("Parameters", f"{info['parameters'] / 1e6:.1f} M"),
        ("Variant", str(info["variant"])),
        ("Text tower", text),
        ("Device", str(info.get("device", ""))),
        ("Source", str(info["source"])),
    ]


def describe_foundation(foundation: Any) -> str:
    """One line: architecture, variant, size and device of a loaded foundation model."""
    info = foundation.info()
    return (f"{info['architecture']} ({info['variant']}), "
            f"{info['parameters'] / 1e6:.1f} M parameters, on {info.get('device', '')}")
