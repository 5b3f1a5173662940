"""Full mode: finetune a copy of the backbone, starting where quick mode ends.

A quick fit gives the per-voxel head; the network (:class:`FullNet`) is a copy of the
backbone whose dense features, with the same classical filters, feed that head, so at
step 0 it predicts exactly what quick mode predicts. It is finetuned on patches centred
on brushed voxels (:class:`PatchSampler`), with flips and in-plane (YX) 90 degree
rotations (no rotation mixes the anisotropic z axis); intensity jitter is opt-in
(``augment="all"``): within one volume brightness is a cue (faint puncta against a
plaque's dim halo), and jitter taught the network to ignore it (benchmarks/README.md).
Loss: cross-entropy with ``ignore_index`` (plus MONAI's ``MaskedDiceLoss`` when
``dice_weight`` > 0), counting annotated voxels only. The encoder is frozen for the
first ``freeze_steps``, then trained at ``encoder_lr_scale`` x the learning rate (the
published recipe); batch-norm statistics stay frozen. The best weights by the loss on a
fixed, unaugmented set of patches around the strokes are kept, the quick starting point
included.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_lsmfm.engine.device import memory_guard, resolve_device, with_smaller_tiles
from napari_lsmfm.engine.jobs import span
from napari_lsmfm.engine.tiled import predict_tiled
from napari_lsmfm.engine.train import FitReport, TrainLoop, grad_scaler
from napari_lsmfm.model.foundation import normalize_window
from napari_lsmfm.tasks.filters import filter_bank
from napari_lsmfm.tasks.heads import VoxelHead

from .labels import SparseLabels
from .quick import class_weights

__all__ = ["FullNet", "PatchSampler", "finetune", "fit_full", "freeze_batchnorm",
           "is_encoder", "masked_loss", "predict_full", "window_fn"]

_UNET_DECODER = re.compile(r"^model\.(1\.submodule\.)*2\.")


def is_encoder(name: str, architecture: str) -> bool:
    """Encoder parameters of a backbone (frozen first in full mode)."""
    if architecture == "swinunetr":
        return name.startswith("swinViT.")
    return not _UNET_DECODER.match(name)


class FullNet(nn.Module):
    """A trainable backbone copy whose dense features, with the quick mode's classical
    filters, feed the quick mode's per-voxel head: (B, 1, z, y, x) -> (B, n_out, z, y, x).

    Built from a quick-mode head, it starts as that quick model; finetuning then moves
    the backbone (and the head) on from there."""

    def __init__(self, foundation: Any, head: VoxelHead, sigmas: Sequence[float],
                 spacing: Sequence[float]) -> None:
        super().__init__()
        self.foundation = foundation
        self.head = head
        self.sigmas = tuple(float(v) for v in sigmas)
        self.spacing = tuple(float(v) for v in spacing)

    @classmethod
    def from_saved(cls, foundation: Any, record: Mapping[str, Any], head_state: Mapping,
                   backbone_state: Mapping) -> FullNet:
        """A network from saved parts: a copy of ``foundation`` with the saved backbone
        weights, the saved head and its filter settings (``record``: "head", "features")."""
        backbone = copy.deepcopy(foundation)
        backbone.backbone.load_state_dict(backbone_state)
        feats = record["features"]
        return cls(backbone, VoxelHead.from_saved(record["head"], head_state), feats["sigmas"],
                   feats["spacing"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # fixed filters: no gradient to compute
            filters = filter_bank(x, self.sigmas, self.spacing)
        z = torch.cat([self.foundation(x), filters.to(x.dtype)], 1)
        flat = z.movedim(1, -1).reshape(-1, z.shape[1])
        logits = self.head(flat.float())
        return logits.reshape(*z.shape[:1], *z.shape[2:], -1).movedim(-1, 1)

    def settings(self) -> dict:
        return {"sigmas": list(self.sigmas), "spacing": list(self.spacing)}

    def to_device(self, device: str | torch.device) -> FullNet:
        """Move the backbone (and its mixed precision setting) and the head to ``device``."""
        self.foundation.to_device(device)
        return self.to(self.foundation.device)

    def freeze(self) -> FullNet:
        """No gradients, eval mode: a committed model."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LazyBatchNorm1d,
                nn.LazyBatchNorm2d, nn.LazyBatchNorm3d, nn.SyncBatchNorm)


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep batch-norm statistics fixed while training (a few patches would skew them)."""
    for m in module.modules():
        if isinstance(m, _BATCH_NORMS):
            m.eval()


class PatchSampler:
    """Training patches centred (with jitter) on annotated voxels, class-balanced.

    ``sample(n)`` -> (x (n, 1, z, y, x) float32 in [0, 1], y (n, 1, z, y, x) int64 class
    indices, -1 where not annotated); patches are ``patch`` clipped to the image.
    """

    def __init__(self, image: Any, intensity_range, sparse: SparseLabels, targets: np.ndarray,
                 patch: Sequence[int], rng: np.random.Generator, augment: str) -> None:
        self.image = image
        self.irange = intensity_range
        self.shape = np.asarray(image.shape)
        self.patch = np.minimum(np.asarray(patch), self.shape)
        self.coords = sparse.coords
        self.targets = targets
        self.by_class = [np.flatnonzero(targets == k) for k in range(int(targets.max()) + 1)]
        self.by_class = [ix for ix in self.by_class if len(ix)]
        self.rng = rng
        self.augment = augment

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(n):
            group = self.by_class[self.rng.integers(len(self.by_class))]
            centre = self.coords[group[self.rng.integers(len(group))]]
            jitter = self.rng.integers(-(self.patch // 4), self.patch // 4 + 1)
            origin = np.clip(centre - self.patch // 2 + jitter, 0, self.shape - self.patch)
            stop = origin + self.patch
            box = tuple(slice(int(a), int(b)) for a, b in zip(origin, stop, strict=True))
            raw = self.image[box]
            raw = np.asarray(raw.compute() if hasattr(raw, "compute") else raw, np.float32)
            img = normalize_window(raw, self.irange, "segmenting")
            lab = np.full(tuple(self.patch), -1, np.int64)
            inside = ((self.coords >= origin) & (self.coords < stop)).all(1)
            local = self.coords[inside] - origin
            lab[local[:, 0], local[:, 1], local[:, 2]] = self.targets[inside]
            if self.augment != "none":
                img, lab = self._augment(img, lab)
            xs.append(img)
            ys.append(lab)
        return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])

    def _augment(self, img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        for axis in (0, 1, 2):  # flips keep each axis where it is
            if rng.random() < 0.5:
                img, lab = img[(slice(None),) * axis + (slice(None, None, -1),)], lab[
                    (slice(None),) * axis + (slice(None, None, -1),)
                ]
        if img.shape[1] == img.shape[2]:  # 90 degree turns only within the YX plane
            k = int(rng.integers(4))
            img, lab = np.rot90(img, k, axes=(1, 2)), np.rot90(lab, k, axes=(1, 2))
        if self.augment == "all":
            img = self._jitter(img)
        return np.ascontiguousarray(img), np.ascontiguousarray(lab)

    def _jitter(self, img: np.ndarray) -> np.ndarray:
        rng = self.rng
        gain = rng.uniform(0.8, 1.25)
        offset = rng.uniform(-0.1, 0.1)
        noise = rng.normal(0, rng.uniform(0, 0.03), img.shape).astype(np.float32)
        return np.clip(img * gain + offset + noise, 0, 1).astype(np.float32)


def masked_loss(logits, y, weights, dice, dice_weight: float) -> torch.Tensor:
    """Cross-entropy and soft Dice over annotated voxels only (label -1 = none)."""
    mask = (y >= 0).float()
    if mask.sum() == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, y[:, 0], weight=weights, ignore_index=-1)
    if dice_weight <= 0:
        return ce
    return ce + dice_weight * dice(logits, y.clamp_min(0), mask=mask)


def finetune(net: FullNet, image: Any, irange: tuple[float, float], sparse: SparseLabels,
             n_out: int, config: Any, device: torch.device, ctx: Any = None) -> FitReport:
    """Finetune ``net`` (on ``device``) on patches around the strokes of ``image``; the
    best weights by the loss on fixed patches, the starting ones included, are loaded
    into ``net`` at the end. Returns the loop's report."""
    from monai.losses import MaskedDiceLoss

    cfg = config
    torch.manual_seed(cfg.seed)
    targets = sparse.targets(sparse.classes)
    rng = np.random.default_rng(cfg.seed)
    sampler = PatchSampler(image, irange, sparse, targets, cfg.patch_size, rng, cfg.augment)
    weights = class_weights(cfg, targets, n_out).to(device)
    dice = MaskedDiceLoss(softmax=True, to_onehot_y=True, batch=True)
    arch = net.foundation.spec.architecture
    enc = [p for n, p in net.foundation.backbone.named_parameters() if is_encoder(n, arch)]
    enc_ids = {id(p) for p in enc}
    rest = [p for p in net.parameters() if id(p) not in enc_ids]
    lr = cfg.learning_rate
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": lr}, {"params": enc, "lr": lr * cfg.encoder_lr_scale}],
        weight_decay=1e-4,
    )
    steps = cfg.n_steps
    freeze = cfg.freeze_steps if cfg.freeze_steps is not None else steps // 3
    for p in rest:  # a warm start copies a committed (frozen) model
        p.requires_grad_(True)
    for p in enc:
        p.requires_grad_(freeze <= 0)
    scaler = grad_scaler(net.foundation.autocast_dtype, device)
    # A fixed set of patches (their own draw, no augmentation) picks the best weights.
    eval_sampler = PatchSampler(image, irange, sparse, targets, cfg.patch_size,
                                np.random.default_rng(cfg.seed + 1), "none")
    eval_batch = eval_sampler.sample(min(4, max(2, cfg.batch)))
    done = [0]  # steps run so far (the encoder opens at step ``freeze``)
    what = f"training on {cfg.batch} patches of {cfg.patch_size} on {device}"

    def step_fn() -> float:
        if done[0] == freeze:
            for p in enc:
                p.requires_grad_(True)
        net.train()
        freeze_batchnorm(net)
        x, y = sampler.sample(cfg.batch)
        x, y = x.to(device), y.to(device)
        with memory_guard(what, "use a smaller patch size or batch size, quick mode, or the CPU"):
            logits = net(x)
            loss = masked_loss(logits, y, weights, dice, cfg.dice_weight)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        done[0] += 1
        return loss.item()

    def evaluate() -> float:
        net.eval()
        with torch.no_grad():
            x, y = eval_batch
            logits = net(x.to(device))
            return float(masked_loss(logits, y.to(device), weights, dice, cfg.dice_weight))

    # Stop returns at once with the best checked weights (no extra check: a stop is quick)
    return TrainLoop(net, step_fn, evaluate, steps, eval_every=cfg.eval_every, ctx=ctx,
                     start_best=True, check_on_stop=False).run()


