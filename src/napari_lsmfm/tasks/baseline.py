"""The classical baseline: a random forest on filter features (ilastik / napari-apoc).

What a microscopist gets today from a few brush strokes without a foundation model:
per-voxel features from Gaussian, gradient, difference-of-Gaussians and Hessian
filters at a few scales (anisotropy-aware, :mod:`.filters`), and a scikit-learn random forest
trained on the annotated voxels. Same brush convention and output as
:class:`~napari_lsmfm.tasks.segment.Segmenter` (background 0, class values kept), so
benchmarks compare like with like. scikit-learn is a core dependency.
In-memory volumes only: it is a yardstick, not a tool for whole brains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_lsmfm.io.check import check_volume

from .filters import filter_bank_numpy
from .segment import SegmentationResult, SparseLabels, normalized_entropy
from .segment.labels import class_dtype

__all__ = ["PixelClassifier", "filter_features"]


def filter_features(
    image: np.ndarray,
    sigmas: Sequence[float] = (1.0, 2.0, 4.0),
    voxel_size: Sequence[float] | None = None,
) -> np.ndarray:
    """Classical filter bank of a (Z, Y, X) volume: float32 (C, Z, Y, X).

    The 1-99 percentile-normalised intensity, then per sigma (voxels along the finest
    axis; scaled per axis by ``voxel_size``): Gaussian, gradient magnitude, difference of
    Gaussians and the three Hessian eigenvalues (:mod:`.filters`, as the quick mode).
    """
    img = np.asarray(image, np.float32)
    lo, hi = np.percentile(img, [1, 99])
    img = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
    return filter_bank_numpy(img, sigmas, voxel_size)


class PixelClassifier:
    """Random-forest pixel classifier trained from brush strokes (the apoc approach).

    >>> clf = PixelClassifier(voxel_size=(2, 1, 1)).fit(image, brushes)
    >>> result = clf.predict(image)        # SegmentationResult, background 0
    """

    def __init__(
        self,
        sigmas: Sequence[float] = (1.0, 2.0, 4.0),
        voxel_size: Sequence[float] | None = None,
        n_estimators: int = 100,
        max_depth: int | None = 12,
        seed: int = 0,
        n_jobs: int | None = None,
    ) -> None:
        self.sigmas = tuple(float(s) for s in sigmas)
        self.voxel_size = tuple(voxel_size) if voxel_size is not None else None
        self.n_estimators = int(n_estimators)
        self.max_depth = max_depth
        self.seed = seed
        self.n_jobs = n_jobs
        self.classes: tuple[int, ...] = ()
        self.forest: Any = None

    @property
    def channel_values(self) -> tuple[int, ...]:
        return (0, *self.classes)

    def fit(self, image: Any, brushes: Any) -> PixelClassifier:
        """Train on the annotated voxels (0 = none, 1 = background, 2, 3, ... = classes)."""
        try:
            from sklearn.ensemble import RandomForestClassifier
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the random-forest baseline needs scikit-learn: pip install "
                "'napari-lsmfm[baseline]'"
            ) from err
        check_volume(image, "segmentation")
        sparse = brushes if isinstance(brushes, SparseLabels) else SparseLabels.from_array(
            brushes, image.shape
        )
        feats = filter_features(np.asarray(image), self.sigmas, self.voxel_size)
        z, y, x = sparse.coords.T
        samples = feats[:, z, y, x].T
        self.classes = sparse.classes
        targets = sparse.targets(self.classes)
        self.forest = RandomForestClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth,
            random_state=self.seed, n_jobs=self.n_jobs,
        ).fit(samples, targets)
        return self

    def predict(self, image: Any) -> SegmentationResult:
        """Class map (uint8 / uint16 / uint32, background 0), probabilities (C, Z, Y, X) float32
        and the normalised-entropy uncertainty of a (Z, Y, X) volume."""
        if self.forest is None:
            raise ValueError("the classifier is not trained yet: call fit first")
        check_volume(image, "segmentation")
        feats = filter_features(np.asarray(image), self.sigmas, self.voxel_size)
        flat = feats.reshape(feats.shape[0], -1).T
        probs = np.zeros((len(self.channel_values), flat.shape[0]), np.float32)
        proba = self.forest.predict_proba(flat).T
        probs[self.forest.classes_] = proba
        probs = probs.reshape(-1, *feats.shape[1:])
        lut = np.asarray(self.channel_values)
        dtype = class_dtype(self.channel_values)
        return SegmentationResult(
            classes=lut[np.argmax(probs, 0)].astype(dtype),
            probabilities=probs,
            uncertainty=normalized_entropy(probs),
            channel_values=self.channel_values,
        )
