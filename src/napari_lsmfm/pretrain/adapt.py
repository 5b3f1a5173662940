"""Adapt a Foundation to one volume: a few hundred self-supervised steps on its own patches.

Every user has a large unlabelled volume. :func:`adapt_foundation` trains a *copy* of a
foundation on random patches of it with the pretraining objectives that need neither
captions nor masks (masked reconstruction and EMA-teacher self-distillation, the step of
:mod:`.step`), in the one training loop (:class:`~napari_lsmfm.engine.train.TrainLoop`:
progress, Stop, NaN guard). The adapted copy has other weights, so its weights
fingerprint differs and feature caches keyed by it never mix the two.

    >>> adapted, report = adapt_foundation(load_foundation(None), volume, steps=300)
    >>> Segmenter(adapted).fit(volume, brushes)

Cost with the defaults (32^3 patches, 2 per step, the embedded UNet), measured on one CPU
thread: about 0.18 s a step, so 300 steps take 48-62 s; 97 s where quick mode shrinks the
volume 5.6x (zoom 0.18: each patch is read from a 181^3 region and resampled).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_lsmfm.engine.store import foundation_fingerprint
from napari_lsmfm.engine.train import FitReport, TrainLoop
from napari_lsmfm.model import Foundation

from .captions import CaptionTable
from .config import PretrainConfig, as_patch_size
from .data import BatchStream, Patch
from .step import StepParts, amp_mode_dtype, loss_scaler, train_step
from .student import PretrainModel, teacher_of
from .world import World

__all__ = ["ADAPT_OBJECTIVES", "VolumePatches", "adapt_foundation"]

# The pretraining objectives that need no captions (align, clip) and no masks (structure).
ADAPT_OBJECTIVES = ("recon", "distill")
# A patch counts as foreground when this fraction of its voxels is above half the
# normalised range (the 1st-99th percentile scaled to [0, 1]).
SIGNAL_LEVEL, SIGNAL_FRACTION = 0.5, 0.01
# The fresh reconstruction head learns this much faster than the pretrained backbone.
HEAD_LR_SCALE = 10.0


class VolumePatches:
    """Random patches of one 3D volume, as a pretraining patch source.

    Args:
        image: (Z, Y, X) numpy, dask or zarr array; only each patch's region is read.
        patch_size: (D, H, W) or an int: the patch the network sees, in voxels.
        intensity_range: (low, high) raw intensities mapped to [0, 1] (the foundation's
            ``intensity_range(image)``, so patches are normalised as segmentation does).
        zoom: the factor quick mode resamples windows by before the foundation sees them
            (:func:`napari_lsmfm.tasks.segment.scale.zoom_for`): a region of
            ``patch_size / zoom`` voxels is read and resampled to ``patch_size``.
        tries: draws per patch to find foreground; the first with
            ``SIGNAL_FRACTION`` of its voxels above ``SIGNAL_LEVEL`` is kept, else the
            brightest of them (empty background teaches little).

    Volumes smaller than a region are zero-padded (zero is the normalised background).
    Patches are flipped at random in Y and X (not Z: the axial PSF is not symmetric).
    """

    has_captions = False
    has_masks = False

    def __init__(self, image: Any, patch_size: int | Sequence[int],
                 intensity_range: tuple[float, float], *, zoom: float = 1.0,
                 tries: int = 4) -> None:
        if len(getattr(image, "shape", ())) != 3:
            raise ValueError(f"adaptation takes one 3D (Z, Y, X) volume, got shape "
                             f"{tuple(getattr(image, 'shape', ()))}; pick one channel")
        if not zoom > 0:
            raise ValueError(f"zoom must be positive, got {zoom}")
        self.image = image
        self.patch_size = as_patch_size(patch_size)
        self.region = tuple(max(1, round(p / zoom)) for p in self.patch_size)
        self.intensity_range = (float(intensity_range[0]), float(intensity_range[1]))
        self.zoom = float(zoom)
        self.tries = max(1, int(tries))
        self.captions = CaptionTable()

    def read(self, rng: np.random.Generator) -> np.ndarray:
        """One region at a random corner, normalised: (d, h, w) float32 in [0, 1]."""
        shape = self.image.shape
        corner = [int(rng.integers(0, s - r + 1)) if s > r else 0
                  for s, r in zip(shape, self.region, strict=True)]
        box = tuple(slice(c, c + r) for c, r in zip(corner, self.region, strict=True))
        raw = np.asarray(self.image[box], dtype=np.float32)
        lo, hi = self.intensity_range
        out = (raw - lo) * np.float32(1.0 / (hi - lo)) if hi > lo else np.zeros_like(raw)
        np.clip(out, 0.0, 1.0, out=out)
        pads = [(0, r - s) for s, r in zip(out.shape, self.region, strict=True)]
        return np.pad(out, pads) if any(p for _, p in pads) else out

    def sample(self, rng: np.random.Generator) -> Patch:
        best, best_signal = None, -1.0
        for _ in range(self.tries):
            region = self.read(rng)
            signal = float((region > SIGNAL_LEVEL).mean())
            if signal > best_signal:
                best, best_signal = region, signal
            if signal >= SIGNAL_FRACTION:
                break
        patch = best
        if patch.shape != self.patch_size:
            x = torch.from_numpy(np.ascontiguousarray(patch))[None, None]
            mode = {"mode": "area"} if self.zoom < 1 else {"mode": "trilinear",
                                                           "align_corners": False}
            patch = F.interpolate(x, size=self.patch_size, **mode)[0, 0].numpy()
        for axis in (1, 2):
            if rng.random() < 0.5:
                patch = np.flip(patch, axis)
        return Patch(np.ascontiguousarray(patch, dtype=np.float32)[None], [None], "volume")

    def describe(self) -> dict:
        return {"kind": "volume", "shape": [int(s) for s in self.image.shape],
                "region": list(self.region), "zoom": self.zoom}


def adapt_foundation(
    foundation: Foundation,
    image: Any,
    *,
    steps: int = 300,
    patch: int | Sequence[int] = 32,
    batch: int = 2,
    lr: float = 2e-5,
    seed: int = 0,
    zoom: float = 1.0,
    mask_ratio: float = 0.3,
    ema_decay: float = 0.994,
    intensity_range: tuple[float, float] | None = None,
    ctx: Any = None,
) -> tuple[Foundation, FitReport]:
    """A copy of ``foundation`` adapted to ``image`` by self-supervised pretraining steps.

    Args:
        foundation: the starting weights; never changed (a deep copy is trained).
        image: (Z, Y, X) numpy, dask or zarr volume; read patch by patch.
        steps: optimizer steps (at least 1). patch: voxels per side (or (D, H, W)) of the
            patches the network sees. batch: patches per step.
        lr: AdamW learning rate of the backbone (linear warm-up over the first tenth of
            the steps, at most 30, in which the backbone stays frozen and only the fresh
            reconstruction head learns, at 10x; then a cosine decay). 2e-5 was chosen on
            the few-shot benchmark's validation split: 1e-4 and 5e-4 pulled the features
            away from what the structure objective taught them (plaques lost 0.18 Dice).
        seed: patches and masks; the same seed gives the same weights.
        zoom: quick mode's resampling of this volume (see :class:`VolumePatches`), so the
            foundation adapts at the scale it will be used at.
        mask_ratio: fraction of 8 or 16 voxel cubes masked. ema_decay: the teacher's.
        intensity_range: the (low, high) normalisation; default the foundation's
            ``intensity_range(image)`` (a strided subsample of a lazy volume).
        ctx: a job context: ``report(fraction, message, step=, loss=, ...)`` every step,
            where Stop is noticed.

    Returns ``(adapted, report)``: the adapted Foundation (eval mode, on the foundation's
    device; its ``source`` says it was adapted) and a
    :class:`~napari_lsmfm.engine.train.FitReport`: ``history`` (loss per step),
    ``steps_done``, ``stopped``, ``seconds``, ``best_loss`` (= ``loss``, the mean loss of
    the last steps) and ``steps``, ``loss``, ``first_loss`` (the mean of the first
    steps), ``recon``, ``distill``, ``objectives``, ``patch``, ``batch``, ``lr``,
    ``zoom``, ``fingerprint`` (the adapted weights') and ``started_from`` (the
    original's). Stop after at least one step keeps the weights trained so far
    (``stopped`` True); Stop before the first step raises
    :class:`~napari_lsmfm.engine.jobs.Cancelled` (the caller still has its foundation).
    """
    started = time.perf_counter()
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"adaptation needs at least 1 step, got {steps}")
    device = foundation.device
    if intensity_range is None:
        intensity_range = foundation.intensity_range(image)
    source = VolumePatches(image, patch, intensity_range, zoom=zoom)
    warmup = min(30, max(1, steps // 10))
    spec = {k: v for k, v in foundation.spec.to_dict().items()
            if k not in ("variant", "text", "proj_dim")}
    config = PretrainConfig(
        steps=steps, patch_size=source.patch_size, batch_size=batch, lr=lr,
        warmup_steps=warmup, objectives=ADAPT_OBJECTIVES, mask_ratio=mask_ratio,
        ema_decay=ema_decay, checkpoint_every=0, seed=seed, device=str(device), spec=spec,
    )
    adapted = copy.deepcopy(foundation)
    adapted.requires_grad_(True)
    model = PretrainModel(adapted, config.recon_kernel, clip=False).to(device).train()
    teacher = teacher_of(adapted).to(device)
    groups = [
        {"params": list(adapted.backbone.parameters()), "frozen_in_warmup": True},
        {"params": list(model.recon_head.parameters()), "lr_scale": HEAD_LR_SCALE},
    ]
    # no weight decay: the pretrained weights are the prior, not zero
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    dtype = amp_mode_dtype(config.amp, device)
    parts = StepParts(model, model, teacher, optimizer, loss_scaler(dtype, device), dtype,
                      World(0, 1, device), config, ADAPT_OBJECTIVES, False, [])
    stream = BatchStream(source, config.batch_size, seed=seed, steps=steps)
    terms: list[dict[str, float]] = []

    def step_fn() -> float:
        step = len(terms)
        terms.append(train_step(parts, stream[step], step))
        return terms[-1]["loss"]

    window = min(20, max(1, steps // 5))

    def recent_loss() -> float:  # the weights kept are the last ones: their recent loss
        return float(np.mean([t["loss"] for t in terms[-window:]])) if terms else math.inf

    loop = TrainLoop(model, step_fn, recent_loss, steps, eval_every=steps, ctx=ctx,
                     message="adapting the foundation to this volume")
    if ctx is not None:
        ctx.check()  # stopped before the first step: nothing to keep
    fit = loop.run()
    adapted.requires_grad_(any(p.requires_grad for p in foundation.parameters()))
    adapted.eval()
    adapted.source = f"{foundation.source} (adapted to a volume: {fit.steps_done} steps)"
    first = [t["loss"] for t in terms[:window]]
    fit.update(
        best_loss=recent_loss(), steps=steps, loss=recent_loss(),
        first_loss=float(np.mean(first)),
        **{k: float(np.mean([t[k] for t in terms[-window:]])) for k in ADAPT_OBJECTIVES},
        objectives=list(ADAPT_OBJECTIVES), patch=list(source.patch_size), batch=int(batch),
        lr=float(lr), zoom=float(zoom), fingerprint=foundation_fingerprint(adapted),
        started_from=foundation_fingerprint(foundation),
        seconds=time.perf_counter() - started,
    )
    return adapted, fit
