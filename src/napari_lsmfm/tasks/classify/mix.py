"""How much of the class probabilities comes from the forest on the hand-made measures and
how much from the probe on the foundation's features, chosen on the user's own examples.

Where the foundation's features carry the classes (our synthetic scenes) the probe is the
better half; on volumes unlike anything it was trained on (the real tiles of
``benchmarks/classification.py``'s foreign column) its features can mislead and the
forest alone does better. So the weight is chosen among a few by stratified
cross-validation on the examples: each fold's probe and forest are trained on the other
folds, every candidate weight mixes their held-out probabilities, and the one with the
lowest log-loss wins (ties: the middle weight, then the probe).

On the validation split of that benchmark this choice did not beat a fixed share: the
examples' own folds come from one region of one volume and do not show how the probe
fares on another, so ``choose_mix`` is off by default and ``forest_weight`` (0.75) decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from napari_lsmfm.tasks.heads import ForestHead

from .probe import train_probe

__all__ = ["MIX_WEIGHTS", "choose_forest_weight", "folds_of", "forest_share", "mixed_logits"]

MIX_WEIGHTS = (0.0, 0.5, 1.0)  # forest share: probe alone, half and half, forest alone
MAX_FOLDS = 5


def folds_of(targets: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """(N,) fold index of each example, stratified by class, or None when the rarest class
    has fewer than two examples (nothing to hold out)."""
    targets = np.asarray(targets)
    counts = np.bincount(targets)
    counts = counts[counts > 0]
    if len(counts) < 2 or counts.min() < 2:
        return None
    n = int(min(MAX_FOLDS, counts.min()))
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(targets), np.int64)
    for c in np.unique(targets):
        where = np.flatnonzero(targets == c)
        folds[where] = rng.permutation(np.arange(len(where)) % n)
    return folds


def choose_forest_weight(targets: np.ndarray, n_classes: int,
                         probe_probs: Callable[[np.ndarray, np.ndarray], np.ndarray],
                         forest_probs: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                         weights: Sequence[float] = MIX_WEIGHTS, seed: int = 0
                         ) -> tuple[float | None, dict[float, float]]:
    """The forest share with the lowest cross-validated log-loss on the examples.

    ``probe_probs(train_rows, held_rows)`` / ``forest_probs(...)``: (len(held), C)
    probabilities of the held-out examples from a model trained on ``train_rows`` (indices
    into the examples). Returns (the weight, {weight: mean log-loss}); (None, {}) when
    there are too few examples to hold any out."""
    targets = np.asarray(targets)
    folds = folds_of(targets, seed)
    if folds is None:
        return None, {}
    p = np.zeros((len(targets), n_classes))
    q = np.zeros((len(targets), n_classes))
    for f in np.unique(folds):
        held, train = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        p[held] = probe_probs(train, held)
        q[held] = forest_probs(train, held)
    rows = np.arange(len(targets))
    losses = {float(w): float(-np.mean(np.log(np.maximum(
        ((1 - w) * p + w * q)[rows, targets], 1e-3)))) for w in weights}
    best = min(losses.values())
    ties = [w for w, v in losses.items() if v <= best + 1e-9]
    middle = sorted(ties, key=lambda w: (abs(w - 0.5), w))
    return middle[0], losses


def forest_share(cfg: Any, feats: Any, index: np.ndarray, targets: np.ndarray, train: dict
                 ) -> tuple[float, dict]:
    """The forest's share of a classifier's probabilities: chosen by
    :func:`choose_forest_weight` among 0, ``cfg.forest_weight`` and 1 when
    ``cfg.choose_mix`` (and the examples allow it), else ``cfg.forest_weight``. ``feats``:
    the items' features, ``index`` the examples' rows, ``train`` :func:`~.probe.train_probe`'s
    settings. Returns (weight, {weight: cross-validated log-loss})."""
    import torch

    if not cfg.choose_mix:
        return float(cfg.forest_weight), {}
    n = int(targets.max()) + 1
    x, m = feats.probe_inputs[index], feats.measures[index]

    def probe_probs(tr: np.ndarray, held: np.ndarray) -> np.ndarray:
        probe, _ = train_probe(x[tr], targets[tr], n, **train)
        with torch.no_grad():
            return torch.softmax(probe(torch.as_tensor(x[held])), 1).double().numpy()

    def forest_probs(tr: np.ndarray, held: np.ndarray) -> np.ndarray:
        head = ForestHead(m.shape[1], n, cfg.forest_trees, None, seed=cfg.seed)
        return head.fit(m[tr], targets[tr]).probabilities(m[held])

    weights = sorted({0.0, float(cfg.forest_weight), 1.0})
    weight, losses = choose_forest_weight(targets, n, probe_probs, forest_probs,
                                          weights=weights, seed=cfg.seed)
    return (float(cfg.forest_weight) if weight is None else weight), losses


def mixed_logits(logits: np.ndarray, forest: np.ndarray, weight: float) -> np.ndarray:
    """The log of ``(1 - weight)`` times the probe's probabilities (softmax of ``logits``
    (N, C)) plus ``weight`` times the forest's (N, C)."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.log(np.maximum((1.0 - float(weight)) * p + float(weight) * forest, 1e-9))
