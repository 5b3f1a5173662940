"""Few-shot segmentation from a few brushed slices (no Qt).

Brush convention (a napari Labels layer of the image's shape): 0 = not annotated,
1 = background, 2, 3, ... = structure classes. The prediction keeps each class's
value and turns background into 0, so colours match between brush and result.

Two modes, one :class:`Segmenter`:

- quick (default, CPU-friendly): the frozen foundation's dense features, plus the
  normalised intensity and a few classical filters (Gaussian, gradient magnitude,
  difference of Gaussians, Hessian eigenvalues; sigmas scaled by the voxel size so
  anisotropic axes are respected), are computed once per volume with the tiled
  engine and cached as float16. A per-voxel MLP (:class:`~.heads.VoxelHead`) is
  trained on the brushed voxels only (cross-entropy, every voxel counting the same), which takes
  seconds, so it can be retrained live as strokes come in.
- full: starts where quick mode ends and finetunes the backbone. A quick fit gives the
  per-voxel head; the network is then a copy of the backbone whose dense features,
  with the same classical filters, feed that head, so at step 0 it predicts exactly what
  quick mode predicts. It is finetuned on patches centred on brushed voxels, with flips
  and in-plane (YX) 90 degree rotations (no rotation mixes the anisotropic z axis);
  intensity jitter is opt-in (``augment="all"``): within one volume brightness is a cue
  (faint puncta against a plaque's dim halo), and jitter taught the network to ignore
  it (benchmarks/README.md). Loss: cross-entropy with ``ignore_index`` (plus MONAI's
  ``MaskedDiceLoss`` when ``dice_weight`` > 0), counting annotated voxels only. The
  encoder is frozen for the first ``freeze_steps``, then trained at
  ``encoder_lr_scale`` x the learning rate (the published recipe); batch-norm statistics
  stay frozen. The best weights by the loss on a fixed, unaugmented set of patches
  around the strokes are kept, the quick starting point included.

Prediction runs over the whole volume window by window (:mod:`napari_lsmfm.inference`),
reading a dask / zarr input a block at a time and writing numpy or zarr outputs, so a
volume larger than memory works. Outputs: class map (uint8 / uint16), per-class
probabilities (float32 / float16 / uint8 scaled to 255), an uncertainty map
(normalised entropy in [0, 1]: where another stroke would help most) and, on
request, instance labels for blob-like classes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_lsmfm.engine.jobs import Cancelled, span
from napari_lsmfm.engine.store import (
    check_foundation,
    foundation_record,
    load_task_model,
    save_task_model,
)
from napari_lsmfm.engine.tiled import (
    DEFAULT_TILE,
    DeviceMemoryError,
    predict_points,
    predict_tiled,
)

from .filters import filter_bank, n_channels
from .heads import VoxelHead
from .instances import split_instances

__all__ = [
    "SegmentConfig",
    "SegmentationResult",
    "Segmenter",
    "SparseLabels",
    "check_image",
    "segment",
]

MODES = ("quick", "full")
AUGMENTS = ("geometric", "all", "none")
MAX_CLASSES = 64
BACKGROUND = 1
_AXES = "zyx"


# ------------------------------------------------------------------------- inputs


def check_image(image: Any) -> tuple[int, int, int]:
    """Raise ValueError unless ``image`` is a single-channel (Z, Y, X) volume; returns its shape."""
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) == 2:
        raise ValueError(
            f"the image is 2D {shape}; segmentation needs a 3D stack (Z, Y, X). Open the whole "
            "stack, not a single plane"
        )
    if len(shape) != 3:
        raise ValueError(
            f"the image has {len(shape)} axes {shape}; segmentation needs one channel of a 3D "
            "stack (Z, Y, X). Pick one channel (and one time point) first, e.g. image[0]"
        )
    if min(shape) < 1:
        raise ValueError(f"the image is empty (shape {shape})")
    dtype = np.dtype(getattr(image, "dtype", np.float32))
    if dtype.kind not in "uif":
        raise ValueError(f"the image must hold numbers, not {dtype}")
    return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class SparseLabels:
    """Validated brush strokes: the annotated voxels and their values.

    coords: (N, 3) int64 z, y, x of every annotated voxel; values: (N,) their brush
    values (1 = background, 2, 3, ... = classes); image_shape: (Z, Y, X).
    """

    coords: np.ndarray
    values: np.ndarray
    image_shape: tuple[int, int, int]

    @classmethod
    def from_array(cls, brushes: Any, image_shape: Sequence[int]) -> SparseLabels:
        """Read a brushes array (numpy, dask or zarr, the image's shape) and check it.

        Raises ValueError with what to do when: the shapes differ (strokes outside the
        image), values are not non-negative integers, nothing is painted, background (1)
        or every structure class (2, 3, ...) is missing.
        """
        image_shape = tuple(int(s) for s in image_shape)
        shape = tuple(int(s) for s in getattr(brushes, "shape", ()))
        if shape != image_shape:
            extra = ""
            if len(shape) == len(image_shape) and len(shape) == 3:
                outside = _count_outside(brushes, image_shape)
                if outside:
                    extra = f"; {outside} painted voxels lie outside the image"
            raise ValueError(
                f"the labels have shape {shape} but the image {image_shape}{extra}. Paint in a "
                "Labels layer made for this image (same shape, same scale)"
            )
        dtype = np.dtype(getattr(brushes, "dtype", np.int64))
        if dtype.kind == "b":
            raise ValueError(
                "the labels are a yes/no mask; paint background with 1 and each structure "
                "with 2, 3, ... (0 = not annotated)"
            )
        if dtype.kind not in "iuf":
            raise ValueError(f"the labels must be integers, got {dtype}")
        coords, values = [], []
        for z0, _z1, slab in _slabs(brushes):
            if dtype.kind == "f":
                if not np.isfinite(slab).all() or (slab != np.round(slab)).any():
                    raise ValueError(
                        "the labels hold fractions or NaN; they must be integers "
                        "(0 = not annotated, 1 = background, 2, 3, ... = classes)"
                    )
            if (slab < 0).any():
                raise ValueError(
                    "the labels hold negative values; use 0 = not annotated, 1 = background, "
                    "2, 3, ... = classes"
                )
            nz = np.nonzero(slab)
            if len(nz[0]):
                coords.append(np.stack(nz, 1).astype(np.int64) + [z0, 0, 0])
                values.append(slab[nz].astype(np.int64))
        if not coords:
            raise ValueError(
                "no strokes: paint a few slices first, background with label 1 and each "
                "structure with 2, 3, ..."
            )
        return cls._checked(np.concatenate(coords), np.concatenate(values), image_shape)

    @classmethod
    def from_points(
        cls, coords: Any, values: Any, image_shape: Sequence[int]
    ) -> SparseLabels:
        """Strokes as voxel coordinates (N, 3) z, y, x and values (N,); checked like from_array."""
        image_shape = tuple(int(s) for s in image_shape)
        coords = np.asarray(coords).reshape(-1, 3)
        values = np.asarray(values).reshape(-1)
        if len(coords) != len(values):
            raise ValueError(f"{len(coords)} coordinates but {len(values)} values")
        if len(coords) == 0:
            raise ValueError(
                "no strokes: paint a few slices first, background with label 1 and each "
                "structure with 2, 3, ..."
            )
        if not np.issubdtype(coords.dtype, np.integer):
            if (coords != np.round(coords)).any():
                raise ValueError("stroke coordinates must be whole voxels")
            coords = np.round(coords)
        coords = coords.astype(np.int64)
        outside = ((coords < 0) | (coords >= np.asarray(image_shape))).any(1)
        if outside.any():
            raise ValueError(
                f"{int(outside.sum())} painted voxels lie outside the image of shape "
                f"{image_shape}; paint inside the image"
            )
        if (values < 0).any() or (values != np.round(values)).any():
            raise ValueError(
                "stroke values must be integers >= 0 (0 = not annotated, 1 = background, "
                "2, 3, ... = classes)"
            )
        keep = values > 0
        return cls._checked(coords[keep], values[keep].astype(np.int64), image_shape)

    @classmethod
    def _checked(cls, coords: np.ndarray, values: np.ndarray, shape) -> SparseLabels:
        present = np.unique(values)
        classes = present[present >= 2]
        if len(present) == 0:
            raise ValueError(
                "no strokes: paint a few slices first, background with label 1 and each "
                "structure with 2, 3, ..."
            )
        if BACKGROUND not in present:
            raise ValueError(
                f"only structure strokes ({', '.join(map(str, classes))}) and no background: "
                "paint some background with label 1 too, so the model learns what to leave out"
            )
        if len(classes) == 0:
            raise ValueError(
                "only background (label 1) is painted, one class is not enough: paint the "
                "structure with label 2 (and further classes with 3, 4, ...)"
            )
        if len(classes) > MAX_CLASSES:
            raise ValueError(
                f"{len(classes)} different label values: brushes use one value per class "
                f"(at most {MAX_CLASSES}); this looks like an instance image, not brush strokes"
            )
        return cls(coords, values, shape)

    @property
    def classes(self) -> tuple[int, ...]:
        """The structure classes painted (values >= 2), sorted."""
        return tuple(int(v) for v in np.unique(self.values) if v >= 2)

    @property
    def n_annotated(self) -> int:
        return int(len(self.values))

    @property
    def counts(self) -> dict[int, int]:
        """Annotated voxels per brush value."""
        vals, n = np.unique(self.values, return_counts=True)
        return {int(v): int(c) for v, c in zip(vals, n, strict=True)}

    @property
    def slices_used(self) -> tuple[str, tuple[int, ...]]:
        """The axis ("z", "y" or "x") whose planes hold the strokes most compactly, and
        those plane indices, e.g. ("z", (10, 24, 38)) for three painted z-slices."""
        best = None
        for a in range(3):
            planes = tuple(int(v) for v in np.unique(self.coords[:, a]))
            if best is None or len(planes) < len(best[1]):
                best = (_AXES[a], planes)
        return best  # type: ignore[return-value]

    def targets(self, classes: Sequence[int]) -> np.ndarray:
        """Class index per annotated voxel: 0 for background, i for ``classes[i - 1]``;
        -1 for values not in ``classes``."""
        lut = {BACKGROUND: 0, **{int(c): i + 1 for i, c in enumerate(classes)}}
        present, inverse = np.unique(self.values, return_inverse=True)
        return np.array([lut.get(int(v), -1) for v in present], np.int64)[inverse]

    def subsample(self, n: int, seed: int = 0) -> SparseLabels:
        """At most ``n`` annotated voxels, drawn evenly from every value (a rare class
        keeps all its voxels); the same strokes when there are fewer."""
        if self.n_annotated <= n:
            return self
        rng = np.random.default_rng(seed)
        values, counts = np.unique(self.values, return_counts=True)
        quota = _fair_quota(counts, n)
        keep = [rng.choice(np.flatnonzero(self.values == v), q, replace=False)
                for v, q in zip(values, quota, strict=True)]
        idx = np.sort(np.concatenate(keep))
        return SparseLabels(self.coords[idx], self.values[idx], self.image_shape)

    def summary(self) -> str:
        axis, planes = self.slices_used
        counts = ", ".join(f"{v}: {n}" for v, n in self.counts.items())
        return (
            f"{self.n_annotated} annotated voxels on {len(planes)} {axis}-slices "
            f"(value: voxels {counts})"
        )


def _fair_quota(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` among groups of ``counts``: equal shares, the leftover of a small
    group going to the larger ones (water filling)."""
    quota = np.zeros(len(counts), np.int64)
    left = int(n)
    order = list(np.argsort(counts))
    while order:
        share = left // len(order)
        i = order[0]
        if counts[i] <= share:  # the smallest group fits whole
            quota[i] = counts[i]
            left -= int(counts[i])
            order.pop(0)
            continue
        quota[order] = share
        break
    return quota


def _slabs(array: Any, max_bytes: int = 64 * 2**20):
    """Yield (z0, z1, numpy slab) of a (Z, Y, X) numpy, dask or zarr array."""
    if isinstance(array, np.ndarray):
        yield 0, array.shape[0], array
        return
    plane = max(1, int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize)
    step = max(1, max_bytes // plane)
    for z0 in range(0, array.shape[0], step):
        z1 = min(z0 + step, array.shape[0])
        slab = array[z0:z1]
        slab = slab.compute() if hasattr(slab, "compute") else slab
        yield z0, z1, np.asarray(slab)


def _count_outside(brushes: Any, image_shape: Sequence[int]) -> int:
    total = 0
    for z0, _z1, slab in _slabs(brushes):
        nz = np.stack(np.nonzero(slab), 1) + [z0, 0, 0]
        total += int((nz >= np.asarray(image_shape)).any(1).sum())
    return total


# ------------------------------------------------------------------------- config


@dataclass
class SegmentConfig:
    """Settings of a :class:`Segmenter`; saved with the model.

    mode: "quick" (frozen features + per-voxel head) or "full" (finetune the backbone).
    steps / lr / batch_size: training steps, learning rate, and voxels (quick) or
        patches (full) per step; None picks the mode's default.
    patch_size: (z, y, x) training patches of the full mode.
    tile / overlap: prediction (and feature) windows in voxels and their overlap.
    feature_blend: how quick-mode feature windows are stitched ("gaussian" or "crop").
    feature_levels: which ``Foundation.features`` levels the quick mode uses (0 = the
        dense output; coarser levels are upsampled trilinearly).
    sigmas: classical filter scales in voxels along x (z scaled by the voxel size).
    voxel_size: (z, y, x) micrometres, for the anisotropy of filters, augmentations and
        instance splitting; None = isotropic.
    hidden / dropout / weight_decay: width of the head, dropout on its inputs (quick
        mode) and its L2 weight decay.
    decay_reference: the quick head's weight decay shrinks as the rarest brushed class
        grows beyond this many voxels (``weight_decay * min(1, decay_reference / n)``):
        a few strokes need a strong prior, many strokes speak for themselves. None or 0
        keeps ``weight_decay`` fixed.
    class_weights: None (every annotated voxel counts the same; measured best on the
        synthetic benchmarks), "balanced" (inverse frequency of the annotated voxels) or
        one weight per class (background first).
    freeze_steps: full mode steps with the encoder frozen (None = a third of the steps);
    encoder_lr_scale: the encoder's learning rate relative to ``lr`` afterwards.
    dice_weight: weight of the masked Dice loss in full mode.
    eval_every: steps between best-model checks.
    device: None = where the foundation is; else auto / cpu / cuda:N / mps (full mode).
    seed: random seed of sampling and initialisation.
    cache_bytes: memory for whole-volume feature caches (float16; the most recently used
        volumes are kept); a volume whose features exceed it is not cached: its features
        are computed at the strokes for training and per block for prediction.
    block_bytes: memory for one block of tiled prediction.
    warm_start: a new fit with the same classes continues from the current weights.
    augment: full-mode augmentations: "geometric" (flips, in-plane 90 degree turns),
        "all" (plus gain, offset and noise jitter) or "none"; True / False mean "all" /
        "none".
    max_samples: quick mode trains on at most this many annotated voxels (drawn evenly
        from every class), so densely painted volumes stay fast and within memory.
    quick_weight: full mode predicts a weighted mean of the finetuned network's
        probabilities and those of the quick model it started from (output ensembling,
        as in WiSE-FT): the quick model keeps what the frozen foundation knows where a
        few strokes pull the finetuned network astray. 0 = the finetuned network alone.
    """

    mode: str = "quick"
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    patch_size: tuple[int, int, int] = (32, 64, 64)
    tile: tuple[int, int, int] = DEFAULT_TILE
    overlap: float = 0.25
    feature_blend: str = "gaussian"
    feature_levels: tuple[int, ...] = (0,)
    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)
    voxel_size: tuple[float, float, float] | None = None
    hidden: int = 32
    dropout: float = 0.0
    weight_decay: float = 1e-2
    decay_reference: int | None = 500
    class_weights: Any = None
    freeze_steps: int | None = None
    encoder_lr_scale: float = 0.2
    dice_weight: float = 1.0
    eval_every: int = 10
    device: str | None = None
    seed: int = 0
    cache_bytes: int = 2 * 2**30
    block_bytes: int = 2**30
    warm_start: bool = True
    augment: str = "geometric"
    max_samples: int = 500_000
    quick_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'quick' or 'full', got {self.mode!r}")
        self.patch_size = _triple(self.patch_size, "patch_size")
        self.tile = _triple(self.tile, "tile")
        self.feature_levels = tuple(int(v) for v in self.feature_levels)
        self.sigmas = tuple(float(s) for s in self.sigmas)
        if self.voxel_size is not None:
            self.voxel_size = tuple(float(v) for v in self.voxel_size)  # type: ignore[assignment]
            if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
                raise ValueError(
                    f"voxel_size must be three positive numbers, got {self.voxel_size}"
                )
        if self.feature_blend not in ("gaussian", "crop"):
            raise ValueError(
                f"feature_blend must be 'gaussian' or 'crop', got {self.feature_blend!r}"
            )
        if isinstance(self.augment, bool):
            self.augment = "all" if self.augment else "none"
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        self.quick_weight = float(self.quick_weight)
        if not 0.0 <= self.quick_weight <= 1.0:
            raise ValueError(f"quick_weight must be in [0, 1], got {self.quick_weight}")

    @property
    def n_steps(self) -> int:
        return int(self.steps) if self.steps is not None else (300 if self.mode == "quick" else 200)

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else (3e-3 if self.mode == "quick" else 3e-4)

    @property
    def batch(self) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        return 4096 if self.mode == "quick" else 2

    def to_dict(self) -> dict:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    if isinstance(value, int | np.integer):
        value = (int(value),) * 3
    value = tuple(int(v) for v in value)
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"{name} must be three positive sizes (z, y, x), got {value}")
    return value  # type: ignore[return-value]


