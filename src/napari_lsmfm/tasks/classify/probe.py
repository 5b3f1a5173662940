"""The probe: a linear layer (or a small MLP) on standardised item features, trained in
seconds on a CPU with the one training loop (:class:`~napari_lsmfm.engine.train.TrainLoop`).

Standardisation is part of the module (its buffers are saved with it). With a handful of
examples their own spread is a poor estimate, so the statistics come from every item the
classifier was shown (all objects of the labels layer, not only the picked ones) when
there are more of those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_lsmfm.engine.train import FitReport, TrainLoop

__all__ = ["Probe", "train_probe"]


class Probe(nn.Module):
    """(N, D) item features -> (N, C) class logits: standardise, then linear or MLP."""

    def __init__(self, in_features: int, n_classes: int, head: str = "linear",
                 hidden: int = 64) -> None:
        super().__init__()
        self.in_features, self.n_classes = int(in_features), int(n_classes)
        self.head, self.hidden = str(head), int(hidden)
        self.register_buffer("mean", torch.zeros(self.in_features))
        self.register_buffer("std", torch.ones(self.in_features))
        if self.head == "mlp":
            self.net = nn.Sequential(nn.Linear(self.in_features, self.hidden), nn.ReLU(),
                                     nn.Linear(self.hidden, self.n_classes))
        else:
            self.net = nn.Sequential(nn.Linear(self.in_features, self.n_classes))

    def set_standardization(self, features: np.ndarray,
                            blocks: Sequence[tuple[int, float]] = ()) -> None:
        """Mean and spread per feature from (N, D) items; a feature that barely varies keeps
        a floor of a tenth of its group's median spread (no division by almost nothing).
        ``blocks``: (width, weight) of consecutive groups of features: each group is scaled
        to a total variance of ``weight ** 2`` whatever its width, so 500 pooled channels
        do not drown 27 shape measures."""
        x = torch.as_tensor(np.asarray(features, np.float32))
        std = x.std(0) if len(x) > 1 else torch.ones(x.shape[1])
        blocks = list(blocks) or [(x.shape[1], 1.0)]
        if sum(w for w, _ in blocks) != x.shape[1]:
            raise ValueError(f"blocks cover {sum(w for w, _ in blocks)} features, not "
                             f"{x.shape[1]}")
        start = 0
        for width, weight in blocks:
            part = std[start:start + width]
            part = part.clamp_min(float(part.median()) * 0.1 + 1e-6)
            std[start:start + width] = part * math.sqrt(width) / max(float(weight), 1e-6)
            start += width
        with torch.no_grad():
            self.mean.copy_(x.mean(0))
            self.std.copy_(std)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))

    def settings(self) -> dict:
        return {"in_features": self.in_features, "n_classes": self.n_classes,
                "head": self.head, "hidden": self.hidden}

    @classmethod
    def from_saved(cls, settings: Mapping[str, Any], state: Mapping[str, Any]) -> Probe:
        probe = cls(settings["in_features"], settings["n_classes"], settings.get("head", "linear"),
                    settings.get("hidden", 64))
        probe.load_state_dict(state)
        return probe


def train_probe(features: np.ndarray, targets: np.ndarray, n_classes: int, *,
                population: np.ndarray | None = None,
                blocks: Sequence[tuple[int, float]] = (), head: str = "linear",
                hidden: int = 64, steps: int = 200, lr: float = 1e-2, l2: float = 0.1,
                seed: int = 0, ctx: Any = None) -> tuple[Probe, FitReport]:
    """Train a :class:`Probe` on ``features`` (N, D) float32 with class indices ``targets``
    (N,) int in [0, n_classes): class-balanced cross-entropy plus ``l2 / (2 N)`` times the
    squared weights (a logistic regression with C = 1 / l2 for the linear head), full
    batch, Adam. ``population`` (M, D): the items whose statistics standardise the inputs
    (default the examples); ``blocks``: feature groups and their weights (see
    :meth:`Probe.set_standardization`). Returns the probe (eval mode, best weights by
    training loss) and the loop's report; Stop keeps the best so far."""
    torch.manual_seed(int(seed))
    x = torch.as_tensor(np.asarray(features, np.float32))
    y = torch.as_tensor(np.asarray(targets, np.int64))
    probe = Probe(x.shape[1], n_classes, head, hidden)
    probe.set_standardization(population if population is not None and len(population) > len(x)
                              else features, blocks)
    counts = torch.bincount(y, minlength=n_classes).float().clamp_min(1.0)
    weight = counts.sum() / (n_classes * counts)  # each class counts the same
    ce = nn.CrossEntropyLoss(weight=weight)
    weights = [p for name, p in probe.net.named_parameters() if name.endswith("weight")]
    penalty = float(l2) / (2 * len(x))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ce(logits, target) + penalty * sum((w ** 2).sum() for w in weights)

    opt = torch.optim.Adam(probe.net.parameters(), lr=float(lr))
    probe.train()

    def step() -> float:
        opt.zero_grad()
        loss = loss_fn(probe(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def evaluate() -> float:
        with torch.no_grad():
            return float(loss_fn(probe(x), y))

    report = TrainLoop(probe, step, evaluate, int(steps), eval_every=10, ctx=ctx,
                       message="training the probe").run()
    return probe.eval(), report


def pseudo_labelled(probe: Probe, population: np.ndarray, index: np.ndarray,
                    targets: np.ndarray, n_classes: int, factor: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Self-training: the example rows ``index`` of ``population`` (M, D) with their
    ``targets``, plus for every class the items the probe is surest of (not examples), up
    to ``factor`` times that class's examples. Returns (rows, class indices)."""
    with torch.no_grad():
        probs = torch.softmax(probe(torch.as_tensor(population)), 1).numpy()
    pred, conf = probs.argmax(1), probs.max(1)
    taken = set(int(i) for i in index)
    rows, labels = [np.asarray(index)], [np.asarray(targets)]
    for c in range(n_classes):
        want = int(round(factor * np.sum(targets == c)))
        order = [i for i in np.argsort(-conf) if pred[i] == c and int(i) not in taken][:want]
        rows.append(np.asarray(order, np.int64))
        labels.append(np.full(len(order), c, np.int64))
    return np.concatenate(rows).astype(np.int64), np.concatenate(labels).astype(np.int64)
