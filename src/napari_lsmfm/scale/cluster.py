"""Where the blocks run: this process, a local dask.distributed cluster, or a scheduler.

An executor is ``run(fn, indices) -> iterator of (index, result)`` yielding blocks as
they finish, in any order. :func:`local_executor` runs them here, one after the other
(checking ``ctx`` for Stop between blocks). :func:`dask_executor` submits one task per
block to a ``distributed.Client`` (from ``--scheduler ADDRESS``, an existing cluster
on any number of machines, or ``--workers N``, a ``LocalCluster`` made here with one
worker per GPU where there are GPUs), so scheduling, retries and data locality are
dask.distributed's, not ours. Workers must see the same file system as this process
(the image, the model and the output store are opened by path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["cluster_client", "dask_executor", "local_executor", "worker_device"]

Executor = Callable[[Callable[[int], Any], Sequence[int]], Iterator[tuple[int, Any]]]


def local_executor(ctx: Any = None) -> Executor:
    """Run the blocks in this process, in order; Stop (``ctx``) ends at the next block."""

    def run(fn: Callable[[int], Any], indices: Sequence[int]) -> Iterator[tuple[int, Any]]:
        for index in indices:
            if ctx is not None:
                ctx.check()
            yield index, fn(index)

    return run


def dask_executor(client: Any, ctx: Any = None) -> Executor:
    """Run the blocks as dask.distributed tasks on ``client``'s workers, yielding each as
    it finishes; Stop (``ctx``) cancels the tasks not yet finished."""

    def run(fn: Callable[[int], Any], indices: Sequence[int]) -> Iterator[tuple[int, Any]]:
        from distributed import as_completed

        if not indices:
            return
        futures = client.map(fn, list(indices), pure=False)
        owner = {f.key: i for f, i in zip(futures, indices, strict=True)}
        try:
            for future in as_completed(futures):
                if ctx is not None:
                    ctx.check()
                yield owner[future.key], future.result()
        finally:
            client.cancel([f for f in futures if not f.done()])

    return run


@contextmanager
def cluster_client(*, scheduler: str | None = None, workers: int | None = None
                   ) -> Iterator[Any]:
    """A ``distributed.Client``: connected to ``scheduler`` (an address such as
    ``tcp://host:8786``), or to a new ``LocalCluster`` of ``workers`` processes (each with
    an equal share of the CPU threads), closed on exit."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    n = max(1, int(workers or 1))
    threads = max(1, (os.cpu_count() or 1) // n)
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      dashboard_address=None,
                      env={"OMP_NUM_THREADS": str(threads), "LSMFM_WORKER_THREADS": str(threads)},
                      ) as cluster, Client(cluster) as client:
        yield client


def worker_device(device: str) -> str:
    """The device of this block's worker: ``auto`` on a dask worker with GPUs picks GPU
    ``worker number % GPUs``, so ``--workers N`` on an N-GPU machine uses each GPU once."""
    if device != "auto":
        return device
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return device
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return device
    name = str(worker.name)
    rank = int(name) if name.isdigit() else abs(hash(name))
    return f"cuda:{rank % count}"
