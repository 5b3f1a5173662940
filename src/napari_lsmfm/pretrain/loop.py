"""The pretraining run: student Foundation + EMA teacher, masked objectives, CLIP, DDP.

:func:`pretrain` opens the data, builds the student (:mod:`.student`), the optimizer and
the mixed-precision setup, resumes from a checkpoint when asked, then takes the steps
(:mod:`.step`). It runs on one device, or on several under ``torchrun`` (PyTorch DDP:
NCCL on CUDA, gloo on CPU, see :mod:`.world`), in bf16 autocast on CUDA. Rank 0 reports
progress through a :class:`~napari_lsmfm.engine.jobs.JobContext`, writes resumable
checkpoints every N steps (:mod:`.checkpointing`) and, at the end, the Foundation in our
format.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from napari_lsmfm.engine.jobs import Cancelled, JobContext
from napari_lsmfm.model import Foundation, FoundationSpec, save_foundation
from napari_lsmfm.model.backbones import count_parameters

from .checkpointing import (
    checkpoint_path,
    checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    weights_digest,
    write_checkpoint,
)
from .config import TEXT_OBJECTIVES, PretrainConfig
from .data import BatchStream, PatchSource, open_source
from .objectives import LOGIT_SCALE_MAX
from .step import StepParts, amp_mode_dtype, loss_scaler, train_step
from .student import (
    PretrainModel,
    build_student,
    student_from_init,
    student_from_spec,
    teacher_of,
    text_encoder_params,
)
from .world import World, hardware, setup_world, sync_buffers


def pretrain(
    config: PretrainConfig,
    data: PatchSource | str | os.PathLike,
    out: str | os.PathLike,
    ctx: JobContext | None = None,
    resume: bool | str | os.PathLike | None = None,
    *,
    captions: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Pretrain a Foundation and write it to ``out`` (model.safetensors + config.json).

    Args:
        config: the run's :class:`PretrainConfig`.
        data: a patch source (:class:`~napari_lsmfm.pretrain.data.PatchDataset`,
            :class:`~napari_lsmfm.pretrain.data.SyntheticCorpus`), a folder or file of
            volumes, or ``"synthetic://"``.
        out: output folder; checkpoints go to ``out/checkpoints/step_NNNNNN.pt``.
        ctx: progress and cancel (``ctx.report`` each step with the loss terms); on cancel
            a checkpoint of the last finished step is written, then ``Cancelled`` is raised.
        resume: True resumes from the latest checkpoint in ``out`` (or starts afresh when
            there is none, saying so in the notes); a path resumes from that checkpoint;
            None/False starts afresh. Resuming with other ``steps`` than the checkpoint's
            run stretches the learning-rate schedule (a note says so); fewer steps than
            the checkpoint has done is refused.
        captions: a captions JSON, used when ``data`` is a path.
        overwrite: start afresh even when ``out`` already holds a model or checkpoints.

    Returns a dict: ``step`` (steps done), ``loss`` and each active term averaged over the
    last ``min(50, max(1, steps // 10))`` steps, ``logit_scale``, ``wall_time_s``, ``out``,
    ``weights_sha256`` (this rank's final weights, see :func:`weights_digest`) and
    ``notes`` (what was switched off, resumed or changed on the way).
    Raises ValueError for bad settings or data, FileExistsError when ``out`` is in use.
    """
    ctx = ctx if ctx is not None else JobContext()
    out = Path(out).expanduser()
    world = setup_world(config.device)
    try:
        return _pretrain(config, data, out, ctx, resume, captions, overwrite, world)
    finally:
        if world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _pretrain(config, data, out, ctx, resume, captions, overwrite, world: World) -> dict:
    started = time.perf_counter()
    device = world.device
    main = world.rank == 0

    ckpt_path, state = _resume_from(out, resume, overwrite)
    source = data
    if isinstance(data, (str, os.PathLike)):
        source = open_source(data, config.patch_size, captions, seed=config.seed)
    if tuple(source.patch_size) != tuple(config.patch_size):
        raise ValueError(
            f"the data source draws {source.patch_size} patches but the config asks for "
            f"{config.patch_size}"
        )
    objectives, notes = _active_objectives(config, source)
    run_config = PretrainConfig.from_dict({**config.to_dict(), "objectives": objectives})
    notes += _resume_notes(resume, ckpt_path, state, run_config)

    # The same seed gives the same initial weights on every rank (DDP also broadcasts them).
    torch.manual_seed(run_config.seed)
    if state is not None:
        student = student_from_spec(FoundationSpec.from_dict(state["spec"]), run_config)
    elif run_config.init:
        student = student_from_init(run_config, objectives)
        notes.append(f"started from the weights in {run_config.init}")
        run_config.spec = {k: v for k, v in student.spec.to_dict().items()
                           if k not in ("variant", "text", "proj_dim")}
    else:
        student = build_student(run_config, source.captions.texts())
    use_text = student.text_tower is not None and any(o in objectives for o in TEXT_OBJECTIVES)
    model = PretrainModel(
        student,
        run_config.recon_kernel if "recon" in objectives else None,
        clip="clip" in objectives,
        structure="structure" in objectives,
    ).to(device)
    teacher = teacher_of(student).to(device) if "distill" in objectives else None
    start_step = 0
    elapsed_before = 0.0
    if state is not None:
        missing, _ = model.load_state_dict(state["model"], strict=False)
        if any(k.startswith("student.") for k in missing):
            raise ValueError(f"{ckpt_path} does not hold this model's weights; start afresh")
        if teacher is not None and state.get("teacher") is not None:
            teacher.backbone.load_state_dict(state["teacher"])
        start_step = int(state["step"])
        elapsed_before = float(state.get("wall_time_s", 0.0))
        notes.append(f"resumed from {ckpt_path.name} at step {start_step}")
    model.train()
    optimizer = _optimizer(model, student, run_config, use_text)
    dtype = amp_mode_dtype(run_config.amp, device)
    scaler = loss_scaler(dtype, device)
    if state is not None:
        _restore_optimizer(state, ckpt_path, optimizer, scaler)

    net: nn.Module = model
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    parts = StepParts(
        net, model, teacher, optimizer, scaler, dtype, world, run_config, objectives, use_text,
        [source.captions.labels[name] for name in source.captions.label_names],
    )
    window = min(50, max(1, run_config.steps // 10))
    history: list[dict[str, float]] = list(state.get("history", [])) if state else []
    spec_dict = student.spec.to_dict()

    def checkpoint(at: int) -> None:
        sync_buffers(model, teacher, world)
        if main:
            wall = elapsed_before + time.perf_counter() - started
            saved = checkpoint_state(at, spec_dict, run_config, model, teacher, optimizer,
                                     scaler, history[-window:], wall)
            write_checkpoint(checkpoint_path(out, at), saved, run_config.keep_checkpoints)
        if world.distributed:
            dist.barrier()

    if main and notes:
        ctx.report(start_step / run_config.steps, "; ".join(notes), step=start_step)
    step = _take_steps(parts, source, start_step, history, window, checkpoint, ctx)

    wall = elapsed_before + time.perf_counter() - started
    final = {
        k: float(np.mean([h[k] for h in history if k in h]))
        for k in ["loss", *objectives]
        if any(k in h for h in history)
    }
    if model.logit_scale is not None:
        student.logit_scale = float(model.logit_scale.detach().clamp(max=LOGIT_SCALE_MAX))
    if main:
        record = _training_record(run_config, objectives, step, final, wall, world, source,
                                  student, notes)
        save_foundation(student.eval(), out, extra_config={"training": record})
    if world.distributed:
        dist.barrier()
    return {
        "step": step,
        **final,
        "logit_scale": student.logit_scale,
        "wall_time_s": wall,
        "out": str(out),
        "weights_sha256": weights_digest(student),
        "notes": notes,
    }


def _resume_notes(resume: Any, ckpt_path: Path | None, state: dict | None,
                  config: PretrainConfig) -> list[str]:
    """What a resume changes, said aloud: no checkpoint to resume (a fresh start), or
    another number of steps than the checkpoint's run (the schedule changes). Refuses
    (ValueError) a checkpoint already past ``config.steps``."""
    if resume not in (None, False) and ckpt_path is None:
        return ["--resume found no checkpoint in the output folder: starting afresh"]
    if state is None:
        return []
    step = int(state.get("step", 0))
    before = (state.get("config") or {}).get("steps")
    if step > config.steps:
        raise ValueError(
            f"{ckpt_path} is at step {step}, past the {config.steps} steps asked for; resume "
            f"with --steps {before or step} (or more), or start afresh with --overwrite"
        )
    if before is not None and int(before) != config.steps:
        return [f"the checkpoint's run had {before} steps, this one has {config.steps}: the "
                "learning-rate schedule (cosine decay) now spans the new length, so the "
                f"learning rate changes at step {step}"]
    return []


def _resume_from(out: Path, resume: Any, overwrite: bool) -> tuple[Path | None, dict | None]:
    """(checkpoint path, its state) to resume from, or (None, None) to start afresh; refuses
    to start afresh over an earlier run's model or checkpoints unless ``overwrite``."""
    ckpt_path: Path | None = None
    if resume not in (None, False):
        ckpt_path = latest_checkpoint(out) if resume is True else Path(resume).expanduser()
    elif not overwrite and (
        (out / "model.safetensors").exists() or latest_checkpoint(out) is not None
    ):
        raise FileExistsError(
            17,
            "the output folder already holds a model or checkpoints; resume the run "
            "(--resume) or choose another folder (or --overwrite)",
            str(out),
        )
    return ckpt_path, load_checkpoint(ckpt_path) if ckpt_path is not None else None


def _active_objectives(config: PretrainConfig, source: Any) -> tuple[list[str], list[str]]:
    """The config's objectives the data allow (text ones need captions, "structure" needs
    masks), and notes saying what was switched off; ValueError when none is left."""
    has_captions = bool(getattr(source, "has_captions", bool(source.captions.labels)))
    objectives = list(config.objectives)
    notes: list[str] = []
    if not has_captions and any(o in objectives for o in TEXT_OBJECTIVES):
        dropped = [o for o in objectives if o in TEXT_OBJECTIVES]
        objectives = [o for o in objectives if o not in TEXT_OBJECTIVES]
        notes.append(f"no captions matched the data: {', '.join(dropped)} switched off")
        if not objectives:
            raise ValueError(
                "only image-text objectives were asked for but the data have no captions; "
                "give a captions JSON (--captions) or add recon / distill"
            )
    if "structure" in objectives and not getattr(source, "has_masks", False):
        objectives = [o for o in objectives if o != "structure"]
        notes.append("the data have no structure masks: structure switched off")
        if not objectives:
            raise ValueError(
                "only the structure objective was asked for but the data have no structure "
                "masks (only the synthetic corpus has them); add recon / distill"
            )
    return objectives, notes


def _optimizer(model: PretrainModel, student: Foundation, config: PretrainConfig,
               use_text: bool) -> torch.optim.AdamW:
    """AdamW over what trains: decay on weights, none on biases and norms; a BERT text
    encoder gets its own group (frozen in the warm-up, then at ``text_lr_scale``)."""
    if not use_text:  # kept as loaded, not trained (DDP wants every trained weight used)
        for part in (student.text_tower, student.image_proj):
            if part is not None:
                part.requires_grad_(False)
    text_encoder = text_encoder_params(student, config) if use_text else []
    encoder_ids = {id(p) for p in text_encoder}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if text_encoder:  # the published recipe: frozen in the warm-up, then the top layers train
        groups.append({
            "params": text_encoder, "weight_decay": 0.01,
            "lr_scale": config.text_lr_scale, "frozen_in_warmup": True,
        })
    return torch.optim.AdamW(groups, lr=config.lr)


def _restore_optimizer(state: dict, ckpt_path: Path, optimizer: torch.optim.Optimizer,
                       scaler: Any) -> None:
    """Load a checkpoint's optimizer, loss scaler and RNG state."""
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"{ckpt_path} was written with other objectives ({exc}); resume with the "
            "objectives of that run, or start afresh"
        ) from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("torch_rng") is not None:
        torch.set_rng_state(state["torch_rng"])


def _identity(item):
    return item


def _batches(source: Any, config: PretrainConfig, world: World, start_step: int
             ) -> Iterable[dict]:
    """The batches of steps ``start_step`` to the end, loaded in worker processes when
    ``config.num_workers`` > 0."""
    stream = BatchStream(source, config.batch_size, seed=config.seed, rank=world.rank,
                         steps=config.steps)
    if config.num_workers > 0:
        return torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            sampler=range(start_step, config.steps),
            num_workers=config.num_workers,
            collate_fn=_identity,
            pin_memory=world.device.type == "cuda",
        )
    return (stream[s] for s in range(start_step, config.steps))


