"""Open set: an item that matches no class well enough is ``unknown``.

The score of an item is its cosine similarity, in the probe's standardised feature
space, to the nearest class prototype (the mean of that class's examples). The threshold
is calibrated from the examples themselves: each example's score against its class's
prototype computed without it (leave-one-out), and the threshold accepts ``known_rate``
of those (a quantile, set by the user, not a constant). A user-set threshold replaces the
calibration. With no class of two examples there is nothing to calibrate from: nothing
is rejected unless the user sets a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OpenSet", "prototype_scores"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def prototype_scores(z: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Cosine similarity (N, C) of standardised items ``z`` (N, D) to ``prototypes`` (C, D)."""
    return _unit(np.asarray(z, np.float64)) @ _unit(np.asarray(prototypes, np.float64)).T


@dataclass
class OpenSet:
    """Class prototypes (C, D) in the standardised space and the unknown threshold.

    loo_scores: the examples' leave-one-out scores (the calibration); threshold: items
    scoring below it are unknown (-inf: none is; a user-set one is kept as is);
    calibrated: whether ``threshold`` came from the examples.
    """

    prototypes: np.ndarray
    threshold: float = -np.inf
    loo_scores: np.ndarray | None = None
    calibrated: bool = False

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
        loo = []
        for i, c in enumerate(targets):
            if counts[c] < 2:
                continue
            others = (sums[c] - z[i]) / (counts[c] - 1)
            protos = prototypes.copy()
            protos[c] = others
            loo.append(prototype_scores(z[i:i + 1], protos).max())
        loo_arr = np.asarray(loo, np.float64)
        if threshold is not None:
            return cls(prototypes, float(threshold), loo_arr, False)
        if len(loo_arr) < 2:
            return cls(prototypes, -np.inf, loo_arr, False)
        value = float(np.quantile(loo_arr, 1.0 - float(known_rate), method="lower"))
        return cls(prototypes, value, loo_arr, True)

    def scores(self, z: np.ndarray) -> np.ndarray:
        """(N,) the score of each standardised item: similarity to its nearest prototype."""
        return prototype_scores(z, self.prototypes).max(1)

    def unknown(self, z: np.ndarray) -> np.ndarray:
        """(N,) bool: the items below the threshold."""
        return self.scores(z) < self.threshold
