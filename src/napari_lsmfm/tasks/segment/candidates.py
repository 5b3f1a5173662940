"""Quick mode's candidate choice: never worse than the classical tools on these strokes.

A quick fit can use one of three models on the same per-voxel features:

- "foundation": the MLP head on the foundation's features plus the classical filters;
- "filters": the same MLP on the classical filters alone (a foundation whose features do
  not suit this volume cannot pull it down);
- "forest": a random forest on the classical filters (the ilastik / napari-apoc recipe).

With ``candidate="auto"`` (the default) each is validated on the user's own strokes and
the best is refitted on all of them. Validation holds whole parts of the strokes out, so
neighbouring voxels of one stroke never sit on both sides: with two or more brushed z
planes, one plane at a time (leave one slice out, at most :data:`MAX_FOLDS` planes);
with one, the connected strokes of each class split into two groups. The score is the
balanced accuracy on the held-out voxels (the mean over classes of the fraction
predicted right); validation fits run a third of the steps. Near ties (within
:data:`TIE`) go to the simpler model in :data:`PREFERENCE` order. Everything is seeded by
``config.seed``, so the same strokes give the same choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from napari_lsmfm.engine.jobs import Cancelled, span
from napari_lsmfm.engine.train import FitReport
from napari_lsmfm.tasks.heads import ForestHead, VoxelHead

from .features import QuickFeatures
from .quick import class_weights, fit_head, head_probabilities_flat
from .refine import VOLUME_SAMPLES, shift_for, stroke_prior, volume_sample
from .scale import object_scale

__all__ = ["CANDIDATES", "MAX_FOLDS", "PREFERENCE", "TIE", "balanced_accuracy",
           "choose_candidate", "fit_candidate", "fit_quick", "stroke_folds"]

CANDIDATES = ("foundation", "filters", "forest")
PREFERENCE = ("filters", "foundation", "forest")
TIE = 0.005
# with the prior refinement on (config.refine "auto"), which corrects the MLPs' borders
# but not the forest's, the forest wins only by more than this over the best MLP
FOREST_MARGIN = 0.02
MAX_FOLDS = 3
FOREST_SAMPLES = 20_000  # the forest trains on at most this many strokes (even per class)


def stroke_folds(coords: np.ndarray, targets: np.ndarray, seed: int = 0,
                 max_folds: int = MAX_FOLDS) -> list[np.ndarray]:
    """Held-out masks (bool, one per fold) over the annotated voxels ``coords`` (N, 3)
    with class indices ``targets`` (N,). Every fold keeps each class on the training
    side. Empty when the strokes cannot be split (a class painted in one tiny spot)."""
    n_classes = int(targets.max()) + 1 if len(targets) else 0
    planes = []
    for z in np.unique(coords[:, 0]):
        on = coords[:, 0] == z
        if len(np.unique(targets[on])) == n_classes:
            planes.append(int(z))
    if len(planes) >= 2:
        pick = np.linspace(0, len(planes) - 1, min(max_folds, len(planes))).round().astype(int)
        folds = [coords[:, 0] == planes[i] for i in pick]
    else:
        group = stroke_groups(coords, targets, seed)
        folds = [group == 0, group == 1]
    return [f for f in folds if f.any() and _every_class(targets[~f], n_classes)]


def stroke_groups(coords: np.ndarray, targets: np.ndarray, seed: int = 0) -> np.ndarray:
    """Two groups (0 / 1 per voxel) of whole connected strokes, balanced per class; a
    class painted as one stroke is cut in two halves along its longest extent."""
    rng = np.random.default_rng(seed)
    group = np.zeros(len(coords), np.int8)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        comp = _components(coords[idx])
        n = int(comp.max()) + 1
        if n >= 2:
            sizes = np.bincount(comp)
            order = rng.permutation(n)
            # alternate the (shuffled) strokes between the groups, largest first, so both
            # get a share of the voxels
            order = order[np.argsort(-sizes[order], kind="stable")]
            side = np.zeros(n, np.int8)
            side[order[1::2]] = 1
            group[idx] = side[comp]
        else:
            pts = coords[idx]
            axis = int(np.argmax(pts.max(0) - pts.min(0)))
            group[idx] = (pts[:, axis] > np.median(pts[:, axis])).astype(np.int8)
    return group


def _components(pts: np.ndarray) -> np.ndarray:
    lo = pts.min(0)
    mask = np.zeros(tuple(int(v) for v in pts.max(0) - lo + 1), bool)
    mask[tuple((pts - lo).T)] = True
    labels, _ = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    return labels[tuple((pts - lo).T)] - 1


def _every_class(targets: np.ndarray, n_classes: int) -> bool:
    return len(np.unique(targets)) == n_classes


def balanced_accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes present in ``targets`` of the fraction of their voxels whose
    most probable class (``probs`` (N, n_out)) is right."""
    pred = np.argmax(probs, 1)
    return float(np.mean([np.mean(pred[targets == c] == c) for c in np.unique(targets)]))