# ------------------------------------------------------------------------- result


@dataclass
class SegmentationResult:
    """What a prediction returns (arrays cover ``region`` of the image, all of it by default).

    classes: (Z, Y, X) uint8 / uint16 with the brushed class values, background 0.
    probabilities: (C, Z, Y, X) per-class probabilities (float32, float16, or uint8 where
        255 = 1), channel i for ``channel_values[i]`` (channel 0 = background); or None.
    uncertainty: (Z, Y, X) float32 normalised entropy in [0, 1]; or None.
    instances: (Z, Y, X) uint32 object ids for the classes asked for; or None.
    """

    classes: Any
    probabilities: Any = None
    uncertainty: Any = None
    instances: Any = None
    channel_values: tuple[int, ...] = ()
    region: tuple[slice, ...] | None = None
    stats: dict = field(default_factory=dict)

    def suggest_slices(self, axis: int = 0, n: int = 1) -> list[int]:
        """Indices of the ``n`` planes along ``axis`` with the highest mean uncertainty:
        where another stroke would help most (relative to ``region``)."""
        if self.uncertainty is None:
            raise ValueError("this result has no uncertainty map")
        u = np.asarray(self.uncertainty, np.float32)
        means = u.mean(axis=tuple(a for a in range(3) if a != axis))
        return [int(i) for i in np.argsort(-means, kind="stable")[:n]]


