"""Shared pieces of the few-shot benchmarks: held-out volumes, simulated brush strokes,
metrics (foreground Dice, per-object F1 at IoU 0.5) and one timed run of a method."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_lsmfm.synth import make_volume
from napari_lsmfm.tasks.instance_metrics import object_f1

# A seed no training run uses (the pretraining corpus derives its own from its seed).
HELD_OUT_SEED = 9001


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def held_out(kind: str, shape=(48, 128, 128), seed: int = HELD_OUT_SEED):
    """A synthetic volume with a seed no training run used."""
    return make_volume(kind, shape=shape, seed=seed)


def brush(truth: np.ndarray, n_slices: int, seed: int = 0) -> np.ndarray:
    """Simulated strokes on ``n_slices`` evenly spaced z planes.

    On each plane: the structure eroded by one pixel (strokes stay inside objects) as
    class 2, and 10 % of the background farther than 2 pixels from any structure as
    class 1 (scribbles do not hug the borders). 0 elsewhere (not annotated).
    """
    rng = np.random.default_rng(seed)
    brushes = np.zeros(truth.shape, np.uint8)
    planes = np.linspace(0, truth.shape[0] - 1, n_slices + 2)[1:-1].round().astype(int)
    for z in planes:
        fg = truth[z] > 0
        inner = ndi.binary_erosion(fg, iterations=1)
        far = ~ndi.binary_dilation(fg, iterations=2)
        brushes[z][far & (rng.random(fg.shape) < 0.10)] = 1
        brushes[z][inner] = 2
    return brushes


def brush_lines(truth: np.ndarray, n_slices: int = 2, seed: int = 0, n_lines: int = 8,
                offset: int = 0) -> np.ndarray:
    """Strokes as a user paints them (issue 14) on ``n_slices`` evenly spaced z planes
    (shifted by ``offset`` planes) among those where some object's interior shows: every
    object's interior eroded by one pixel as class 2, and ``n_lines`` thin straight
    background lines across the plane (kept where they are farther than 2 pixels from
    any structure) as class 1."""
    rng = np.random.default_rng(seed)
    brushes = np.zeros(truth.shape, np.uint8)
    shown = [z for z in range(truth.shape[0])
             if ndi.binary_erosion(truth[z] > 0, iterations=1).any()]
    pick = np.linspace(0, len(shown) - 1, n_slices + 2)[1:-1].round().astype(int)
    planes = [shown[int(np.clip(i + offset, 0, len(shown) - 1))] for i in pick]
    h, w = truth.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    for z in planes:
        fg = truth[z] > 0
        far = ~ndi.binary_dilation(fg, iterations=2)
        lines = np.zeros(fg.shape, bool)
        for _ in range(n_lines):
            angle = rng.uniform(0, np.pi)
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            dist = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
            lines |= dist < 0.5
        brushes[z][lines & far] = 1
        brushes[z][ndi.binary_erosion(fg, iterations=1)] = 2
    return brushes


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred.astype(bool), truth.astype(bool)
    denom = pred.sum() + truth.sum()
    return float(2 * np.logical_and(pred, truth).sum() / denom) if denom else 1.0


def as_instances(mask: np.ndarray, label_kind: str, voxel_size) -> np.ndarray:
    """Objects of a predicted mask: split touching blobs for instance kinds, connected
    components for semantic (tubular) kinds."""
    from napari_lsmfm.tasks import split_instances

    if label_kind == "instance":
        return split_instances(mask, voxel_size=voxel_size)
    return ndi.label(mask)[0]


@dataclass
class Score:
    dice: float
    f1: float
    train_s: float
    predict_s: float


def evaluate(method, vol, n_slices: int, variants=None) -> Score | dict[str, Score]:
    """Train ``method`` (an object with fit(image, brushes) and predict(image) -> result
    with .classes) on simulated strokes, score it on the whole volume.

    ``variants``: {name: fn(method)}: after the main prediction, each fn changes the
    trained method (say, a prediction setting) and it predicts again; then a dict
    {"": main score, name: score, ...} is returned (training time shared)."""
    brushes = brush(vol.labels, n_slices)
    t0 = time.perf_counter()
    method.fit(vol.image, brushes)
    train_s = time.perf_counter() - t0
    main = _score(method, vol, train_s)
    if variants is None:
        return main
    out = {"": main}
    for name, change in variants.items():
        change(method)
        out[name] = _score(method, vol, train_s)
    return out


def _score(method, vol, train_s: float) -> Score:
    t0 = time.perf_counter()
    result = method.predict(vol.image)
    predict_s = time.perf_counter() - t0
    mask = np.asarray(result.classes) == 2
    truth_objects = vol.labels if vol.label_kind == "instance" else ndi.label(vol.labels > 0)[0]
    f1 = object_f1(as_instances(mask, vol.label_kind, vol.voxel_size), truth_objects)
    return Score(dice(mask, vol.labels > 0), f1, train_s, predict_s)


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
