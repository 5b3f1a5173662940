"""``predict_volume``: a saved task model over a volume larger than memory, block by block.

The volume is cut into blocks (:class:`~.blocks.BlockPlan`) that are a whole number of
window steps, so each block read with a halo of half a window overlap is covered by
windows that never run twice (:func:`~.tasks.windows_of`). Every block is one task:
read (block + halo), tested for foreground (:mod:`.foreground`; empty ones skip the
network), predicted with the whole volume's intensity range, and written into whole
chunks of OME-Zarr outputs; memory is bounded by the block, never by the volume. Blocks
run here, on a local ``dask.distributed`` cluster or on an existing scheduler
(:mod:`.cluster`). Outputs are built under their final names, marked partial, with one
record per finished block (:class:`~.blocks.Ledger`): a run killed midway continues with
``resume=True`` and ends equal to an uninterrupted one. Then instance labels are made
block by block and stitched across borders (:mod:`.stitch`), the pyramids are written
(:mod:`.pyramid`) and the partial marks cleared.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.engine.libs import release_free_memory, share_malloc_arenas

from .blocks import BlockPlan, Ledger
from .cluster import worker_device
from .foreground import Foreground, overview
from .tasks import adapter_for, windows_of

__all__ = ["BLOCK_STEPS", "BlockJob", "block_settings", "choose_plan", "context", "load_task",
           "own_settings", "predict_volume", "run_block"]

BLOCK_STEPS = (4, 4, 4)  # window steps per block and axis: (192, 384, 384) for 64 x 128 x 128
BLOCK_VOXELS = 2**24  # 17 M voxels: the block, its halo and its outputs stay small
CHUNK_VOXELS = (64, 320, 320)  # the largest output chunk wanted per axis
BLOCK_BYTES = 2**26  # the tiled engine's buffers inside one block (crop: no window twice)


def choose_plan(shape: Sequence[int], step: Sequence[int],
                block: Sequence[int] | None = None) -> tuple[BlockPlan, tuple[int, ...]]:
    """The blocks (whole window steps; ``block`` is rounded up to them) and the output
    chunks (whole divisors of a block, at most :data:`CHUNK_VOXELS` where a step allows)."""
    shape = tuple(int(s) for s in shape)
    if block is None:  # four steps per axis, fewer where the block would pass BLOCK_VOXELS
        counts = list(BLOCK_STEPS)
        while math.prod(c * s for c, s in zip(counts, step, strict=True)) > BLOCK_VOXELS:
            a = int(np.argmax([c * s if c > 1 else 0 for c, s in zip(counts, step,
                                                                    strict=True)]))
            if counts[a] == 1:
                break
            counts[a] -= 1
    else:
        counts = [max(1, math.ceil(int(b) / s)) for b, s in zip(block, step, strict=True)]
    sizes = [c * s for c, s in zip(counts, step, strict=True)]
    chunks = []
    for c, s, most, n in zip(counts, step, CHUNK_VOXELS, shape, strict=True):
        j = max([d for d in range(1, c + 1) if c % d == 0 and d * s <= max(most, s)])
        chunks.append(min(j * s, n))
    plan = BlockPlan.build(shape, sizes)
    return plan, tuple(chunks)


@dataclass
class BlockJob:
    """Everything one block needs, picklable for dask workers: paths, not objects (an
    in-process run may give the loaded ``model`` and ``image`` objects instead)."""

    model: Any
    image: Any
    plan: BlockPlan
    halo: tuple[int, int, int]
    irange: tuple[float, float]
    threshold: float | None
    arrays: dict[str, str]
    ledger: str
    wanted: tuple[str, ...] = ()
    prob_dtype: str = "uint8"
    device: str = "auto"
    weights: str | None = None
    tile: tuple[int, int, int] | None = None


_MODELS: dict[Any, Any] = {}
_IMAGES: dict[Any, Any] = {}


def _adapter(job: BlockJob) -> Any:
    if not isinstance(job.model, str | os.PathLike):
        return adapter_for(job.model, prob_dtype=job.prob_dtype)
    device = worker_device(job.device)
    key = (str(job.model), job.weights, device, job.prob_dtype, job.tile)
    if key not in _MODELS:  # a worker's first block
        share_malloc_arenas()
        threads = os.environ.get("LSMFM_WORKER_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        _MODELS.clear()
        _MODELS[key] = adapter_for(load_task(job.model, job.weights, device, job.tile),
                                   prob_dtype=job.prob_dtype)
    return _MODELS[key]


def load_task(model: str | os.PathLike, weights: str | None, device: str,
              tile: Sequence[int] | None = None) -> Any:
    """A saved task model (any task) on ``device``, with ``weights`` for its foundation."""
    from napari_lsmfm.tasks.registry import load_model

    foundation = None
    if weights is not None:
        from napari_lsmfm.model import load_foundation

        foundation = load_foundation(weights, device=device)
    return block_settings(load_model(model, foundation,
                                     device=None if device == "auto" else device), tile)


def block_settings(task: Any, tile: Sequence[int] | None = None) -> Any:
    """``task`` set up for block-wise prediction: ``tile`` (when given) and the engine's
    buffers capped at :data:`BLOCK_BYTES`."""
    if tile is not None:
        task.config.tile = tuple(int(t) for t in tile)
    task.config.block_bytes = min(int(task.config.block_bytes), BLOCK_BYTES)
    return task


def own_settings(task: Any) -> Any:
    """A model given by the caller with its own copy of the settings (same weights), so
    block-wise prediction leaves the caller's model as it was."""
    mine = copy.copy(task)
    mine.config = copy.copy(task.config)
    return mine