# ----------------------------------------------------------------------- features


class QuickFeatures:
    """Per-window quick-mode features: foundation levels + intensity + classical filters."""

    def __init__(self, foundation: Any, config: SegmentConfig) -> None:
        self.foundation = foundation
        self.levels = tuple(config.feature_levels)
        self.sigmas = tuple(config.sigmas)
        self.spacing = tuple(config.voxel_size) if config.voxel_size else (1.0, 1.0, 1.0)
        chans = list(foundation.feature_channels)
        bad = [lv for lv in self.levels if not 0 <= lv < len(chans)]
        if bad:
            raise ValueError(
                f"feature_levels {bad} do not exist; this foundation has 0..{len(chans) - 1}"
            )
        self.channels = sum(chans[lv] for lv in self.levels) + n_channels(self.sigmas)

    def settings(self) -> dict:
        return {"levels": list(self.levels), "sigmas": list(self.sigmas),
                "spacing": list(self.spacing), "channels": self.channels}

    def window_fn(self, intensity_range: tuple[float, float]):
        """fn(windows (B, 1, z, y, x) raw float32) -> features (B, C, z, y, x) torch."""
        lo, hi = intensity_range
        scale = 1.0 / (hi - lo) if hi > lo else 0.0

        def fn(windows: np.ndarray) -> torch.Tensor:
            if not np.isfinite(windows).all():
                raise ValueError(
                    "the image contains NaN or infinite voxels; replace them (e.g. "
                    "numpy.nan_to_num) before segmenting"
                )
            x = torch.from_numpy(np.clip((windows - lo) * scale, 0.0, 1.0).astype(np.float32))
            x = x.to(self.foundation.device)
            with torch.inference_mode():
                parts = []
                if self.levels == (0,):
                    parts.append(self.foundation(x))
                elif self.levels:
                    levels = self.foundation.features(x)
                    for lv in self.levels:
                        f = levels[lv]
                        if f.shape[2:] != x.shape[2:]:
                            f = F.interpolate(f, size=x.shape[2:], mode="trilinear",
                                              align_corners=False)
                        parts.append(f)
                parts.append(filter_bank(x, self.sigmas, self.spacing))
                return torch.cat(parts, 1)

        return fn


