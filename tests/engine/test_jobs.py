"""The job mechanism every long task uses: progress records and cancellation."""

import threading

import pytest

from napari_lsmfm.engine.jobs import Cancelled, JobContext, QueueContext, run_job


def counting_job(ctx: JobContext, steps: int = 5) -> int:
    for i in range(steps):
        ctx.report((i + 1) / steps, f"step {i + 1}", loss=1.0 / (i + 1))
    return steps


def test_run_job_reports_every_step_in_order():
    seen = []
    assert run_job(counting_job, seen.append) == 5
    assert [u.fraction for u in seen] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert seen[-1].values == {"loss": 0.2}
    assert seen[2].message == "step 3"


def test_cancel_stops_at_next_step():
    ctx = JobContext()
    calls = []

    def job(c: JobContext) -> None:
        for i in range(100):
            calls.append(i)
            if i == 3:
                c.cancel()
            c.report(i / 100)

    with pytest.raises(Cancelled):
        run_job(job, context=ctx)
    assert calls == [0, 1, 2, 3]


def test_queue_context_from_another_thread():
    ctx = QueueContext()
    t = threading.Thread(target=counting_job, args=(ctx, 3))
    t.start()
    t.join()
    updates = ctx.drain()
    assert [u.message for u in updates] == ["step 1", "step 2", "step 3"]
    assert ctx.drain() == []


def test_progress_callback_maps_sub_range():
    seen = []
    ctx = JobContext(seen.append)
    cb = ctx.progress_callback(0.5, 1.0)
    cb(0.0, "a")
    cb(0.5, "b")
    cb(1.0, "c")
    assert [u.fraction for u in seen] == [0.5, 0.75, 1.0]


def test_span_maps_a_step_into_its_part_of_the_progress():
    from napari_lsmfm.engine.jobs import JobContext, span

    updates = []
    ctx = JobContext(updates.append)
    part = span(ctx, 0.5, 1.0)
    part.report(0.5, "half", loss=1.0)
    part.report(None, "message only")
    assert [u.fraction for u in updates] == [0.75, None]
    assert updates[0].values == {"loss": 1.0}
    ctx.cancel()
    assert part.cancelled
    assert span(None, 0.0, 1.0) is None
