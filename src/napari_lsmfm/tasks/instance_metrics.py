"""Per-object scores of instance labels against ground truth (no Qt, numpy only).

A predicted object matches a true one when their intersection over union exceeds
``iou`` (0.5 by default). Above 0.5 a match is necessarily one-to-one (two objects
cannot both overlap more than half of a third), so no assignment step is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ObjectScore", "match_objects", "object_f1"]


@dataclass(frozen=True)
class ObjectScore:
    """One-to-one matches at an IoU threshold.

    tp: matched pairs; n_pred / n_true: objects in each label image;
    precision = tp / n_pred, recall = tp / n_true, f1 = 2 tp / (n_pred + n_true)
    (1.0 when both are empty).
    """

    tp: int
    n_pred: int
    n_true: int

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else float(self.n_true == 0)

    @property
    def recall(self) -> float:
        return self.tp / self.n_true if self.n_true else float(self.n_pred == 0)

    @property
    def f1(self) -> float:
        total = self.n_pred + self.n_true
        return 2.0 * self.tp / total if total else 1.0


def match_objects(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> ObjectScore:
    """Match the objects of two label images of one shape (0 = background).

    Args:
        pred, truth: integer label images, any shape (the same); ids need not be
            consecutive.
        iou: a pair matches when its intersection over union is above this; >= 0.5.

    Returns:
        An :class:`ObjectScore`.
    """
    pred = np.asarray(pred).ravel()
    truth = np.asarray(truth).ravel()
    if pred.shape != truth.shape:
        raise ValueError(f"label images differ in size: {pred.size} and {truth.size}")
    if iou < 0.5:
        raise ValueError(f"iou must be at least 0.5 for one-to-one matches, got {iou}")
    p_ids, p_inv, p_size = np.unique(pred, return_inverse=True, return_counts=True)
    t_ids, t_inv, t_size = np.unique(truth, return_inverse=True, return_counts=True)
    n_pred = int((p_ids != 0).sum())
    n_true = int((t_ids != 0).sum())
    both = (pred != 0) & (truth != 0)
    if not both.any():
        return ObjectScore(0, n_pred, n_true)
    # one code per (pred, true) pair of the overlap, counted
    pair = p_inv[both].astype(np.int64) * len(t_ids) + t_inv[both]
    codes, inter = np.unique(pair, return_counts=True)
    pi, ti = codes // len(t_ids), codes % len(t_ids)
    union = p_size[pi] + t_size[ti] - inter
    tp = int((inter / union > iou).sum())
    return ObjectScore(tp, n_pred, n_true)


def object_f1(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> float:
    """Per-object F1 at ``iou`` of two label images (see :func:`match_objects`)."""
    return match_objects(pred, truth, iou).f1