def _image(job: BlockJob) -> Any:
    if not isinstance(job.image, str | os.PathLike):
        return job.image
    key = str(job.image)
    if key not in _IMAGES:
        from napari_lsmfm.io import open_volume

        _IMAGES.clear()
        _IMAGES[key] = open_volume(job.image).data
    return _IMAGES[key]


def context(ext: Sequence[slice], tile: Sequence[int], shape: Sequence[int]
            ) -> tuple[slice, ...]:
    """``ext`` grown towards the volume's inside to at least a window per axis, so a thin
    last block of an axis is still seen through whole windows (as in one prediction of the
    whole volume), not through windows clipped to the block."""
    grown = []
    for s, t, n in zip(ext, tile, shape, strict=True):
        need = min(int(t), int(n)) - (s.stop - s.start)
        start, stop = s.start, s.stop
        if need > 0:
            stop = min(n, stop + need)
            start = max(0, stop - min(int(t), int(n)))
        grown.append(slice(start, stop))
    return tuple(grown)


def run_block(job: BlockJob, index: int) -> dict[str, Any]:
    """Predict (or skip) block ``index`` of ``job`` and record it finished; returns
    {"index", "skipped", "seconds"}. Runs on any worker."""
    import zarr

    t0 = time.perf_counter()
    adapter = _adapter(job)
    image = _image(job)
    box = job.plan.box(index)
    ext = context(job.plan.expanded(index, job.halo), adapter.tile, job.plan.shape)
    core = tuple(slice(b.start - e.start, b.stop - e.start) for b, e in zip(box, ext, strict=True))
    region = image[ext]
    compute = getattr(region, "compute", None)
    # read here, in this thread: on a dask worker a plain compute() would send the read
    # back to the cluster as another task (and a TIFF's open file cannot travel)
    block = np.asarray(compute(scheduler="synchronous") if compute is not None else region)
    # the test looks at the block itself: structure only in the halo belongs to the
    # neighbours (their own test sees it); an object reaching one voxel into the block
    # still lifts a 4-cube mean well above the threshold
    skipped = job.threshold is not None and Foreground.fixed(job.threshold).is_empty(
        block[core])
    targets = {k: zarr.open_array(p, mode="r+") for k, p in job.arrays.items()}
    specs = {k: (tuple(a.shape), a.dtype) for k, a in targets.items()}
    if skipped:
        values = adapter.empty(block, core, specs)
    else:
        values = adapter.predict(block, job.irange, core, job.wanted)
    for name, target in targets.items():
        if name not in values:
            continue
        lead = (slice(None),) * (target.ndim - 3)
        target[(*lead, *box)] = values[name].astype(target.dtype, copy=False)
    del block, region, values
    release_free_memory()  # the block's buffers, freed, back to the system before the next
    seconds = time.perf_counter() - t0
    Ledger(job.ledger, "predict").mark(index, skipped=bool(skipped), seconds=seconds)
    return {"index": index, "skipped": bool(skipped), "seconds": seconds}