def forest_samples(targets: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` voxels, drawn evenly from every class."""
    if len(targets) <= limit:
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    share = limit // len(classes)
    keep = []
    for c in classes:
        idx = np.flatnonzero(targets == c)
        keep.append(idx if len(idx) <= share else rng.choice(idx, share, replace=False))
    return np.sort(np.concatenate(keep))


def fit_candidate(name: str, config: Any, samples: np.ndarray, targets: np.ndarray,
                  n_out: int, device: torch.device, *, start: VoxelHead | None = None,
                  steps: int | None = None, ctx: Any = None) -> tuple[Any, FitReport]:
    """Train candidate ``name`` on ``samples`` (N, C): the features it reads (the
    caller slices the filter channels for "filters" and "forest")."""
    if name == "forest":
        keep = forest_samples(targets, FOREST_SAMPLES, config.seed)
        head = ForestHead(samples.shape[1], n_out, n_estimators=config.forest_trees,
                          seed=config.seed).fit(samples[keep], targets[keep])
        return head, FitReport()
    return fit_head(config, samples, targets, n_out, start, device, ctx, steps=steps)


def choose_candidate(config: Any, samples: np.ndarray, targets: np.ndarray, coords: np.ndarray,
                     n_out: int, n_foundation: int, device: torch.device, ctx: Any = None
                     ) -> tuple[str, dict[str, float]]:
    """Validate every candidate on held-out strokes; returns (winner, {name: balanced
    accuracy}). ``samples`` (N, C) are all features, the filters the last
    ``C - n_foundation`` channels. Without a foundation channel, or when the strokes
    cannot be split, the choice falls back to "filters" / "foundation" unvalidated
    (empty scores). A Stop ends the validation early (the scores so far decide)."""
    names = [n for n in CANDIDATES if n_foundation > 0 or n != "foundation"]
    folds = stroke_folds(coords, targets, config.seed)
    if not folds:
        return ("foundation" if n_foundation > 0 else "filters"), {}
    steps = max(20, config.n_steps // 3)
    quiet = span(ctx, 0.0, 1.0, values=False)  # the live loss curve is the final fit's
    scores: dict[str, float] = {}
    n_jobs = len(names) * len(folds)
    try:
        for i, name in enumerate(names):
            x = samples if name == "foundation" else samples[:, n_foundation:]
            got = []
            for j, held in enumerate(folds):
                part = span(quiet, (i * len(folds) + j) / n_jobs,
                            (i * len(folds) + j + 1) / n_jobs)
                model, report = fit_candidate(name, config, x[~held], targets[~held], n_out,
                                              device, steps=steps, ctx=part)
                got.append(balanced_accuracy(
                    head_probabilities_flat(model, x[held], device), targets[held]))
                if report.stopped:
                    raise Cancelled()
            scores[name] = round(float(np.mean(got)), 4)
    except Cancelled:
        if not scores:
            raise
    mlp = [scores[n] for n in scores if n != "forest"]
    if getattr(config, "refine", "none") != "none" and mlp and "forest" in scores \
            and scores["forest"] <= max(mlp) + FOREST_MARGIN:
        scores_mlp = {n: v for n, v in scores.items() if n != "forest"}
        best = max(scores_mlp.values())
        near = [n for n in PREFERENCE if n in scores_mlp and scores_mlp[n] >= best - TIE]
        return near[0], scores
    best = max(scores.values())
    near = [n for n in PREFERENCE if n in scores and scores[n] >= best - TIE]
    return near[0], scores


def fit_quick(seg: Any, image: Any, sparse: Any, irange: tuple[float, float],
              ctx: Any = None) -> FitReport:
    """The quick fit of ``seg`` (a :class:`~.segmenter.Segmenter`): measure the object
    scale, compute the features (cached), choose the candidate, refit it on every stroke
    and make it the model. The report says which candidate won and why."""
    cfg, device = seg.config, seg.foundation.device
    scale = object_scale(cfg, sparse.coords, sparse.values, image.shape)
    classes = sparse.classes
    targets, n_out = sparse.targets(classes), len(classes) + 1
    found = bool(cfg.feature_levels) and cfg.candidate in ("auto", "foundation")
    filters = QuickFeatures(seg.foundation, cfg, levels=(), sigmas=scale["sigmas"])
    source = (QuickFeatures(seg.foundation, cfg, sigmas=scale["sigmas"], zoom=scale["zoom"])
              if found else filters)
    was_cached = seg.is_cached(image, source)
    feat_end = 0.0 if was_cached else 0.6
    samples = seg.stroke_features(image, source, sparse, irange, span(ctx, 0.0, feat_end))
    n_found = source.foundation_channels
    scores: dict[str, float] = {}
    if cfg.candidate == "auto":
        fit_start = feat_end + (1.0 - feat_end) * 0.5
        winner, scores = choose_candidate(cfg, samples, targets, sparse.coords, n_out, n_found,
                                          device, span(ctx, feat_end, fit_start))
    else:
        fit_start = feat_end
        winner = cfg.candidate if (found or cfg.candidate != "foundation") else "filters"
    x = samples if winner == "foundation" else samples[:, n_found:]
    same = seg.candidate == winner and seg.classes == classes
    start = seg.head if cfg.warm_start and same and isinstance(seg.head, VoxelHead) else None
    model, report = fit_candidate(winner, cfg, x, targets, n_out, device, start=start,
                                  ctx=span(ctx, fit_start, 1.0))
    if winner == "forest":  # no steps: its loss on the strokes, as the MLP reports
        p = np.clip(model.probabilities(x)[np.arange(len(x)), targets], 1e-6, 1.0)
        report.update(best_loss=float(-np.log(p).mean()))
    feats = filters if winner != "foundation" else source
    train_prior = stroke_prior(targets, n_out, class_weights(cfg, targets, n_out).numpy())

    def volume_probs():
        # stopped: the user waits, so the mix comes from a tenth of the voxels
        where = volume_sample(image.shape, sparse.coords, seg.is_cached(image, source),
                              cfg.seed, VOLUME_SAMPLES // (10 if report.stopped else 1))
        got = seg.stroke_features(image, source, where, irange)
        return head_probabilities_flat(model, got if winner == "foundation"
                                       else got[:, n_found:], device)

    shift = shift_for(winner, cfg.refine, volume_probs,
                      lambda: head_probabilities_flat(model, x, device), targets, train_prior)
    seg.use_quick_model(classes, model, feats, winner, companion=source, refinement=shift)
    folds = len(stroke_folds(sparse.coords, targets, cfg.seed)) if scores else 0
    return report.update(
        candidate=winner, validation=scores,
        validation_metric=f"balanced accuracy on held-out strokes ({folds} folds)"
        if scores else "none (candidate given, or strokes too few to hold any out)",
        object_diameter_um=scale["diameter_um"], object_diameter_voxels=scale["diameter"],
        diameter_source=scale["source"], sigmas=scale["sigmas"],
        scale_factor=scale["zoom"] if winner == "foundation" else 1.0,
        refine=shift.record(),
    )
