"""Quick mode: a per-voxel head (:class:`~napari_lsmfm.tasks.heads.VoxelHead`) trained
on the features of the brushed voxels only, and applied to blocks of features.

Cross-entropy with every annotated voxel counting the same (unless ``class_weights``),
Adam with a cosine schedule, the best weights by the loss on a fixed subset of the
strokes (:class:`~napari_lsmfm.engine.train.TrainLoop`). It takes seconds, so the head
can be retrained live as strokes come in.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_lsmfm.engine.accel import suggest_batch_size
from napari_lsmfm.engine.device import window_bytes, with_smaller_tiles
from napari_lsmfm.engine.tiled import predict_tiled
from napari_lsmfm.engine.train import FitReport, TrainLoop
from napari_lsmfm.tasks.heads import VoxelHead

__all__ = ["class_weights", "classify_cached", "classify_windows", "cpu_threads", "fit_head",
           "folded_layers", "head_decay", "head_probabilities", "head_probabilities_flat",
           "windows_per_call"]


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """Use ``n`` intra-op threads while on the CPU (restored afterwards)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def class_weights(config: Any, targets: np.ndarray, n_out: int) -> torch.Tensor:
    """Cross-entropy weight per class index (background first) for ``config.class_weights``:
    None = ones, "balanced" = inverse frequency of ``targets`` (clipped to 0.05-20), or
    the values given. float32 (n_out,)."""
    cw = config.class_weights
    if cw is None:
        return torch.ones(n_out)
    if isinstance(cw, str):
        if cw != "balanced":
            raise ValueError(f"class_weights must be 'balanced', None or a list, got {cw!r}")
        counts = np.bincount(targets[targets >= 0], minlength=n_out).astype(np.float64)
        w = counts.sum() / (n_out * np.maximum(counts, 1))
        return torch.tensor(np.clip(w, 0.05, 20.0), dtype=torch.float32)
    w = np.asarray(cw, np.float32)
    if w.shape != (n_out,):
        raise ValueError(f"class_weights needs {n_out} values (background first), got {len(w)}")
    return torch.from_numpy(w)


def head_decay(config: Any, targets: np.ndarray, n_out: int) -> float:
    """The quick head's weight decay for these strokes (see ``decay_reference``)."""
    if not config.decay_reference:
        return float(config.weight_decay)
    counts = np.bincount(targets[targets >= 0], minlength=n_out)
    rarest = int(counts[counts > 0].min()) if (counts > 0).any() else 1
    return float(config.weight_decay) * min(1.0, config.decay_reference / rarest)


