"""One pretraining step: mask, run student and teacher, weigh the objectives, update.

One step draws cube masks for the rank's batch, runs the student on the masked patches
and the teacher on the full ones, and minimises a weighted sum of

- ``recon``: masked L1 reconstruction through a light conv decoder,
- ``distill``: KL between teacher and student feature distributions on masked voxels,
- ``align``: cosine distance between each image embedding and its caption's,
- ``clip``: symmetric InfoNCE between image and caption embeddings (learnable temperature),
- ``structure`` (ours, opt-in): BCE + soft Dice of a linear read-out of the dense features
  against the structure mask, where the data know it (the synthetic corpus),

then moves the teacher towards the student (EMA). Every random draw of step ``s`` on
rank ``r`` comes from a generator seeded with ``(seed, r, s)``, so a resumed run takes
exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from napari_lsmfm.engine.device import amp_dtype

from .config import PretrainConfig
from .masking import apply_mask, cube_mask, mask_ratio_at
from .objectives import (
    LOGIT_SCALE_MAX,
    alignment_loss,
    clip_loss,
    distillation_loss,
    ema_update,
    structure_loss,
)
from .student import PretrainModel
from .world import World, gather_labelled

MAX_LABEL_NEGATIVES = 256  # CLIP's extra captions per step: one per other label, at most


def lr_at(step: int, config: PretrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of every random draw of step ``step`` on rank ``rank``."""
    return int(np.random.SeedSequence([seed, rank, step, 1]).generate_state(1)[0])



def amp_mode_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a config's ``amp`` setting ("auto", "bf16", "fp16", "off") on
    ``device``: "auto" is :func:`~napari_lsmfm.engine.device.amp_dtype` on CUDA and full
    precision (None) elsewhere."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    return amp_dtype(device)


def loss_scaler(dtype: torch.dtype | None, device: torch.device) -> Any:
    """A GradScaler for fp16 autocast, on any device (fp16 needs loss scaling; bf16 and
    full precision do not: None)."""
    if dtype != torch.float16:
        return None
    make = getattr(torch.amp, "GradScaler", None)
    return make(device.type) if make is not None else torch.cuda.amp.GradScaler()


@dataclass
class StepParts:
    """What every optimizer step of a run uses, made once by the loop. ``net`` is
    ``model`` or its DDP wrapper; ``dtype`` the autocast dtype (None: full precision);
    ``scaler`` the fp16 loss scaler or None; ``label_texts`` every label's descriptions."""

    net: nn.Module
    model: PretrainModel
    teacher: Any
    optimizer: torch.optim.Optimizer
    scaler: Any
    dtype: torch.dtype | None
    world: World
    config: PretrainConfig
    objectives: Sequence[str]
    use_text: bool
    label_texts: Sequence[Sequence[str]]


def step_texts(
    texts_per_item: Sequence[str | None],
    ids_per_item: Sequence[int],
    captioned: Sequence[int],
    label_texts: Sequence[Sequence[str]],
    all_labels: bool,
    generator: torch.Generator,
) -> tuple[list[str], list[int]]:
    """The captions to embed this step and their label ids: the batch's own (deduplicated),
    then with ``all_labels`` one description of every other label (at most
    ``MAX_LABEL_NEGATIVES``), so CLIP has negatives even when the batch has one label."""
    texts: list[str] = []
    ids: list[int] = []
    for i in captioned:
        if texts_per_item[i] not in texts:
            texts.append(texts_per_item[i])
            ids.append(int(ids_per_item[i]))
    if all_labels and texts:
        present = set(ids)
        others = [label for label in range(len(label_texts)) if label not in present]
        if len(others) > MAX_LABEL_NEGATIVES:
            pick = torch.randperm(len(others), generator=generator)[:MAX_LABEL_NEGATIVES]
            others = [others[int(k)] for k in sorted(pick.tolist())]
        for label in others:
            options = label_texts[label]
            texts.append(options[int(torch.randint(len(options), (1,), generator=generator))])
            ids.append(label)
    return texts, ids