def _take_steps(parts: StepParts, source: Any, start_step: int, history: list[dict],
                window: int, checkpoint: Any, ctx: JobContext) -> int:
    """Steps ``start_step`` to the end, with progress, checkpoints, Stop and Ctrl-C (both
    write a checkpoint of the last finished step first); returns the steps done.
    ``history`` keeps the last ``window`` steps' loss records."""
    config, world = parts.config, parts.world
    main = world.rank == 0
    batches = _batches(source, config, world, start_step)
    step = start_step
    try:
        for batch in batches:
            terms = train_step(parts, batch, step)
            step += 1
            history.append(terms)
            del history[:-window]
            if main:
                with contextlib.suppress(Cancelled):  # handled below, on every rank
                    ctx.report(
                        step / config.steps,
                        f"step {step}/{config.steps}",
                        step=step,
                        **{k: float(v) for k, v in terms.items()},
                    )
            stop = ctx.cancelled
            if world.distributed:
                flag = torch.tensor([float(stop)], device=world.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                checkpoint(step)
                raise Cancelled(f"pretraining stopped at step {step}; resume with --resume")
            if config.checkpoint_every > 0 and step % config.checkpoint_every == 0:
                checkpoint(step)
    except KeyboardInterrupt:
        if not world.distributed and step > start_step:  # Ctrl-C: keep what was done
            checkpoint(step)
        raise
    else:
        if config.checkpoint_every <= 0 or step % config.checkpoint_every != 0:
            checkpoint(step)
    finally:
        if hasattr(batches, "close"):
            batches.close()
    return step


def _training_record(config: PretrainConfig, objectives: Sequence[str], step: int,
                     final: dict, wall: float, world: World, source: Any,
                     student: Foundation, notes: list[str]) -> dict:
    """What the saved model's config.json records about the run that made it."""
    return {
        "config": config.to_dict(),
        "objectives": objectives,
        "steps": step,
        "final_losses": final,
        "wall_time_s": round(wall, 1),
        "hardware": hardware(world),
        "data": source.describe(),
        "captions": {k: list(v) for k, v in source.captions.labels.items()},
        "parameters": {
            "backbone": count_parameters(student.backbone),
            "total": count_parameters(student),
        },
        "notes": notes,
    }
