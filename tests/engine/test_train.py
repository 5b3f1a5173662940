"""The one training loop: best weights kept, NaN guard, Stop keeps the best."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from napari_lsmfm.engine.jobs import Cancelled, JobContext
from napari_lsmfm.engine.train import FitReport, TrainLoop, grad_scaler, state_copy


def _problem(losses):
    """A one-weight module and a step that sets the weight to the next scripted loss."""
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(10.0)
    it = iter(losses)

    def step() -> float:
        value = next(it)
        with torch.no_grad():
            module.weight.fill_(value)
        return value

    def evaluate() -> float:
        return float(module.weight.detach())

    return module, step, evaluate


def test_keeps_the_best_weights_not_the_last():
    module, step, evaluate = _problem([5.0, 2.0, 4.0, 3.0])
    report = TrainLoop(module, step, evaluate, 4).run()
    assert float(module.weight.detach()) == 2.0
    assert report.best_loss == 2.0 and report.steps_done == 4 and not report.stopped
    assert report.history == [5.0, 2.0, 4.0, 3.0]
    assert report["best_loss"] == 2.0 and dict(report)["steps_done"] == 4
    assert "start_loss" not in report  # the starting weights did not compete


def test_start_best_means_training_never_ends_worse():
    module, step, evaluate = _problem([12.0, 11.0])
    report = TrainLoop(module, step, evaluate, 2, start_best=True).run()
    assert float(module.weight.detach()) == 10.0 and report.start_loss == 10.0


def test_eval_every_checks_only_every_nth_step_and_the_last():
    module, step, evaluate = _problem([1.0, 5.0, 6.0, 7.0, 8.0])
    TrainLoop(module, step, evaluate, 5, eval_every=2).run()
    assert float(module.weight.detach()) == 5.0  # step 1's 1.0 was never evaluated


def test_nan_loss_stops_with_a_message():
    module, step, evaluate = _problem([1.0, math.nan])
    with pytest.raises(ValueError, match="NaN/infinite; lower the learning rate"):
        TrainLoop(module, step, evaluate, 2).run()


def test_stop_keeps_the_best_so_far_and_reports_progress():
    module, step, evaluate = _problem([5.0, 2.0, 4.0, 3.0])
    seen = []

    def on_update(update):
        seen.append(update.values)
        if update.values["step"] == 3:
            ctx.cancel()

    ctx = JobContext(on_update)
    report = TrainLoop(module, step, evaluate, 4, ctx=ctx).run()
    assert report.stopped and report.steps_done == 3 and float(module.weight.detach()) == 2.0
    assert [v["step"] for v in seen] == [1, 2, 3]
    assert seen[1]["best_loss"] == 2.0


def test_stop_without_a_last_check_returns_the_best_checked():
    module, step, evaluate = _problem([5.0, 2.0, 1.0, 3.0])

    def on_update(update):
        if update.values["step"] == 3:
            ctx.cancel()

    ctx = JobContext(on_update)
    report = TrainLoop(module, step, evaluate, 4, eval_every=2, ctx=ctx,
                       check_on_stop=False).run()
    assert report.stopped and float(module.weight.detach()) == 2.0  # step 3's 1.0 was never checked
    ctx = JobContext(on_update)
    module, step, evaluate = _problem([5.0, 2.0, 1.0, 3.0])
    report = TrainLoop(module, step, evaluate, 4, eval_every=2, ctx=ctx).run()
    assert float(module.weight.detach()) == 1.0  # checked on Stop


def test_stop_before_any_step_restores_and_propagates():
    module, _, evaluate = _problem([])

    def step() -> float:
        with torch.no_grad():
            module.weight.fill_(-1.0)
        raise Cancelled("stopped by the user")

    with pytest.raises(Cancelled):
        TrainLoop(module, step, evaluate, 3, start_best=True).run()
    assert float(module.weight.detach()) == 10.0


def test_bad_steps_and_helpers():
    module, step, evaluate = _problem([1.0])
    with pytest.raises(ValueError, match="at least 1"):
        TrainLoop(module, step, evaluate, 0)
    copy = state_copy(module)
    with torch.no_grad():
        module.weight.fill_(3.0)
    assert float(copy["weight"]) == 10.0
    assert not grad_scaler(torch.float16, torch.device("cpu")).is_enabled()
    report = FitReport().update(steps_done=2, classes=[2])
    assert report.steps_done == 2 and report["classes"] == [2]