def train_step(parts: StepParts, batch: dict, step: int) -> dict[str, float]:
    """Optimizer step ``step`` (0-based) on ``batch`` (a :class:`~.data.BatchStream` item);
    returns the loss and each term (averaged over ranks), the learning rate and the mask
    ratio, as floats."""
    net, model, teacher, world = parts.net, parts.model, parts.teacher, parts.world
    config, objectives, use_text = parts.config, parts.objectives, parts.use_text
    optimizer, scaler, dtype = parts.optimizer, parts.scaler, parts.dtype
    weights, label_texts = config.loss_weights, parts.label_texts
    device = world.device
    generator = torch.Generator().manual_seed(step_seed(config.seed, world.rank, step))
    ratio = mask_ratio_at(step, config.warmup_steps, config.warmup_mask_ratio, config.mask_ratio)
    images, masks = [], []
    for image in batch["images"]:
        image = image.to(device, non_blocking=True).float()
        mask = cube_mask(
            image[None], ratio, config.cube_sizes, mode=config.masking,
            channel_separated=config.channel_separated, generator=generator,
        )[0]
        images.append(image)
        masks.append(mask)
    # Channels become items: the backbone takes one channel, each with its own mask.
    x = torch.cat(images).unsqueeze(1)
    mask = torch.cat(masks).unsqueeze(1)
    ids = batch["label_ids"].to(device)
    texts_per_item = batch["texts"]
    captioned = [i for i, t in enumerate(texts_per_item) if t is not None]

    texts: list[str] | None = None
    text_ids: list[int] = []
    if use_text:
        texts, text_ids = step_texts(
            texts_per_item, batch["label_ids"].tolist(), captioned, label_texts,
            "clip" in objectives and config.clip_all_labels, generator,
        )
        # A step without captions still runs the text tower, so DDP sees every parameter used.
        if not texts:
            texts, text_ids = [next(iter(model.student.text_tower.vocabulary[2:]), "none")], [-1]
    for group in optimizer.param_groups:
        frozen = group.get("frozen_in_warmup", False) and step < config.warmup_steps
        group["lr"] = 0.0 if frozen else lr_at(step, config) * group.get("lr_scale", 1.0)

    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    terms: dict[str, torch.Tensor] = {}
    with autocast:
        voxels = mask[:, 0]
        dense, recon, image_emb, text_emb, structure = net(
            apply_mask(x, mask), texts, voxels if "recon" in objectives else None
        )
        if "recon" in objectives:
            # Masked L1: the head only ran on the masked voxels.
            target = x[:, 0][voxels]
            terms["recon"] = (
                (recon[:, 0].float() - target).abs().mean() if target.numel() else recon.sum() * 0
            )
        if "distill" in objectives:
            with torch.no_grad():
                target = teacher(x)
            terms["distill"] = distillation_loss(
                dense, target, mask, config.student_temp, config.teacher_temp
            )
        if "structure" in objectives:
            # Items (channels) of patches with a mask; the others do not count.
            targets, rows = [], []
            item = 0
            masks = batch.get("masks") or [None] * len(batch["images"])
            for image, m in zip(batch["images"], masks, strict=True):
                for _ in range(image.shape[0]):
                    if m is not None:
                        targets.append(m)
                        rows.append(item)
                    item += 1
            if rows:
                pick = torch.tensor(rows, dtype=torch.long, device=device)
                target = torch.stack(targets).unsqueeze(1).to(device).float()
                terms["structure"] = structure_loss(structure.index_select(0, pick), target)
            else:
                terms["structure"] = structure.sum() * 0.0
    zero = dense.new_zeros(())
    if use_text:
        first = {}
        for j, t in enumerate(texts):
            first.setdefault(t, j)
        rows = torch.tensor([first[texts_per_item[i]] for i in captioned], dtype=torch.long,
                            device=device)
        cap = torch.tensor(captioned, dtype=torch.long, device=device)
        img = image_emb.float().index_select(0, cap)
        # Keep every parameter in the graph even when this rank has no captioned item.
        zero = zero + 0.0 * (image_emb.sum() + text_emb.sum())
        if "align" in objectives:
            own = text_emb.float().index_select(0, rows)
            terms["align"] = alignment_loss(img, own) if captioned else zero.clone()
        if "clip" in objectives:
            zero = zero + 0.0 * model.logit_scale
            all_img, img_ids = gather_labelled(img, ids.index_select(0, cap), world)
            txt_ids = torch.tensor(text_ids, dtype=torch.long, device=device)
            all_txt, all_txt_ids = gather_labelled(text_emb.float(), txt_ids, world)
            keep = all_txt_ids >= 0  # the placeholder text of a step without captions
            terms["clip"] = clip_loss(
                all_img, all_txt[keep], model.logit_scale, img_ids, all_txt_ids[keep]
            )
    loss = zero + sum(weights[k] * v for k, v in terms.items())

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], config.grad_clip
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if model.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
    if teacher is not None:
        ema_update(teacher.backbone, model.student.backbone, config.ema_decay)

    values = torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
    if world.distributed:
        dist.all_reduce(values)
        values /= world.size
    out = dict(zip(["loss", *terms], values.tolist(), strict=True))
    out["lr"] = lr_at(step, config)
    out["mask_ratio"] = ratio
    return out
