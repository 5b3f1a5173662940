"""The one training loop under every task: best weights kept, NaN guard, Stop keeps the
best, step and loss records for the loss plot.

A task supplies the module whose weights are trained, ``step_fn() -> float`` (one
optimiser step; returns the step's loss) and ``evaluate() -> float`` (a fixed check,
lower is better). :class:`TrainLoop` runs the steps, evaluates every ``eval_every``
steps and at the last one, keeps the best weights, and on Stop (``Cancelled`` from the
job context) keeps the best of what it has. Optimisers, schedulers and mixed precision
stay in the task, which knows what it trains; :func:`grad_scaler` is their shared setup.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .jobs import Cancelled

__all__ = ["FitReport", "TrainLoop", "grad_scaler", "state_copy"]


@dataclass
class FitReport(Mapping):
    """What a fit did. Reads as a mapping too (``report["best_loss"]``), so scripts and
    the JSON summaries of the command line take it as a dict.

    history: the training loss of every step run; best_loss: the check's value for the
    weights kept; start_loss: the check's value before training (None when the starting
    weights did not compete); steps_done: steps run; stopped: Stop came before the last
    step; seconds: wall time; extra: task-specific entries (classes, n_annotated, ...).
    """

    history: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    start_loss: float | None = None
    steps_done: int = 0
    stopped: bool = False
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        if out["start_loss"] is None:
            out.pop("start_loss")
        return {**out, **extra}

    def update(self, **values: Any) -> FitReport:
        """Set fields by name; other names go to ``extra``. Returns self."""
        for key, value in values.items():
            if key in _FIELDS:
                setattr(self, key, value)
            else:
                self.extra[key] = value
        return self

    def _keys(self) -> list[str]:
        # the fields in order (start_loss only when the starting weights competed), then extra
        fields = [k for k in _FIELD_ORDER if not (k == "start_loss" and self.start_loss is None)]
        return fields + [k for k in self.extra if k not in _FIELDS]

    def __getitem__(self, key: str) -> Any:
        # one entry, no copy of the history (to_dict copies everything)
        if key in self.extra and key not in _FIELDS:
            return self.extra[key]
        if key in _FIELDS and not (key == "start_loss" and self.start_loss is None):
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


_FIELD_ORDER = ("history", "best_loss", "start_loss", "steps_done", "stopped", "seconds")
_FIELDS = set(_FIELD_ORDER)


def state_copy(module: Any) -> dict:
    """A detached copy of ``module``'s state dict (the weights to go back to)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class TrainLoop:
    """Run ``steps`` calls of ``step_fn`` on ``module`` and keep its best weights.

    Args:
        module: the torch module trained (its state dict is what is kept).
        step_fn: one optimiser step; returns the loss (float).
        evaluate: the check that picks the best weights (lower is better).
        steps: number of steps (at least 1).
        eval_every: evaluate every this many steps (and after the last one).
        ctx: a job context: ``report(fraction, message, step=, loss=, best_loss=)`` after
            each step, which is also where Stop is noticed.
        message: the progress line.
        start_best: the starting weights compete too (training never ends worse, by
            ``evaluate``, than it started).
        check_on_stop: on Stop, also evaluate the current weights and keep them if they
            beat the best so far (one more ``evaluate``); False returns at once with the
            best evaluated weights (the current ones only when none was evaluated yet).

    :meth:`run` loads the best weights into ``module`` and returns a :class:`FitReport`.
    A Stop after at least one step keeps the best weights (see ``check_on_stop``) and
    returns with ``stopped=True``; a Stop before any step puts the starting weights back
    and lets ``Cancelled`` propagate.
    """

    def __init__(self, module: Any, step_fn: Callable[[], float], evaluate: Callable[[], float],
                 steps: int, *, eval_every: int = 1, ctx: Any = None, message: str = "training",
                 start_best: bool = False, check_on_stop: bool = True) -> None:
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.module, self.step_fn, self.evaluate = module, step_fn, evaluate
        self.steps, self.every = steps, max(1, int(eval_every))
        self.ctx, self.message, self.start_best = ctx, message, bool(start_best)
        self.check_on_stop = bool(check_on_stop)

    def run(self) -> FitReport:
        t0 = time.perf_counter()
        history: list[float] = []
        best_loss, best_state, start_loss = math.inf, None, None
        if self.start_best:
            best_loss = start_loss = self.evaluate()
            best_state = state_copy(self.module)
        stopped = False
        try:
            for step in range(self.steps):
                loss = float(self.step_fn())
                if not math.isfinite(loss):
                    raise ValueError(
                        "the training loss became NaN/infinite; lower the learning rate"
                    )
                history.append(loss)
                if (step + 1) % self.every == 0 or step + 1 == self.steps:
                    current = self.evaluate()
                    if current < best_loss:
                        best_loss, best_state = current, state_copy(self.module)
                if self.ctx is not None:
                    self.ctx.report((step + 1) / self.steps, self.message, step=step + 1,
                                    loss=loss,
                                    best_loss=best_loss if best_state is not None else loss)
        except Cancelled:
            if not history:
                if best_state is not None:
                    self.module.load_state_dict(best_state)
                raise
            if best_state is None or self.check_on_stop:
                current = self.evaluate()
                if best_state is None or current < best_loss:
                    best_loss, best_state = current, state_copy(self.module)
            stopped = True
        self.module.load_state_dict(best_state)
        return FitReport(history=history, best_loss=best_loss, start_loss=start_loss,
                         steps_done=len(history), stopped=stopped,
                         seconds=time.perf_counter() - t0)


def grad_scaler(autocast_dtype: Any, device: Any) -> Any:
    """A ``torch.amp.GradScaler``, on only for fp16 autocast on CUDA (bf16 and fp32 need
    none)."""
    import torch

    fp16 = autocast_dtype == torch.float16
    on_cuda = getattr(device, "type", "") == "cuda"
    return torch.amp.GradScaler("cuda", enabled=bool(fp16 and on_cuda))
