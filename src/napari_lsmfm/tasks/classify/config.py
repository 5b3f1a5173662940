"""The settings of a :class:`~napari_lsmfm.tasks.classify.Classifier` (saved with it)."""

from __future__ import annotations

from dataclasses import dataclass

from napari_lsmfm.engine.grid import as_triple
from napari_lsmfm.tasks.base import TaskConfig

__all__ = ["HEADS", "MODES", "ClassifyConfig"]

MODES = ("objects", "points", "tiles")
HEADS = ("linear", "mlp")


@dataclass
class ClassifyConfig(TaskConfig):
    """Settings of a :class:`Classifier`; checked at construction and after every assignment.

    patch: (z, y, x) voxels of the window around each object or point that the foundation
        sees (objects larger than it are pooled over the part inside it; their shape
        measures use the whole object).
    tile: (z, y, x) voxels of one tile in tile mode (the class map has one value per tile).
    point_radius: radius in micrometres of the ball around a point whose intensities are
        measured (points have no mask).
    voxel_size: (z, y, x) micrometres, for shape measures; None = isotropic 1 um.
    head: "linear" (a linear probe; default, best with a few examples) or "mlp" (one hidden
        layer of ``hidden`` units).
    levels: the ``Foundation.features`` levels pooled over each item (0 = the dense
        output, 1 = the first encoder level, ...).
    measure_weight: weight of the hand-made measures beside each pooled level (every
        group of features is scaled to the same total variance, then weighted).
    self_train: self-training on the other objects of the labels layer (or tiles): after a
        first fit, the items the probe is surest of join the examples, up to this many times
        each class's examples, and the probe is fitted again (0 = off).
    self_train_below: self-training runs only while the rarest class has fewer examples
        than this (with one or two it helps; from about five the examples alone do better:
        the validation scenes of ``benchmarks/classification.py``).
    steps / lr / l2: training of the probe (full batch, Adam; ``l2`` is the inverse of a
        logistic regression's C).
    prompts: class names or descriptions for zero-shot classification, or priors of the
        classes examples are given for (a prompt names its class: "nucleus: round bright
        blob" is the class "nucleus" described; a plain "nucleus" is its own description).
    prior_strength: how many examples a prompt is worth: the prompt's logits are added with
        weight ``prior_strength / (prior_strength + n)``, n the examples of the rarest class.
    known_rate: the open-set threshold accepts this fraction of the examples' own
        leave-one-out scores (0.95: about 1 known object in 20 is called unknown).
    unknown_threshold: a fixed open-set threshold on the similarity score (None: calibrated
        from the examples); ``open_set`` False never says unknown.
    spread: the calibrated open-set test also spreads the examples over a graph of the
        items in the hand-made measures (:func:`~.openset.spread_mass`).
    forest_weight: the class probabilities are this much a random forest's on the
        hand-made measures (``forest_trees`` trees) and the rest the probe's (0 = the
        probe alone), when ``choose_mix`` is off or the examples are too few to
        cross-validate (fewer than two of a class).
    choose_mix: choose the forest's share among 0, ``forest_weight`` and 1 by
        cross-validation on the examples (:mod:`.mix`); the fit report says which won.
    batch_size: windows per foundation call.
    seed: initialisation of the probe.
    """

    patch: tuple[int, int, int] = (16, 48, 48)
    tile: tuple[int, int, int] = (32, 64, 64)
    point_radius: float = 4.0
    voxel_size: tuple[float, float, float] | None = None
    head: str = "linear"
    hidden: int = 64
    levels: tuple[int, ...] = (0, 1)
    measure_weight: float = 3.0
    self_train: float = 3.0
    self_train_below: int = 3
    steps: int = 300
    lr: float = 3e-2
    l2: float = 0.3
    prompts: tuple[str, ...] = ()
    prior_strength: float = 2.0
    known_rate: float = 0.95
    unknown_threshold: float | None = None
    open_set: bool = True
    spread: bool = True
    forest_weight: float = 0.75
    forest_trees: int = 100
    choose_mix: bool = False
    batch_size: int = 8
    seed: int = 0

    def validate(self) -> None:
        """Check every setting; sizes become (z, y, x) tuples, prompts a tuple of texts."""
        self.patch = as_triple(self.patch, "patch", positive=True)
        self.tile = as_triple(self.tile, "tile", positive=True)
        if self.voxel_size is not None:
            self.voxel_size = as_triple(self.voxel_size, "voxel_size", kind=float,
                                        positive=True)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        self.self_train_below = int(self.self_train_below)
        if self.self_train_below < 0:
            raise ValueError(f"self_train_below must be >= 0, got {self.self_train_below}")
        if not 0.0 <= float(self.forest_weight) <= 1.0:
            raise ValueError(f"forest_weight must be in [0, 1], got {self.forest_weight}")
        for name in ("hidden", "steps", "batch_size", "forest_trees"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.levels = tuple(int(k) for k in self.levels)
        if not self.levels or min(self.levels) < 0:
            raise ValueError(f"levels must be feature levels 0, 1, ..., got {self.levels}")
        if min(float(self.measure_weight), float(self.l2), float(self.self_train)) < 0:
            raise ValueError("measure_weight, l2 and self_train must be >= 0")
        if not float(self.lr) > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not float(self.point_radius) > 0:
            raise ValueError(f"point_radius must be positive micrometres, got {self.point_radius}")
        if isinstance(self.prompts, str):
            self.prompts = tuple(p for p in self.prompts.split(";"))
        self.prompts = tuple(str(p).strip() for p in self.prompts if str(p).strip())
        if not 0.0 < float(self.known_rate) <= 1.0:
            raise ValueError(f"known_rate must be in (0, 1], got {self.known_rate}")
        if float(self.prior_strength) < 0:
            raise ValueError(f"prior_strength must be >= 0, got {self.prior_strength}")
        if self.unknown_threshold is not None:
            self.unknown_threshold = float(self.unknown_threshold)
