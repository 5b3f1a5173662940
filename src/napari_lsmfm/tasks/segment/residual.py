"""A residual correction of a trained quick model, fitted in a fraction of a second.

Review clicks (:mod:`napari_lsmfm.review.clicks`) say "this voxel is the object" or
"this voxel is background" where the model got it wrong. Refitting the quick model on its
strokes plus a few clicked voxels would take seconds (and a random-forest candidate
cannot be warm-started at all), so the correction is a small MLP ``g`` on top of the
trained model, whatever its candidate: the corrected logits are
``log p_model(x) + g(x, log p_model(x))`` on the cached per-voxel features ``x``. ``g``
starts at zero (the model unchanged), is trained for a few steps on the clicks (weighted
by a conditioning strength) and on anchor voxels that keep the model's answer where the
clicks say nothing (the strokes, or the model's own confident prediction), and is warm
started from one click to the next. The features come from the segmenter's whole-volume
cache: nothing is recomputed for a cached volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .quick import cpu_threads, head_probabilities_flat
from .refine import apply_offsets

__all__ = ["Residual", "fit_residual", "head_inputs", "model_probabilities",
           "region_inputs"]

_EPS = 1e-4


def head_inputs(seg: Any, image: Any, coords: np.ndarray,
                irange: tuple[float, float] | None = None) -> np.ndarray:
    """The features (N, C) float32 the quick model of ``seg`` reads at voxels ``coords``
    (N, 3): read from the whole-volume cache (filled when missing and it fits), else
    computed in the windows holding them (``irange``: the image's intensity range then;
    None = from the foundation)."""
    if irange is None and seg.features(image) is None:
        irange = seg.foundation.intensity_range(image)
    return seg.stroke_features(image, seg.quick_features, np.asarray(coords, np.int64),
                               irange or (0.0, 1.0))


def region_inputs(seg: Any, image: Any, region: Sequence[slice],
                  irange: tuple[float, float] | None = None) -> np.ndarray:
    """The features (C, z, y, x) float32 of a box ``region`` (three slices with start and
    stop) of ``image``: a view of the cache when cached, else computed there."""
    cached = seg.features(image)
    if cached is not None:
        return np.asarray(cached[(slice(None), *region)], np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in region],
                                indexing="ij"), -1).reshape(-1, 3)
    feats = head_inputs(seg, image, grid, irange)
    shape = tuple(s.stop - s.start for s in region)
    return np.ascontiguousarray(feats.T).reshape(-1, *shape)


def model_probabilities(seg: Any, feats: np.ndarray) -> np.ndarray:
    """The quick model's class probabilities (N, n_out) at feature vectors (N, C), with
    its prior refinement applied, as :meth:`Segmenter.predict` gives them."""
    probs = head_probabilities_flat(seg.head, feats, seg.foundation.device)
    offsets = seg.refinement.offsets if seg.refinement is not None else None
    return apply_offsets(probs, offsets, axis=-1)


class Residual(nn.Module):
    """``g``: (features (N, C), log-probabilities (N, K)) -> (N, K) logit corrections;
    the inputs standardised on the anchors, the last layer zero so it starts at zero."""

    def __init__(self, features: np.ndarray, log_probs: np.ndarray, hidden: int = 16) -> None:
        super().__init__()
        x = torch.from_numpy(np.concatenate([features, log_probs], 1).astype(np.float32))
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0).clamp_min(1e-3))
        k = log_probs.shape[1]
        self.mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(),
                                 nn.Linear(hidden, k))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
        x = (torch.cat([features, log_probs], 1) - self.mean) / self.std
        return log_probs + self.mlp(x)

    def probabilities(self, features: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Corrected probabilities (N, K) float32 of model probabilities ``probs``."""
        with torch.inference_mode():
            f = torch.from_numpy(np.ascontiguousarray(features, np.float32))
            lp = torch.from_numpy(np.log(np.clip(probs, _EPS, 1.0)).astype(np.float32))
            return F.softmax(self(f, lp), -1).numpy()


def fit_residual(residual: Residual,
                 parts: Sequence[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]], *,
                 steps: int = 30, lr: float = 1e-2, weight_decay: float = 1e-3,
                 batch: int = 1024, seed: int = 0) -> Residual:
    """Train ``residual`` in place (warm: it continues from its weights) for ``steps``
    Adam steps on ``parts``: each ((features (N, C), model probabilities (N, K), class
    indices (N,)), weight); every step the weighted sum over the parts of the
    cross-entropy of a random batch of at most ``batch`` of its voxels (all of a smaller
    part, such as the clicked voxels)."""
    groups = []
    for (f, p, t), weight in parts:
        if len(t) and weight > 0:
            groups.append((torch.from_numpy(np.ascontiguousarray(f, np.float32)),
                           torch.from_numpy(np.log(np.clip(p, _EPS, 1.0)).astype(np.float32)),
                           torch.from_numpy(np.asarray(t, np.int64)), float(weight)))
    if not groups:
        return residual.eval()
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(residual.mlp.parameters(), lr=lr, weight_decay=weight_decay)
    residual.train()
    with cpu_threads(torch.device("cpu"), 1):  # tiny ops
        for _ in range(int(steps)):
            loss = 0.0
            for f, lp, t, weight in groups:
                if len(t) > batch:
                    idx = torch.randint(len(t), (batch,), generator=gen)
                    f, lp, t = f[idx], lp[idx], t[idx]
                loss = loss + weight * F.cross_entropy(residual(f, lp), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return residual.eval()