def predict_volume(model: Any, image: Any, out: str | os.PathLike, *,
                   probabilities: str | os.PathLike | None = None,
                   instances: str | os.PathLike | None = None, prob_dtype: str = "uint8",
                   block: Sequence[int] | None = None, skip_empty: bool = True,
                   threshold: float | None = None, resume: bool = False,
                   overwrite: bool = False, workers: int | None = None,
                   scheduler: str | None = None, pyramid: bool = True,
                   device: str = "auto", weights: str | None = None,
                   tile: Sequence[int] | None = None, voxel_size: Sequence[float] | None = None,
                   instance_classes: Sequence[int] | None = None, ctx: Any = None,
                   on_block: Any = None) -> dict[str, Any]:
    """Predict a whole volume with a task model into OME-Zarr outputs, block by block.

    Args:
        model: a saved task model folder (segmentation or deblur), or a loaded one
            (this process only; its settings are left as they were).
        image: a TIFF / Zarr / OME-Zarr path, or a (Z, Y, X) numpy, dask or zarr array
            (this process only).
        out: the OME-Zarr of the main result (the class map, or the deblurred image).
        probabilities / instances: more OME-Zarr outputs of a segmentation model.
        block: block size (z, y, x), rounded up to whole window steps.
        skip_empty / threshold: skip blocks without structure (:mod:`.foreground`;
            ``threshold`` in the image's units instead of the automatic one).
        resume: continue the partial outputs an interrupted run left.
        overwrite: remove existing outputs first (else they are refused).
        workers / scheduler: run the blocks on a local dask.distributed cluster of
            ``workers`` processes, or on the scheduler at ``scheduler``.
        pyramid: write the multiscale levels of every output.
        on_block: called with each finished block's record (in this process).

    Returns:
        A summary: voxels, seconds, voxels_per_second, blocks, skipped, resumed,
        predicted, threshold, outputs, levels.
    """
    from . import outputs as store

    t0 = time.perf_counter()
    share_malloc_arenas()
    in_process = workers is None and scheduler is None
    if not in_process and not isinstance(model, str | os.PathLike):
        raise ValueError("a cluster run loads the model on every worker: give the saved "
                         "model's folder, not a loaded model")
    if not in_process and not isinstance(image, str | os.PathLike):
        raise ValueError("a cluster run opens the image on every worker: give its path")
    vol_data, vol_voxel, levels = store.open_input(image)
    voxel_size = tuple(voxel_size) if voxel_size is not None else vol_voxel
    if isinstance(model, str | os.PathLike):
        task = load_task(model, weights, device, tile)
    else:
        task = block_settings(own_settings(model), tile)
    adapter = adapter_for(task, prob_dtype=prob_dtype)
    wanted = tuple(k for k, v in (("probabilities", probabilities),
                                  ("instances", instances)) if v is not None)
    if adapter.task != "segment" and wanted:
        raise ValueError("--probabilities and --instances belong to segmentation models")
    step, halo = windows_of(adapter.tile, adapter.overlap, vol_data.shape, adapter.align)
    plan, chunks = choose_plan(vol_data.shape, step, block)
    sample = overview(vol_data, levels)
    irange = adapter.intensity_range(sample)
    test = None
    if skip_empty:
        test = Foreground.fixed(threshold) if threshold is not None else (
            Foreground.from_overview(sample))
    paths = {adapter.primary: Path(out), "probabilities": probabilities,
             "instances": instances}
    specs = adapter.outputs(vol_data.shape, wanted, vol_data.dtype)
    made = store.open_outputs({k: Path(paths[k]) for k in specs}, specs, adapter.kinds,
                              plan=plan, chunks=chunks, voxel_size=voxel_size,
                              resume=resume, overwrite=overwrite)
    ledger_store = str(paths[adapter.primary])
    ledger = Ledger(ledger_store, "predict")
    done_before = ledger.done()
    todo = [i for i in plan if i not in done_before]
    job = BlockJob(
        model=task if in_process else model,
        image=image if not in_process else vol_data,
        plan=plan, halo=halo, irange=tuple(float(v) for v in irange),
        threshold=None if test is None else test.threshold,
        arrays={k: str(Path(paths[k]) / "0") for k in specs if k != "instances"},
        ledger=ledger_store, wanted=tuple(w for w in wanted if w != "instances"),
        prob_dtype=prob_dtype, device=device, weights=weights,
        tile=tuple(adapter.tile) if tile is not None else None,
    )
    summary: dict[str, Any] = {"task": adapter.task, "shape": list(vol_data.shape),
                               "blocks": len(plan), "block": list(plan.block),
                               "halo": list(halo), "chunks": list(chunks),
                               "resumed": len(done_before),
                               "threshold": None if test is None else test.to_dict()}
    with store.executor(in_process, workers, scheduler, ctx) as run:
        _run_blocks(run, job, todo, ctx, on_block, len(plan), len(done_before))
        if instances is not None:
            store.make_instances(run, task, plan, paths, halo, voxel_size,
                                 instance_classes, ctx)
    records = ledger.records()
    summary["skipped"] = sum(1 for r in records.values() if r.get("skipped"))
    summary["predicted"] = len(records) - summary["skipped"]
    if pyramid:
        summary["levels"] = {k: store.pyramid(Path(paths[k]), adapter.kinds[k], voxel_size)
                             for k in made}
    store.finish(made)
    seconds = time.perf_counter() - t0
    voxels = math.prod(vol_data.shape)
    summary.update(voxels=voxels, seconds=seconds, voxels_per_second=voxels / seconds,
                   outputs=[str(p) for p in made.values()])
    return summary


def _run_blocks(run: Any, job: BlockJob, todo: list[int], ctx: Any, on_block: Any,
                total: int, done: int) -> None:
    from functools import partial

    fn = partial(run_block, job)
    if ctx is not None:
        ctx.report(done / max(total, 1), f"blocks: {done}/{total}", block=done, blocks=total)
    for _index, record in run(fn, todo):
        done += 1
        if on_block is not None:
            on_block(record)
        if ctx is not None:
            ctx.report(done / max(total, 1), f"blocks: {done}/{total}", block=done,
                       blocks=total)
