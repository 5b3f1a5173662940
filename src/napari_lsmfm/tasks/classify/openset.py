"""Open set: an item that matches no class well enough is ``unknown``.

The score of an item is measured in the probe's standardised feature space: the mean of
its cosine similarity to the nearest class prototype (the mean of that class's examples)
and of its mean cosine similarity to its k nearest examples of one class, the class that
gives the largest (a class of several looks is not reduced to its mean); k is
``NEIGHBOURS``, or fewer so that every class keeps k examples when one is left out. The
threshold is calibrated from the examples themselves: each example's score computed
without it (leave-one-out: its class's prototype and neighbours without it), and the
threshold accepts ``known_rate`` of those (a quantile, set by the user, not a constant).
A user-set threshold replaces the calibration. With no class of two examples there is
nothing to calibrate from: nothing is rejected unless the user sets a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NEIGHBOURS", "OpenSet", "prototype_scores"]

NEIGHBOURS = 3  # nearest examples whose mean similarity is half the score


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def prototype_scores(z: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Cosine similarity (N, C) of standardised items ``z`` (N, D) to ``prototypes`` (C, D)."""
    return _unit(np.asarray(z, np.float64)) @ _unit(np.asarray(prototypes, np.float64)).T


def neighbour_scores(sims: np.ndarray, targets: np.ndarray, n_classes: int, k: int
                     ) -> np.ndarray:
    """(N,) for each row of similarities ``sims`` (N, M) to M examples of classes
    ``targets`` (M,): the largest over classes of the mean of its ``k`` largest
    similarities to that class's examples (a class with fewer uses those it has)."""
    best = np.full(len(sims), -np.inf)
    for c in range(n_classes):
        own = sims[:, np.asarray(targets) == c]
        if own.shape[1]:
            kk = max(1, min(int(k), own.shape[1]))
            best = np.maximum(best, np.sort(own, 1)[:, -kk:].mean(1))
    return best


@dataclass
class OpenSet:
    """Class prototypes (C, D) and examples (N, D) in the standardised space, and the
    unknown threshold.

    loo_scores: the examples' leave-one-out scores (the calibration); threshold: items
    scoring below it are unknown (-inf: none is; a user-set one is kept as is);
    calibrated: whether ``threshold`` came from the examples; examples: None (a model
    saved before they were kept) scores by the prototypes alone; targets: their class
    indices; neighbours: the k of the score.
    """

    prototypes: np.ndarray
    threshold: float = -np.inf
    loo_scores: np.ndarray | None = None
    calibrated: bool = False
    examples: np.ndarray | None = None
    targets: np.ndarray | None = None
    neighbours: int = 1

    @classmethod
    def fit(cls, z: np.ndarray, targets: np.ndarray, n_classes: int, *, known_rate: float,
            threshold: float | None = None) -> OpenSet:
        """Prototypes from standardised examples ``z`` (N, D) with class indices ``targets``;
        the threshold from their leave-one-out scores (or the user's ``threshold``)."""
        z = np.asarray(z, np.float64)
        targets = np.asarray(targets)
        sums = np.stack([z[targets == c].sum(0) for c in range(n_classes)])
        counts = np.bincount(targets, minlength=n_classes).astype(float)
        prototypes = sums / np.maximum(counts, 1)[:, None]
        pairs = prototype_scores(z, z)
        k = int(max(1, min(NEIGHBOURS, counts.min() - 1)))
        loo = []
        for i, c in enumerate(targets):
            if counts[c] < 2:
                continue
            protos = prototypes.copy()
            protos[c] = (sums[c] - z[i]) / (counts[c] - 1)
            others = np.arange(len(z)) != i
            near = neighbour_scores(pairs[i:i + 1, others], targets[others], n_classes, k)[0]
            loo.append(0.5 * (prototype_scores(z[i:i + 1], protos).max() + near))
        loo_arr = np.asarray(loo, np.float64)
        keep = {"examples": z, "targets": targets.astype(np.int64), "neighbours": k}
        if threshold is not None:
            return cls(prototypes, float(threshold), loo_arr, False, **keep)
        if len(loo_arr) < 2:
            return cls(prototypes, -np.inf, loo_arr, False, **keep)
        value = float(np.quantile(loo_arr, 1.0 - float(known_rate), method="lower"))
        return cls(prototypes, value, loo_arr, True, **keep)

    def scores(self, z: np.ndarray) -> np.ndarray:
        """(N,) the score of each standardised item (higher: more like the examples)."""
        proto = prototype_scores(z, self.prototypes).max(1)
        if self.examples is None or self.targets is None or not len(self.examples):
            return proto
        near = neighbour_scores(prototype_scores(z, self.examples), self.targets,
                                len(self.prototypes), self.neighbours)
        return 0.5 * (proto + near)

    def unknown(self, z: np.ndarray) -> np.ndarray:
        """(N,) bool: the items below the threshold."""
        return self.scores(z) < self.threshold