def window_fn(net: FullNet, anchor: FullNet | None, quick_weight: float,
              intensity_range: tuple[float, float], device: torch.device):
    """fn(windows (B, 1, z, y, x) raw) -> probabilities (B, n_out, z, y, x): the finetuned
    network's, mixed with weight ``quick_weight`` with the quick model ``anchor``'s."""
    weight = quick_weight if anchor is not None else 0.0

    def fn(windows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(normalize_window(windows, intensity_range, "segmenting"))
        x = x.to(device)
        with torch.inference_mode():
            if weight >= 1.0:
                return F.softmax(anchor(x), 1)
            probs = F.softmax(net(x), 1)
            if weight > 0.0:
                probs = (1.0 - weight) * probs + weight * F.softmax(anchor(x), 1)
            return probs

    return fn


def predict_full(net: FullNet, anchor: FullNet | None, config: Any, image: Any,
                 irange: tuple[float, float], region: tuple[slice, ...], write: Any,
                 ctx: Any = None) -> None:
    """Probabilities over ``region`` of ``image``, window by window (Gaussian blending)
    into ``write(slices, probs)``: the finetuned network's, mixed with the quick model's
    by ``config.quick_weight``; smaller windows when the device runs out of memory."""
    device = next(net.parameters()).device
    fn = window_fn(net.eval(), anchor.eval() if anchor is not None else None,
                   config.quick_weight, irange, device)
    with_smaller_tiles(lambda tile: predict_tiled(
        fn, image, out_channels=net.head.n_out, tile=tile, overlap=config.overlap,
        blend="gaussian", region=region, sink=write, max_block_bytes=config.block_bytes,
        ctx=ctx, message="segmenting",
    ), config.tile, ctx, device, shape=image.shape, multiple=net.foundation.size_multiple,
        voxel_bytes=net.foundation.voxel_bytes(net.head.n_out) * (1 if anchor is None else 2))


def fit_full(seg: Any, image: Any, sparse: SparseLabels, irange: tuple[float, float],
             ctx: Any = None) -> FitReport:
    """The full-mode fit of ``seg`` (a :class:`~.segmenter.Segmenter`): the quick fit it
    starts from (``seg``'s own quick segmenter, whose features stay cached), then
    :func:`finetune`; commits the network and the quick model (``quick_weight``)."""
    cfg = seg.config
    classes = sparse.classes
    device = resolve_device(cfg.device) if cfg.device else seg.foundation.device
    warm = seg.net is not None and seg.classes == classes and cfg.warm_start
    anchor, quick = None, None
    if not warm or cfg.quick_weight > 0:
        # the quick fit it starts from (``seg._quick`` keeps its features cached, so
        # refits with more strokes reuse them)
        if seg._quick is None or seg._quick.config != cfg.quick_start():
            seg._quick = type(seg)(seg.foundation, cfg.quick_start())
        quick = seg._quick.fit(image, sparse, span(ctx, 0.0, 0.15))
        head = copy.deepcopy(seg._quick.head)
        feats = seg._quick.quick_features  # the head reads exactly these filters
        if cfg.quick_weight > 0:  # the quick model, kept frozen for predictions
            anchor = FullNet(copy.deepcopy(seg.foundation), copy.deepcopy(head),
                             feats.sigmas, feats.spacing).to_device(device)
    if warm:
        net = copy.deepcopy(seg.net)
    else:
        net = FullNet(copy.deepcopy(seg.foundation), head, feats.sigmas, feats.spacing)
    net.to_device(device)
    if quick is not None and quick.stopped:
        # stopped already during the quick fit: the model so far, with that quick model
        seg.commit(classes, net=net, anchor=anchor)
        seg.history, seg.best_loss = quick.history, quick.best_loss
        return dataclasses.replace(quick, extra=dict(quick.extra))
    report = finetune(net, image, irange, sparse, len(classes) + 1, cfg, device,
                      span(ctx, 0.15, 1.0))
    seg.commit(classes, net=net, anchor=anchor)
    return report
