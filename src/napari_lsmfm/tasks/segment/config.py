"""The settings of a :class:`~napari_lsmfm.tasks.segment.Segmenter` (saved with the model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from napari_lsmfm.engine.grid import as_triple, check_tile
from napari_lsmfm.engine.tiled import DEFAULT_TILE
from napari_lsmfm.tasks.base import TaskConfig

__all__ = ["AUGMENTS", "CANDIDATE_CHOICES", "MODES", "REFINE_CHOICES", "SegmentConfig"]

MODES = ("quick", "full")
CANDIDATE_CHOICES = ("auto", "foundation", "filters", "forest")
AUGMENTS = ("geometric", "all", "none")
REFINE_CHOICES = ("auto", "none")


@dataclass
class SegmentConfig(TaskConfig):
    """Settings of a :class:`Segmenter`; saved with the model. Checked at construction and
    again after every assignment (:class:`~napari_lsmfm.tasks.base.TaskConfig`).

    mode: "quick" (frozen features + per-voxel head) or "full" (finetune the backbone).
    steps / lr / batch_size: training steps, learning rate, and voxels (quick) or
        patches (full) per step; None picks the mode's default.
    patch_size: (z, y, x) training patches of the full mode.
    tile / overlap: prediction (and feature) windows in voxels and their overlap.
    feature_blend: how quick-mode feature windows are stitched ("gaussian" or "crop").
    feature_levels: which ``Foundation.features`` levels the quick mode uses (0 = the
        dense output; coarser levels are upsampled trilinearly).
    sigmas: classical filter scales in voxels along x (z scaled by the voxel size); None
        (default) = from the object scale: 1, 2, 4, ... up to about a third of the
        objects' diameter (:mod:`.scale`).
    object_diameter: the objects' typical diameter in micrometres (voxels when
        ``voxel_size`` is None); None = estimated from the foreground strokes.
    rescale: quick mode runs the foundation at the scale it was pretrained on (windows
        resampled so objects are its training size, features resampled back) when the
        objects are more than sqrt(2) times larger or smaller; False = never.
    candidate: the quick-mode model: "auto" (validate "foundation", "filters" and
        "forest" on held-out strokes and use the best, :mod:`.candidates`),
        "foundation" (MLP on foundation + filter features), "filters" (MLP on the
        filters alone) or "forest" (random forest on the filters).
    forest_trees: trees of the "forest" candidate.
    refine: quick mode: "auto" corrects the MLP head's probabilities from the strokes'
        class mix (interiors painted densely, background in thin lines) to the volume's,
        estimated from the head's own probabilities on the volume (:mod:`.refine`): object
        borders move in to where they belong and spurious blobs go; the shift never
        turns more than 2 % of any class's strokes, and the forest candidate is then
        chosen only when it validates clearly (0.02) better. "none": as trained.
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
    sigmas: tuple[float, ...] | None = None
    object_diameter: float | None = None
    rescale: bool = True
    candidate: str = "auto"
    forest_trees: int = 40
    refine: str = "auto"
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

    def validate(self) -> None:
        """Check every setting; sizes become (z, y, x) tuples, ``augment`` True / False
        becomes "all" / "none"."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'quick' or 'full', got {self.mode!r}")
        self.patch_size = as_triple(self.patch_size, "patch_size", positive=True)
        self.tile = check_tile(self.tile, "tile", DEFAULT_TILE)
        self.feature_levels = tuple(int(v) for v in self.feature_levels)
        if self.sigmas is not None:
            self.sigmas = tuple(float(s) for s in self.sigmas)
            if not self.sigmas or min(self.sigmas) <= 0:
                raise ValueError(f"sigmas must be positive numbers, got {self.sigmas}")
        if self.object_diameter is not None:
            self.object_diameter = float(self.object_diameter)
            if not self.object_diameter > 0:
                raise ValueError(
                    f"object_diameter must be positive, got {self.object_diameter}")
        if self.candidate not in CANDIDATE_CHOICES:
            raise ValueError(
                f"candidate must be one of {CANDIDATE_CHOICES}, got {self.candidate!r}")
        if self.refine not in REFINE_CHOICES:
            raise ValueError(f"refine must be one of {REFINE_CHOICES}, got {self.refine!r}")
        if int(self.forest_trees) < 1:
            raise ValueError(f"forest_trees must be at least 1, got {self.forest_trees}")
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

    def quick_start(self) -> SegmentConfig:
        """The settings of the quick fit a full-mode fit starts from (the mode's defaults,
        the dense features only, the foundation candidate at the volume's own scale, no
        warm start)."""
        return SegmentConfig.from_dict({
            **self.to_dict(), "mode": "quick", "steps": None, "lr": None, "batch_size": None,
            "feature_levels": [0], "warm_start": False, "candidate": "foundation",
            "rescale": False, "refine": "none",
        })

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