def fit_head(config: Any, samples: np.ndarray, targets: np.ndarray, n_out: int,
             start: VoxelHead | None, device: torch.device, ctx: Any = None,
             steps: int | None = None) -> tuple[VoxelHead, FitReport]:
    """Train a head on ``samples`` (N, C) float32 features with class indices ``targets``
    (N,) int64 (0 = background); ``start``: a head to continue from (a warm start; used
    when it reads C features), else a new one standardised on ``samples``; ``steps``:
    None = ``config.n_steps`` (the learning-rate schedule spans the steps run).

    Returns the best head (eval mode) and the loop's report; ``Cancelled`` before any
    step propagates.
    """
    cfg = config
    X = torch.from_numpy(samples).to(device)
    Y = torch.from_numpy(targets).to(device)
    torch.manual_seed(cfg.seed)
    if start is None or start.in_channels != X.shape[1]:
        head = VoxelHead(X.shape[1], n_out, hidden=cfg.hidden, dropout=cfg.dropout)
        head.set_standardization(X.float())
    else:
        head = copy.deepcopy(start)
    head.to(X.device)
    weights = class_weights(cfg, targets, n_out).to(X.device)
    rng = np.random.default_rng(cfg.seed)
    n = len(X)
    eval_idx = torch.from_numpy(rng.choice(n, size=min(n, 65536), replace=False)).to(X.device)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate,
                           weight_decay=head_decay(cfg, targets, n_out))
    steps = cfg.n_steps if steps is None else int(steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=steps, eta_min=0.1 * cfg.learning_rate
    )
    batch = min(cfg.batch, len(X))

    def step_fn() -> float:
        idx = torch.from_numpy(rng.integers(len(X), size=batch)).to(X.device)
        loss = F.cross_entropy(head(X[idx]), Y[idx], weight=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    def evaluate() -> float:
        head.eval()
        with torch.no_grad():
            loss = F.cross_entropy(head(X[eval_idx]), Y[eval_idx], weight=weights)
        head.train()
        return float(loss)

    with cpu_threads(X.device, 1):  # tiny ops: threading costs more than it gives
        report = TrainLoop(head, step_fn, evaluate, steps, eval_every=cfg.eval_every,
                           ctx=ctx, check_on_stop=False).run()
    return head.eval(), report


def head_probabilities(head: Any, feats: np.ndarray, device: torch.device) -> np.ndarray:
    """Class probabilities (n_out, z, y, x) float32 of a block of features (C, z, y, x)
    (``head``: a :class:`VoxelHead` or a :class:`~napari_lsmfm.tasks.heads.ForestHead`)."""
    c = feats.shape[0]
    flat = feats.reshape(c, -1)
    probs = np.empty((head.n_out, flat.shape[1]), np.float32)
    step = 1 << 18  # voxels per pass: bounded memory for any block
    layers = folded_layers(head, device)
    if layers is not None:
        with torch.inference_mode():
            for i in range(0, flat.shape[1], step):
                x = torch.from_numpy(np.ascontiguousarray(flat[:, i : i + step], np.float32))
                probs[:, i : i + step] = _channel_mlp(layers, x.to(device)).cpu().numpy()
        return probs.reshape(head.n_out, *feats.shape[1:])
    for i in range(0, flat.shape[1], step):
        x = np.ascontiguousarray(flat[:, i : i + step].T, np.float32)
        probs[:, i : i + step] = head_probabilities_flat(head, x, device).T
    return probs.reshape(head.n_out, *feats.shape[1:])


def folded_layers(head: Any, device: torch.device) -> list[tuple] | None:
    """A :class:`VoxelHead` (eval mode) as (weight, bias) pairs with its input
    standardisation folded into the first layer (``W / std``, ``b - (W / std) mean``), so
    a block of features (C, N) runs as matrix products with no transposes, no
    standardised copy: the same probabilities to float rounding (about 1e-6). None for
    any other head or layer (those run as they are)."""
    mlp = getattr(head, "mlp", None)
    if not isinstance(head, torch.nn.Module) or head.training or mlp is None:
        return None
    kept = [m for m in mlp if not isinstance(m, torch.nn.Dropout)]  # identity in eval
    linears = [m for m in kept if isinstance(m, torch.nn.Linear)]
    pattern = [torch.nn.Linear, torch.nn.ReLU] * (len(linears) - 1) + [torch.nn.Linear]
    if not linears or [type(m) for m in kept] != pattern:
        return None
    with torch.no_grad():
        w = linears[0].weight.float() / head.std.float()[None, :]
        b = linears[0].bias.float() - w @ head.mean.float()
        layers = [(w, b)] + [(m.weight.float(), m.bias.float()) for m in linears[1:]]
    return [(w.detach().to(device).contiguous(), b.detach().to(device)[:, None].contiguous())
            for w, b in layers]


def _channel_mlp(layers: list[tuple], x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities (n_out, N) of features (C, N) through :func:`folded_layers`."""
    for k, (w, b) in enumerate(layers):
        x = torch.addmm(b, w, x)
        if k + 1 < len(layers):
            x = x.relu_()
    return torch.softmax(x, 0)


def head_probabilities_flat(head: Any, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Class probabilities (N, n_out) float32 of feature vectors ``x`` (N, C)."""
    if not isinstance(head, torch.nn.Module):  # a forest
        return head.probabilities(x)
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
        return F.softmax(head(t), -1).float().cpu().numpy()


def classify_cached(head: VoxelHead, cached: np.ndarray, region: tuple[slice, ...], write: Any,
                    device: torch.device, ctx: Any = None) -> None:
    """Apply ``head`` to the cached whole-volume features (C, Z, Y, X) inside ``region``,
    slab by slab along z, calling ``write(slices within region, probabilities)``."""
    plane = cached.shape[0] * len(range(*region[1].indices(cached.shape[2]))) * len(
        range(*region[2].indices(cached.shape[3]))) * 4
    # about 16 MB of float32 per slab: numpy work on one slab holds the GIL, so
    # small slabs keep a viewer's event loop responsive while this runs in a thread
    depth = max(1, (16 * 2**20) // plane)
    zs = range(region[0].start, region[0].stop, depth)
    for i, z0 in enumerate(zs):
        z1 = min(z0 + depth, region[0].stop)
        feats = cached[:, z0:z1, region[1], region[2]]
        sl = (slice(z0 - region[0].start, z1 - region[0].start), slice(None), slice(None))
        write(sl, head_probabilities(head, feats, device))
        if ctx is not None:
            ctx.report(0.9 + 0.1 * (i + 1) / len(zs), "classifying")


def classify_windows(head: VoxelHead, features: Any, config: Any, image: Any,
                     irange: tuple[float, float], region: tuple[slice, ...], write: Any,
                     device: torch.device, ctx: Any = None, batch_size: int | None = None
                     ) -> None:
    """Without a cache: the features of ``region`` of ``image`` (a :class:`~.features.
    QuickFeatures`), block by block with the tiled engine, straight into ``head`` and
    ``write``; smaller windows when the device runs out of memory. ``batch_size``:
    windows per call (None: :func:`windows_per_call`)."""

    def sink(sl, feats):
        write(sl, head_probabilities(head, feats, device))

    memory = features.memory(image.shape)
    with_smaller_tiles(lambda tile: predict_tiled(
        features.window_fn(irange), image, out_channels=features.channels, tile=tile,
        overlap=config.overlap, blend=config.feature_blend, region=region, sink=sink,
        max_block_bytes=config.block_bytes, ctx=ctx, message="segmenting",
        batch_size=batch_size or windows_per_call(device, tile, memory),
    ), config.tile, ctx, device, **memory)


def windows_per_call(device: Any, tile: Any, memory: dict) -> int:
    """Windows per network call for ``tile`` (:func:`~napari_lsmfm.engine.accel.
    suggest_batch_size`: 1 on the CPU, more on a GPU with room); ``memory``: the
    ``shape`` / ``voxel_bytes`` / ``multiple`` of the features' estimate."""
    need = window_bytes(tile, memory["voxel_bytes"], memory.get("multiple", 1))
    return suggest_batch_size(device, need)