def _image_key(image: Any) -> tuple:
    """Identify an image for the feature cache: content hash for numpy, graph name for dask."""
    shape = tuple(image.shape)
    name = getattr(image, "name", None)
    if isinstance(name, str) and hasattr(image, "dask"):
        return ("dask", name, shape)
    if isinstance(image, np.ndarray):
        data = image if image.nbytes <= 2**30 else image[:: max(1, image.shape[0] // 64)]
        digest = hashlib.blake2b(np.ascontiguousarray(data).view(np.uint8), digest_size=16)
        return ("numpy", digest.hexdigest(), shape, str(image.dtype))
    return ("object", id(image), shape)


# ------------------------------------------------------------------------ context


@contextlib.contextmanager
def _cpu_threads(device: torch.device, n: int):
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


# ------------------------------------------------------------------------ full mode


_UNET_DECODER = re.compile(r"^model\.(1\.submodule\.)*2\.")


def _is_encoder(name: str, architecture: str) -> bool:
    """Encoder parameters of a backbone (frozen first in full mode)."""
    if architecture == "swinunetr":
        return name.startswith("swinViT.")
    return not _UNET_DECODER.match(name)


class _FullNet(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # fixed filters: no gradient to compute
            filters = filter_bank(x, self.sigmas, self.spacing)
        z = torch.cat([self.foundation(x), filters.to(x.dtype)], 1)
        flat = z.movedim(1, -1).reshape(-1, z.shape[1])
        logits = self.head(flat.float())
        return logits.reshape(*z.shape[:1], *z.shape[2:], -1).movedim(-1, 1)

    def settings(self) -> dict:
        return {"sigmas": list(self.sigmas), "spacing": list(self.spacing)}

    def to_device(self, device: str | torch.device) -> _FullNet:
        """Move the backbone (and its mixed precision setting) and the head to ``device``."""
        self.foundation.to_device(device)
        return self.to(self.foundation.device)


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _PatchSampler:
    """Training patches centred (with jitter) on annotated voxels, class-balanced."""

    def __init__(self, image: Any, intensity_range, sparse: SparseLabels, targets: np.ndarray,
                 patch: Sequence[int], rng: np.random.Generator, augment: str) -> None:
        self.image = image
        self.lo, self.hi = intensity_range
        self.shape = np.asarray(image.shape)
        self.patch = np.minimum(np.asarray(patch), self.shape)
        self.coords = sparse.coords
        self.targets = targets
        self.by_class = [np.flatnonzero(targets == k) for k in range(int(targets.max()) + 1)]
        self.by_class = [ix for ix in self.by_class if len(ix)]
        self.rng = rng
        self.augment = augment
        self._dense = isinstance(image, np.ndarray)

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
            scale = 1.0 / (self.hi - self.lo) if self.hi > self.lo else 0.0
            img = np.clip((raw - self.lo) * scale, 0, 1).astype(np.float32)
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


# ------------------------------------------------------------------------ segmenter


class Segmenter:
    """A trainable segmentation model on a foundation: the unit that is fitted, used and saved.

    >>> seg = Segmenter(foundation)                 # quick mode
    >>> seg.fit(image, brushes)                     # seconds once the features are cached
    >>> result = seg.predict(image)                 # SegmentationResult
    >>> seg.save("nuclei_model"); Segmenter.load("nuclei_model", foundation)
    """

    def __init__(self, foundation: Any, config: SegmentConfig | None = None, **overrides: Any):
        if config is None:
            config = SegmentConfig(**overrides)
        elif overrides:
            config = SegmentConfig.from_dict({**config.to_dict(), **overrides})
        self.foundation = foundation
        self.config = config
        self.classes: tuple[int, ...] = ()
        self.head: VoxelHead | None = None
        self.net: _FullNet | None = None
        # full mode: the quick model the finetuning started from (frozen foundation copy
        # and quick head), averaged into predictions with weight ``config.quick_weight``
        self.anchor: _FullNet | None = None
        self.history: list[float] = []
        self.best_loss: float | None = None
        self._cache: dict[tuple, dict] = {}
        self._ranges: dict[tuple, tuple[float, float]] = {}
        self._features = QuickFeatures(foundation, config) if config.mode == "quick" else None
        self._quick: Segmenter | None = None  # full mode: the quick fit it starts from

    # --------------------------------------------------------------- properties

    @property
    def trained(self) -> bool:
        return bool(self.classes) and (self.head is not None or self.net is not None)

    @property
    def channel_values(self) -> tuple[int, ...]:
        """Output value of each probability channel: background 0, then the classes."""
        return (0, *self.classes)

    @property
    def device(self) -> torch.device:
        if self.net is not None:
            return next(self.net.parameters()).device
        return self.foundation.device

    def clear_cache(self) -> None:
        """Forget cached features and intensity ranges (frees memory)."""
        self._cache.clear()
        self._ranges.clear()

    def _intensity_range(self, image: Any, key: tuple) -> tuple[float, float]:
        if key not in self._ranges:
            self._ranges.clear()
            self._ranges[key] = self.foundation.intensity_range(image)
        return self._ranges[key]

    # -------------------------------------------------------------------- fit

    def fit(self, image: Any, brushes: Any, ctx: Any = None) -> dict:
        """Train on brushed voxels of ``image``.

        Args:
            image: (Z, Y, X) numpy, dask or zarr volume (any real dtype).
            brushes: (Z, Y, X) integer array (0 = none, 1 = background, 2, 3, ... =
                classes) or a :class:`SparseLabels`.
            ctx: JobContext: progress with values step=, loss=, best_loss= per step.

        Returns:
            dict(history=[loss per step], best_loss, steps_done, stopped, seconds,
            n_annotated, classes). When the job is cancelled during training, the best
            weights so far are restored and ``stopped=True`` is returned (no exception),
            so the model can predict at once; cancelled before any training step, the
            previous model is kept and ``Cancelled`` propagates.
        """
        t0 = time.perf_counter()
        check_image(image)
        sparse = brushes if isinstance(brushes, SparseLabels) else SparseLabels.from_array(
            brushes, image.shape
        )
        if tuple(sparse.image_shape) != tuple(image.shape):
            raise ValueError(
                f"the strokes were made for shape {sparse.image_shape}, the image is {image.shape}"
            )
        key = _image_key(image)
        irange = self._intensity_range(image, key)
        if self.config.mode == "quick":
            sparse = sparse.subsample(self.config.max_samples, self.config.seed)
            out = self._fit_quick(image, sparse, key, irange, ctx)
        else:
            out = self._fit_full(image, sparse, irange, ctx)
        out.update(seconds=time.perf_counter() - t0, n_annotated=sparse.n_annotated,
                   classes=list(self.classes))
        return out

    def _feature_key(self, key: tuple) -> tuple:
        from napari_lsmfm.engine.store import foundation_fingerprint

        settings = self._features.settings()
        return (key, foundation_fingerprint(self.foundation), repr(settings),
                self.config.tile, self.config.overlap, self.config.feature_blend)

    def _feature_fn(self, irange):
        return self._features.window_fn(irange)

    def features(self, image: Any, ctx: Any = None) -> np.ndarray | None:
        """The whole-volume quick-mode features (C, Z, Y, X) float16, computed once and
        cached; None when they would exceed ``config.cache_bytes``."""
        if self._features is None:
            raise ValueError("features are cached in quick mode only")
        key = _image_key(image)
        fkey = self._feature_key(key)
        entry = self._cache.pop(fkey, None)
        if entry is not None:
            self._cache[fkey] = entry  # most recently used last
            return entry["features"]
        nbytes = 2 * self._features.channels * math.prod(image.shape)
        if nbytes > self.config.cache_bytes:
            return None
        # keep the most recent volumes within cache_bytes (least recently used go first)
        while self._cache and nbytes + sum(e["features"].nbytes for e in self._cache.values()
                                           ) > self.config.cache_bytes:
            self._cache.pop(next(iter(self._cache)))
        irange = self._intensity_range(image, key)
        feats = self._run_tiled(
            self._feature_fn(irange), image, self._features.channels,
            blend=self.config.feature_blend, dtype=np.float16, ctx=ctx, message="features",
        )
        self._cache[fkey] = {"features": feats}
        return feats

    def _fit_quick(self, image, sparse: SparseLabels, key, irange, ctx) -> dict:
        cfg = self.config
        was_cached = self._feature_key(key) in self._cache
        cached = self.features(image, span(ctx, 0.0, 0.8))
        if cached is not None:
            z, y, x = sparse.coords.T
            samples = np.asarray(cached[:, z, y, x].T, np.float32)
        else:
            samples = self._with_memory_fallback(
                lambda tile: predict_points(
                    self._feature_fn(irange), image, sparse.coords,
                    out_channels=self._features.channels, tile=tile, overlap=cfg.overlap,
                    blend=cfg.feature_blend, ctx=span(ctx, 0.0, 0.8), message="features",
                ),
                ctx,
            )
        train_ctx = span(ctx, 0.0 if was_cached else 0.8, 1.0)
        classes = sparse.classes
        targets = sparse.targets(classes)
        X = torch.from_numpy(samples).to(self.foundation.device)
        Y = torch.from_numpy(targets).to(self.foundation.device)
        n_out = len(classes) + 1
        torch.manual_seed(cfg.seed)
        if not (cfg.warm_start and self.head is not None and self.classes == classes
                and self.head.in_channels == X.shape[1]):
            head = VoxelHead(X.shape[1], n_out, hidden=cfg.hidden, dropout=cfg.dropout)
            head.set_standardization(X.float())
        else:
            head = copy.deepcopy(self.head)
        head.to(X.device)
        weights = self._class_weights(targets, n_out).to(X.device)
        rng = np.random.default_rng(cfg.seed)
        n = len(X)
        eval_idx = torch.from_numpy(
            rng.choice(n, size=min(n, 65536), replace=False)
        ).to(X.device)
        opt = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate,
                               weight_decay=self._head_decay(targets, n_out))
        steps = cfg.n_steps
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=steps, eta_min=0.1 * cfg.learning_rate
        )

        def evaluate() -> float:
            head.eval()
            with torch.no_grad():
                loss = F.cross_entropy(head(X[eval_idx]), Y[eval_idx], weight=weights)
            head.train()
            return float(loss)

        with _cpu_threads(X.device, 1):  # tiny ops: threading costs more than it gives
            return self._train_loop(
                head, steps, train_ctx,
                step_fn=lambda: self._quick_step(head, opt, sched, X, Y, weights, rng),
                evaluate=evaluate,
                commit=lambda best: self._commit_quick(best, classes),
            )

    def _head_decay(self, targets: np.ndarray, n_out: int) -> float:
        """The quick head's weight decay for these strokes (see ``decay_reference``)."""
        cfg = self.config
        if not cfg.decay_reference:
            return float(cfg.weight_decay)
        counts = np.bincount(targets[targets >= 0], minlength=n_out)
        rarest = int(counts[counts > 0].min()) if (counts > 0).any() else 1
        return float(cfg.weight_decay) * min(1.0, cfg.decay_reference / rarest)

    def _quick_step(self, head, opt, sched, X, Y, weights, rng) -> float:
        idx = torch.from_numpy(rng.integers(len(X), size=min(self.config.batch, len(X))))
        idx = idx.to(X.device)
        loss = F.cross_entropy(head(X[idx]), Y[idx], weight=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    def _commit_quick(self, head: VoxelHead, classes) -> None:
        head.eval()
        self.head = head
        self.classes = tuple(classes)

    def _class_weights(self, targets: np.ndarray, n_out: int) -> torch.Tensor:
        cw = self.config.class_weights
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

    def _train_loop(self, module: nn.Module, steps: int, ctx, *, step_fn, evaluate, commit,
                    start_best: bool = False) -> dict:
        """Run ``steps`` training steps; keep the best weights (by ``evaluate``) and commit
        them at the end or when cancelled. ``start_best``: the starting weights compete
        too (a full-mode fit never ends worse, by that loss, than the quick model it
        started from)."""
        history: list[float] = []
        best_loss, best_state = math.inf, None
        if start_best:
            best_loss = evaluate()
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        stopped = False
        every = max(1, int(self.config.eval_every))
        try:
            for step in range(steps):
                loss = step_fn()
                if not math.isfinite(loss):
                    raise ValueError(
                        "the training loss became NaN/infinite; lower the learning rate"
                    )
                history.append(loss)
                if (step + 1) % every == 0 or step + 1 == steps:
                    current = evaluate()
                    if current < best_loss:
                        best_loss = current
                        best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                if ctx is not None:
                    ctx.report((step + 1) / steps, "training", step=step + 1, loss=loss,
                               best_loss=best_loss if best_state is not None else loss)
        except Cancelled:
            if best_state is None and history:
                best_loss = evaluate()
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            if best_state is None:
                raise
            stopped = True
        module.load_state_dict(best_state)
        commit(module)
        self.history = history
        self.best_loss = best_loss
        return {"history": history, "best_loss": best_loss, "steps_done": len(history),
                "stopped": stopped}

    # ----------------------------------------------------------------- full mode

    def _quick_start(self, image, sparse: SparseLabels, ctx) -> tuple[VoxelHead, dict]:
        """The quick-mode fit a full-mode fit starts from (features cached in ``self._quick``,
        so refits with more strokes reuse them)."""
        cfg = self.config
        quick_cfg = SegmentConfig.from_dict({
            **cfg.to_dict(), "mode": "quick", "steps": None, "lr": None, "batch_size": None,
            "feature_levels": [0], "warm_start": False,
        })
        if self._quick is None or self._quick.config != quick_cfg:
            self._quick = Segmenter(self.foundation, quick_cfg)
        out = self._quick.fit(image, sparse, ctx)
        return copy.deepcopy(self._quick.head), out

    def _fit_full(self, image, sparse: SparseLabels, irange, ctx) -> dict:
        from monai.losses import MaskedDiceLoss

        from napari_lsmfm.model import resolve_device

        cfg = self.config
        classes = sparse.classes
        n_out = len(classes) + 1
        device = resolve_device(cfg.device) if cfg.device else self.foundation.device
        warm = self.net is not None and self.classes == classes and cfg.warm_start
        anchor, quick = None, None
        if not warm or cfg.quick_weight > 0:
            head, quick = self._quick_start(image, sparse, span(ctx, 0.0, 0.15))
            feats = self._quick._features  # the head reads exactly these filters
            if cfg.quick_weight > 0:  # the quick model, kept frozen for predictions
                anchor = _FullNet(copy.deepcopy(self.foundation), copy.deepcopy(head),
                                  feats.sigmas, feats.spacing).to_device(device)
        if warm:
            net = copy.deepcopy(self.net)
        else:
            net = _FullNet(copy.deepcopy(self.foundation), head, feats.sigmas, feats.spacing)
        net.to_device(device)
        if quick is not None and quick["stopped"]:
            # stopped already during the quick fit: the model so far, with that quick model
            self._commit_full(net, classes, anchor)
            self.history, self.best_loss = quick["history"], quick["best_loss"]
            return {**quick, "stopped": True}
        ctx = span(ctx, 0.15, 1.0)
        torch.manual_seed(cfg.seed)
        targets = sparse.targets(classes)
        rng = np.random.default_rng(cfg.seed)
        sampler = _PatchSampler(image, irange, sparse, targets, cfg.patch_size, rng, cfg.augment)
        weights = self._class_weights(targets, n_out).to(device)
        dice = MaskedDiceLoss(softmax=True, to_onehot_y=True, batch=True)
        arch = net.foundation.spec.architecture
        enc = [p for n, p in net.foundation.backbone.named_parameters() if _is_encoder(n, arch)]
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
        fp16 = getattr(net.foundation, "_amp_dtype", None) == torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=bool(fp16 and device.type == "cuda"))
        # A fixed set of patches (their own draw, no augmentation) picks the best weights.
        eval_sampler = _PatchSampler(image, irange, sparse, targets, cfg.patch_size,
                                     np.random.default_rng(cfg.seed + 1), "none")
        eval_batch = eval_sampler.sample(min(4, max(2, cfg.batch)))

        def step_fn() -> float:
            step = len(self_history)
            if step == freeze:
                for p in enc:
                    p.requires_grad_(True)
            net.train()
            _freeze_batchnorm(net)
            x, y = sampler.sample(cfg.batch)
            x, y = x.to(device), y.to(device)
            try:
                logits = net(x)
                loss = self._masked_loss(logits, y, weights, dice, cfg.dice_weight)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            except Exception as exc:
                from napari_lsmfm.engine.tiled import _free_device_memory, _is_oom

                if _is_oom(exc):
                    _free_device_memory()
                    raise DeviceMemoryError(
                        f"out of memory training on {cfg.batch} patches of {cfg.patch_size} on "
                        f"{device}; use a smaller patch size or batch size, quick mode, or the CPU"
                    ) from exc
                raise
            value = loss.item()
            self_history.append(value)
            return value

        def evaluate() -> float:
            net.eval()
            with torch.no_grad():
                x, y = eval_batch
                logits = net(x.to(device))
                value = float(self._masked_loss(logits, y.to(device), weights, dice,
                                                cfg.dice_weight))
            return value

        self_history: list[float] = []
        return self._train_loop(
            net, steps, ctx, step_fn=step_fn, evaluate=evaluate,
            commit=lambda module: self._commit_full(module, classes, anchor), start_best=True,
        )

    @staticmethod
    def _masked_loss(logits, y, weights, dice, dice_weight: float) -> torch.Tensor:
        """Cross-entropy and soft Dice over annotated voxels only (label -1 = none)."""
        mask = (y >= 0).float()
        if mask.sum() == 0:
            return logits.sum() * 0.0
        ce = F.cross_entropy(logits, y[:, 0], weight=weights, ignore_index=-1)
        if dice_weight <= 0:
            return ce
        return ce + dice_weight * dice(logits, y.clamp_min(0), mask=mask)

    def _commit_full(self, net: _FullNet, classes, anchor: _FullNet | None) -> None:
        for module in (net, anchor):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)
                module.eval()
        self.net = net
        self.anchor = anchor
        self.classes = tuple(classes)

    # ----------------------------------------------------------------- predict

    def predict(
        self,
        image: Any,
        ctx: Any = None,
        *,
        roi: Sequence[slice] | None = None,
        out: Mapping[str, Any] | None = None,
        probabilities: bool | str = True,
        uncertainty: bool = True,
        instances: bool | Sequence[int] = False,
    ) -> SegmentationResult:
        """Segment ``image`` (or its ``roi``) with the trained model.

        Args:
            image: (Z, Y, X) numpy, dask or zarr volume.
            ctx: JobContext for progress and cancel (cancel raises ``Cancelled``).
            roi: three slices (z, y, x): predict only this region; arrays then cover it.
            out: arrays to fill instead of allocating numpy ones (e.g. zarr, for volumes
                larger than memory): keys "classes" (Z, Y, X), "probabilities"
                (C, Z, Y, X), "uncertainty" (Z, Y, X), "instances" (Z, Y, X).
            probabilities: True / "float32", "float16", "uint8" (255 = 1), or False.
            uncertainty: compute the normalised-entropy map.
            instances: True for every class, or the class values to split into objects
                (blob-like classes); computed in memory from the class map.

        Returns:
            A :class:`SegmentationResult`.
        """
        if not self.trained:
            raise ValueError("the model is not trained yet: paint some strokes and train first")
        check_image(image)
        out = dict(out or {})
        key = _image_key(image)
        lo_hi = _roi_box(roi, image.shape)
        region = tuple(slice(a, b) for a, b in lo_hi)
        rshape = tuple(b - a for a, b in lo_hi)
        n_out = len(self.channel_values)
        cdtype = np.uint8 if max(self.channel_values) <= 255 else np.uint16
        pdtype = _prob_dtype(probabilities)
        classes_arr = out.get("classes")
        if classes_arr is None:
            classes_arr = np.zeros(rshape, cdtype)
        probs_arr = out.get("probabilities")
        if pdtype is not None and probs_arr is None:
            probs_arr = np.zeros((n_out, *rshape), pdtype)
        unc_arr = out.get("uncertainty")
        if uncertainty and unc_arr is None:
            unc_arr = np.zeros(rshape, np.float32)
        _check_out(classes_arr, rshape, "classes")
        if probs_arr is not None:
            _check_out(probs_arr, (n_out, *rshape), "probabilities")
        if unc_arr is not None:
            _check_out(unc_arr, rshape, "uncertainty")
        lut = np.asarray(self.channel_values, np.int64)
        stats = {"voxels": int(math.prod(rshape))}

        def write(sl: tuple[slice, ...], probs: np.ndarray) -> None:
            classes_arr[sl] = lut[np.argmax(probs, 0)].astype(classes_arr.dtype, copy=False)
            if probs_arr is not None:
                p = probs
                if np.dtype(probs_arr.dtype) == np.uint8:
                    p = np.round(probs * 255.0)
                probs_arr[(slice(None), *sl)] = p.astype(probs_arr.dtype, copy=False)
            if unc_arr is not None:
                unc_arr[sl] = _entropy(probs)

        t0 = time.perf_counter()
        irange = self._intensity_range(image, key)
        pred_ctx = span(ctx, 0.0, 0.9 if instances else 1.0)
        if self.config.mode == "quick":
            self._predict_quick(image, irange, region, write, pred_ctx)
        else:
            self._predict_full(image, irange, region, write, pred_ctx)
        stats["predict_seconds"] = time.perf_counter() - t0
        inst_arr = None
        if instances:
            wanted = self.classes if instances is True else tuple(int(c) for c in instances)
            unknown = [c for c in wanted if c not in self.classes]
            if unknown:
                raise ValueError(f"no class {unknown} in this model (classes {self.classes})")
            if ctx is not None:
                ctx.report(0.9, "splitting objects")
            inst_arr = self._instances(classes_arr, wanted, out.get("instances"))
            if ctx is not None:
                ctx.report(1.0, "done")
        return SegmentationResult(
            classes=classes_arr, probabilities=probs_arr, uncertainty=unc_arr,
            instances=inst_arr, channel_values=self.channel_values,
            region=None if roi is None else region, stats=stats,
        )

    def _instances(self, classes_arr, wanted, target) -> Any:
        labels = np.asarray(classes_arr)
        result = np.zeros(labels.shape, np.uint32)
        offset = 0
        for value in wanted:
            inst = split_instances(labels == value, voxel_size=self.config.voxel_size)
            inst[inst > 0] += offset
            offset = max(offset, int(inst.max()))
            result = np.maximum(result, inst)
        if target is not None:
            _check_out(target, labels.shape, "instances")
            target[...] = result
            return target
        return result

    def _predict_quick(self, image, irange, region, write, ctx) -> None:
        head = self.head
        device = self.foundation.device
        head = head.to(device).eval()
        n_out = len(self.channel_values)

        def apply_head(feats: np.ndarray) -> np.ndarray:
            c = feats.shape[0]
            flat = feats.reshape(c, -1)
            probs = np.empty((n_out, flat.shape[1]), np.float32)
            step = 1 << 18
            with torch.inference_mode():
                for i in range(0, flat.shape[1], step):
                    x = torch.from_numpy(np.ascontiguousarray(flat[:, i : i + step].T, np.float32))
                    probs[:, i : i + step] = (
                        F.softmax(head(x.to(device)), -1).float().cpu().numpy().T
                    )
            return probs.reshape(n_out, *feats.shape[1:])

        cached = self.features(image, span(ctx, 0.0, 0.9))
        if cached is not None:
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
                write(sl, apply_head(feats))
                if ctx is not None:
                    ctx.report(0.9 + 0.1 * (i + 1) / len(zs), "classifying")
            return

        def sink(sl, feats):
            write(sl, apply_head(feats))

        cfg = self.config
        self._with_memory_fallback(
            lambda tile: predict_tiled(
                self._feature_fn(irange), image, out_channels=self._features.channels,
                tile=tile, overlap=cfg.overlap, blend=cfg.feature_blend, region=region,
                sink=sink, max_block_bytes=cfg.block_bytes, ctx=ctx, message="segmenting",
            ),
            ctx,
        )

    def _predict_full(self, image, irange, region, write, ctx) -> None:
        net = self.net.eval()
        anchor = self.anchor.eval() if self.anchor is not None else None
        weight = self.config.quick_weight if anchor is not None else 0.0
        lo, hi = irange
        scale = 1.0 / (hi - lo) if hi > lo else 0.0
        device = self.device

        def fn(windows: np.ndarray) -> torch.Tensor:
            if not np.isfinite(windows).all():
                raise ValueError(
                    "the image contains NaN or infinite voxels; replace them (e.g. "
                    "numpy.nan_to_num) before segmenting"
                )
            x = torch.from_numpy(np.clip((windows - lo) * scale, 0, 1).astype(np.float32))
            x = x.to(device)
            with torch.inference_mode():
                if weight >= 1.0:
                    return F.softmax(anchor(x), 1)
                probs = F.softmax(net(x), 1)
                if weight > 0.0:
                    probs = (1.0 - weight) * probs + weight * F.softmax(anchor(x), 1)
                return probs

        cfg = self.config
        self._with_memory_fallback(
            lambda tile: predict_tiled(
                fn, image, out_channels=len(self.channel_values), tile=tile,
                overlap=cfg.overlap, blend="gaussian", region=region, sink=write,
                max_block_bytes=cfg.block_bytes, ctx=ctx, message="segmenting",
            ),
            ctx,
        )

    def _run_tiled(self, fn, image, channels, *, blend, dtype, ctx, message) -> np.ndarray:
        cfg = self.config
        return self._with_memory_fallback(
            lambda tile: predict_tiled(
                fn, image, out_channels=channels, tile=tile, overlap=cfg.overlap, blend=blend,
                dtype=dtype, max_block_bytes=cfg.block_bytes, ctx=ctx, message=message,
            ),
            ctx,
        )

    def _with_memory_fallback(self, run, ctx) -> Any:
        """Run ``run(tile)``; when the device runs out of memory, halve the tile (down to
        32 voxels per axis) and try again, telling the user; else raise with advice."""
        tile = tuple(self.config.tile)
        while True:
            try:
                return run(tile)
            except DeviceMemoryError as exc:
                smaller = tuple(max(32, t // 2) if t == max(tile) else t for t in tile)
                if smaller == tile:
                    raise DeviceMemoryError(
                        f"{exc}. Even {tile} windows do not fit on {self.device}: choose the "
                        "CPU as device"
                    ) from exc
                tile = smaller
                if ctx is not None:
                    ctx.report(None, f"out of device memory: retrying with {tile} windows")

    # ------------------------------------------------------------------ save/load

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Save weights + settings (see :mod:`.heads`); returns the folder."""
        if not self.trained:
            raise ValueError("nothing to save: the model is not trained yet")
        config = {
            "mode": self.config.mode,
            "classes": list(self.classes),
            "channel_values": list(self.channel_values),
            "config": self.config.to_dict(),
            "foundation": foundation_record(self.foundation),
            "normalization": {"method": "percentile", "low": 1.0, "high": 99.0,
                              "per_volume": True},
            "best_loss": self.best_loss,
            "steps_done": len(self.history),
        }
        if self.config.mode == "quick":
            config["head"] = self.head.settings()
            config["features"] = self._features.settings()
            parts = {"head": self.head.state_dict()}
        else:
            config["head"] = self.net.head.settings()
            config["features"] = self.net.settings()
            parts = {"head": self.net.head.state_dict(),
                     "backbone": self.net.foundation.backbone.state_dict()}
            if self.anchor is not None:  # the quick model it started from (see quick_weight)
                config["anchor"] = {"head": self.anchor.head.settings(),
                                    "features": self.anchor.settings()}
                parts["anchor_head"] = self.anchor.head.state_dict()
                parts["anchor_backbone"] = self.anchor.foundation.backbone.state_dict()
        return save_task_model(folder, task="segment", config=config, parts=parts,
                               overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, foundation: Any = None, *, device: str | None = None
             ) -> Segmenter:
        """Load a saved model. ``foundation``: the one it was trained on (quick mode checks
        the weights' fingerprint); None loads it from the recorded source (the embedded
        default, or the saved path). A full-mode model carries its own backbone."""
        config, parts = load_task_model(folder, task="segment")
        record = config.get("foundation") or {}
        cfg = SegmentConfig.from_dict(config.get("config") or {})
        cfg.device = device  # where it was trained (say a GPU) need not exist here
        mode = cfg.mode
        if foundation is None:
            foundation = _foundation_for(record, mode, device)
        check_foundation(record, foundation, exact=(mode == "quick"))
        try:
            return cls._build(config, parts, cfg, foundation, folder)
        except (KeyError, TypeError, RuntimeError) as err:
            raise ValueError(
                f"{folder}: the saved model is damaged or from an incompatible version "
                f"({type(err).__name__}: {err})"
            ) from None

    @classmethod
    def _build(cls, config, parts, cfg, foundation, folder) -> Segmenter:
        mode = cfg.mode
        seg = cls(foundation, cfg)
        seg.classes = tuple(int(c) for c in config["classes"])
        seg.best_loss = config.get("best_loss")
        if mode == "quick":
            head = _saved_head(config["head"], parts["head"])
            if head.in_channels != seg._features.channels:
                raise ValueError(
                    f"{folder}: the head reads {head.in_channels} features but these settings "
                    f"make {seg._features.channels}"
                )
            seg.head = head.to(foundation.device).eval()
        else:
            target = cfg.device or foundation.device
            net = cls._saved_net(foundation, config, parts["head"], parts["backbone"])
            net.to_device(target)
            anchor = None
            if "anchor_head" in parts:  # models saved before output ensembling have none
                anchor = cls._saved_net(foundation, config["anchor"], parts["anchor_head"],
                                        parts["anchor_backbone"]).to_device(target)
            else:
                seg.config.quick_weight = 0.0  # it predicts with the finetuned network alone
            seg._commit_full(net, seg.classes, anchor)
        return seg

    @staticmethod
    def _saved_net(foundation, record: Mapping[str, Any], head_state, backbone_state) -> _FullNet:
        """A full-mode network from saved parts: a copy of ``foundation`` with the saved
        backbone weights, the saved head and its filter settings."""
        backbone = copy.deepcopy(foundation)
        backbone.backbone.load_state_dict(backbone_state)
        feats = record["features"]
        return _FullNet(backbone, _saved_head(record["head"], head_state), feats["sigmas"],
                        feats["spacing"])


def _saved_head(settings: Mapping[str, Any], state: Mapping[str, Any]) -> VoxelHead:
    head = VoxelHead(settings["in_channels"], settings["n_out"], settings["hidden"],
                     settings.get("depth", 2), settings.get("dropout", 0.0))
    head.load_state_dict(state)
    return head


def _foundation_for(record: Mapping[str, Any], mode: str, device: str | None) -> Any:
    from napari_lsmfm.model import Foundation, FoundationSpec, load_foundation

    source = record.get("source")
    if source == "default":
        return load_foundation(None, device=device or "auto")
    if source and source != "memory" and Path(source).exists():
        return load_foundation(source, device=device or "auto")
    if mode == "full":  # the saved backbone replaces every weight
        foundation = Foundation(FoundationSpec.from_dict(record["spec"]))
        return foundation.to_device(device or "auto")
    raise ValueError(
        f"this model's foundation ({source!r}) cannot be found; load the foundation it was "
        "trained on and pass it (--weights on the command line)"
    )


def _roi_box(roi: Any, shape: Sequence[int]) -> list[tuple[int, int]]:
    if roi is None:
        return [(0, int(s)) for s in shape]
    if len(roi) != 3:
        raise ValueError(f"roi must be three slices (z, y, x), got {roi!r}")
    box = []
    for r, n in zip(roi, shape, strict=True):
        r = r if isinstance(r, slice) else slice(*r)
        start = 0 if r.start is None else int(r.start)
        stop = int(n) if r.stop is None else int(r.stop)
        if not 0 <= start < stop <= n:
            raise ValueError(
                f"roi {roi!r} is empty or outside the image of shape {tuple(shape)}"
            )
        if r.step not in (None, 1):
            raise ValueError(
                f"roi {roi!r}: slices must have step 1"
            )
        box.append((start, stop))
    return box


def _prob_dtype(probabilities: bool | str) -> Any:
    if probabilities is False or probabilities is None:
        return None
    if probabilities is True:
        return np.float32
    names = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
    if probabilities not in names:
        raise ValueError(f"probabilities must be True, False, or one of {sorted(names)}")
    return names[probabilities]


def _check_out(array: Any, shape: Sequence[int], name: str) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"out[{name!r}] has shape {tuple(array.shape)}, expected {tuple(shape)}")


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Normalised entropy over channels (axis 0), float32 in [0, 1]."""
    p = np.clip(probs, 1e-7, 1.0)
    h = -(p * np.log(p)).sum(0)
    return (h / math.log(max(probs.shape[0], 2))).astype(np.float32)


# --------------------------------------------------------------------- convenience


def segment(
    image: Any,
    brushes: Any,
    *,
    foundation: Any = None,
    mode: str = "quick",
    ctx: Any = None,
    probabilities: bool | str = True,
    instances: bool | Sequence[int] = False,
    config: SegmentConfig | None = None,
    **overrides: Any,
) -> SegmentationResult:
    """Train on ``brushes`` and segment the whole ``image`` in one call.

    ``foundation`` None loads the embedded default (CheckpointError when none is
    installed). Other settings: see :class:`SegmentConfig`. The fitted model is in
    ``result.stats["segmenter"]``.
    """
    if foundation is None:
        from napari_lsmfm.model import load_foundation

        foundation = load_foundation(None)
    if config is None:
        config = SegmentConfig(mode=mode, **overrides)
    elif overrides or mode != config.mode:
        config = SegmentConfig.from_dict({**config.to_dict(), "mode": mode, **overrides})
    seg = Segmenter(foundation, config)
    fit = seg.fit(image, brushes, span(ctx, 0.0, 0.5))
    result = seg.predict(image, span(ctx, 0.5, 1.0), probabilities=probabilities,
                         instances=instances)
    result.stats.update(fit=fit, segmenter=seg)
    return result

