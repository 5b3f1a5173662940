"""The :class:`Segmenter`: the unit of few-shot segmentation that is fitted, used and saved.

It holds the settings, the classes and the trained parts (quick: a per-voxel head;
full: the finetuned network and the quick model it started from), and runs them with
the engine's parts: the tiled engine window by window (a dask / zarr input is read a
block at a time, outputs can be zarr), :class:`~napari_lsmfm.engine.train.TrainLoop`,
the saved-model store. The modes' own work is in :mod:`.quick` and :mod:`.full`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_lsmfm.engine.device import resolve_device
from napari_lsmfm.engine.grid import region_box
from napari_lsmfm.engine.jobs import span
from napari_lsmfm.engine.store import save_task_model
from napari_lsmfm.engine.train import FitReport
from napari_lsmfm.io.check import check_volume
from napari_lsmfm.tasks.heads import VoxelHead

from . import saved
from .candidates import fit_quick
from .config import SegmentConfig
from .features import FeatureCache, QuickFeatures, image_key, point_features, volume_features
from .full import FullNet, fit_full, predict_full
from .labels import SparseLabels, class_dtype
from .quick import classify_cached, classify_windows, head_decay
from .refine import PriorShift, apply_offsets
from .result import ResultWriter, SegmentationResult, class_instances, instance_classes
from .windows import classify_each_window

__all__ = ["Segmenter"]


class Segmenter:
    """A trainable segmentation model on a foundation.

    >>> seg = Segmenter(foundation)                 # quick mode
    >>> seg.fit(image, brushes)                     # seconds once the features are cached
    >>> result = seg.predict(image)                 # SegmentationResult
    >>> seg.save("nuclei_model"); Segmenter.load("nuclei_model", foundation)
    """

    task = "segment"

    def __init__(self, foundation: Any, config: SegmentConfig | None = None, **overrides: Any):
        if config is None:
            config = SegmentConfig(**overrides)
        elif overrides:
            config = SegmentConfig.from_dict({**config.to_dict(), **overrides})
        self.foundation = foundation
        self.config = config
        self.classes: tuple[int, ...] = ()
        self.head: VoxelHead | None = None
        self.net: FullNet | None = None
        # full mode: the quick model the finetuning started from (frozen foundation copy
        # and quick head), averaged into predictions with weight ``config.quick_weight``
        self.anchor: FullNet | None = None
        self.history: list[float] = []
        self.best_loss: float | None = None
        self.quick_features = QuickFeatures(foundation, config) if config.mode == "quick" else None
        self.candidate: str | None = None  # quick mode: the model chosen (.candidates)
        self.refinement: PriorShift | None = None  # quick mode: the prior shift (.refine)
        self.strokes: SparseLabels | None = None  # the last fit's (sampled) strokes and
        self.strokes_image: tuple | None = None  # the image_key of the image they were on
        self._companion: QuickFeatures | None = None
        self._cache = FeatureCache()
        self._ranges: dict[tuple, tuple[float, float]] = {}
        self._quick: Segmenter | None = None  # full mode: the quick fit it starts from

    @property
    def trained(self) -> bool:
        return bool(self.classes) and (self.head is not None or self.net is not None)

    @property
    def channel_values(self) -> tuple[int, ...]:
        """Output value of each probability channel: background 0, then the classes."""
        return (0, *self.classes)

    @property
    def class_dtype(self) -> np.dtype:
        """The dtype of the class map ``predict`` returns: uint8, uint16 or uint32, the
        smallest holding every class value (allocate an ``out["classes"]`` in it)."""
        return class_dtype(self.channel_values)

    @property
    def device(self) -> torch.device:
        if self.net is not None:
            return next(self.net.parameters()).device
        return self.foundation.device

    def to_device(self, device: str | torch.device = "auto") -> Segmenter:
        """Run on ``device`` (auto / cpu / cuda:N / mps). Quick mode moves the foundation
        (shared with whoever passed it) and the head; full mode the finetuned network and
        the quick model, and later fits train there (``config.device``)."""
        if self.config.mode == "quick":
            self.foundation.to_device(device)
            if self.head is not None:
                self.head.to(self.foundation.device)
            return self
        target = resolve_device(device)
        for net in (self.net, self.anchor):
            if net is not None:
                net.to_device(target)
        self.config.device = str(target)
        return self

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

    def fit(self, image: Any, targets: Any, ctx: Any = None) -> FitReport:
        """Train on brushed voxels of ``image``.

        Args:
            image: (Z, Y, X) numpy, dask or zarr volume (any real dtype).
            targets: the brushes: a (Z, Y, X) integer array (0 = none, 1 = background,
                2, 3, ... = classes) or a :class:`SparseLabels`.
            ctx: JobContext: progress with values step=, loss=, best_loss= per step.

        Returns:
            A FitReport (history: loss per step, best_loss, steps_done, stopped, seconds;
            extra n_annotated, classes, and "warnings" when the image is constant). When
            the job is cancelled during training, the best weights so far are kept and
            ``stopped=True`` is returned (no exception),
            so the model can predict at once; cancelled before any training step, the
            previous model is kept and ``Cancelled`` propagates.
        """
        t0 = time.perf_counter()
        check_volume(image, "segmentation")
        sparse = targets if isinstance(targets, SparseLabels) else SparseLabels.from_array(
            targets, image.shape
        )
        if tuple(sparse.image_shape) != tuple(image.shape):
            raise ValueError(
                f"the strokes were made for shape {sparse.image_shape}, the image is {image.shape}"
            )
        key = image_key(image)
        irange = self._intensity_range(image, key)
        warnings = flat_image_warnings(irange, ctx)
        if self.config.mode == "quick":
            sparse = sparse.subsample(self.config.max_samples, self.config.seed)
            report = self._record(fit_quick(self, image, sparse, irange, ctx))
            self.strokes, self.strokes_image = sparse, key
        else:
            report = self._record(fit_full(self, image, sparse, irange, ctx))
        if warnings:
            report.update(warnings=warnings)
        return report.update(seconds=time.perf_counter() - t0, n_annotated=sparse.n_annotated,
                             classes=list(self.classes))

    def features(self, image: Any, ctx: Any = None, *, features: QuickFeatures | None = None
                 ) -> np.ndarray | None:
        """The whole-volume quick-mode features (C, Z, Y, X) float16 the model reads (or
        ``features``), computed once and cached; None when they would exceed
        ``config.cache_bytes``."""
        qf = features or self.quick_features
        if qf is None:
            raise ValueError("features are cached in quick mode only")
        key = image_key(image)
        fkey = qf.key(key, self.config)
        feats = self._cache.recall(fkey)
        if feats is not None:
            return feats
        companion = self._companion
        if companion is not None and qf is self.quick_features:
            both = self._cache.recall(companion.key(key, self.config))
            if both is not None:  # the filters are its last channels
                return both[companion.foundation_channels:]
        nbytes = 2 * qf.channels * math.prod(image.shape)
        if not self._cache.make_room(nbytes, self.config.cache_bytes):
            return None
        feats = volume_features(qf, image, self._intensity_range(image, key), self.config, ctx)
        self._cache[fkey] = feats
        return feats

    def is_cached(self, image: Any, features: QuickFeatures) -> bool:
        """Whether the whole-volume ``features`` of ``image`` are in the cache."""
        return features.key(image_key(image), self.config) in self._cache

    def stroke_features(self, image: Any, features: QuickFeatures, sparse: Any,
                        irange: tuple[float, float], ctx: Any = None) -> np.ndarray:
        """``features`` at the strokes (a :class:`SparseLabels`, or voxels (N, 3)): (N, C)
        float32, from the whole-volume cache (filled now) or, for volumes too big to
        cache, computed in the windows holding them."""
        coords = getattr(sparse, "coords", sparse)
        cached = self.features(image, ctx, features=features)
        if cached is not None:
            z, y, x = np.asarray(coords).T
            return np.asarray(cached[:, z, y, x].T, np.float32)
        return point_features(features, image, coords, irange, self.config, ctx)

    def use_quick_model(self, classes: Sequence[int], head: Any, features: QuickFeatures,
                        candidate: str, companion: QuickFeatures | None = None,
                        refinement: PriorShift | None = None) -> Segmenter:
        """Make ``head`` (reading ``features``) the quick model, candidate ``candidate``,
        its probabilities corrected by ``refinement`` (:mod:`.refine`; None: as they are);
        ``companion``: cached features whose last channels are ``features`` (the filters
        of foundation + filter features), read instead of computing them again."""
        self.quick_features, self.candidate = features, candidate
        self.refinement = refinement
        self._companion = companion if companion is not features else None
        return self.commit(classes, head=head)

    def _head_decay(self, targets: np.ndarray, n_out: int) -> float:
        return head_decay(self.config, targets, n_out)

    def _record(self, report: FitReport) -> FitReport:
        self.history, self.best_loss = report.history, report.best_loss
        return report

    def commit(self, classes: Sequence[int], *, head: Any = None,
               net: FullNet | None = None, anchor: FullNet | None = None) -> Segmenter:
        """Make these the trained parts for ``classes``: quick mode ``head``; full mode the
        network ``net`` and the quick model ``anchor`` (None: the network alone), frozen."""
        if net is not None:
            self.net = net.freeze()
            self.anchor = anchor.freeze() if anchor is not None else None
        else:
            self.head = head.eval()
        self.classes = tuple(int(c) for c in classes)
        return self

    # ----------------------------------------------------------------- predict

    def predict(self, image: Any, ctx: Any = None, *, region: Sequence[slice] | None = None,
                out: Any = None, probabilities: bool | str = True, uncertainty: bool = True,
                instances: bool | Sequence[int] = False,
                roi: Sequence[slice] | None = None,
                intensity_range: tuple[float, float] | None = None,
                blend: str | None = None) -> SegmentationResult:
        """Segment ``image`` (or its ``region``) with the trained model.

        Args:
            image: (Z, Y, X) numpy, dask or zarr volume.
            ctx: JobContext for progress and cancel (cancel raises ``Cancelled``).
            region: three slices (z, y, x): predict only this region; arrays then cover
                it (``roi`` is the older name).
            out: arrays to fill instead of allocating numpy ones (e.g. zarr, for volumes
                larger than memory): keys "classes" (Z, Y, X; at least
                :attr:`class_dtype`, else ValueError before any work), "probabilities"
                (C, Z, Y, X), "uncertainty" (Z, Y, X), "instances" (Z, Y, X).
            probabilities: True / "float32", "float16", "uint8" (255 = 1), or False.
            uncertainty: compute the normalised-entropy map.
            instances: True for every class, or the class values to split into objects
                (blob-like classes); computed in memory from the class map.
            intensity_range: fixes the normalisation (default: ``image``'s own).
            blend: quick mode: "crop" / "gaussian" stitch per-window probabilities
                (:mod:`.windows`); None (default) blends the features.

        Returns:
            A :class:`SegmentationResult`; its ``stats["warnings"]`` says when the image
            is constant (every voxel then gets the same class).
        """
        if not self.trained:
            raise ValueError("the model is not trained yet: paint some strokes and train first")
        if roi is not None and region is not None:
            raise ValueError("give region or roi, not both")
        region = roi if roi is not None else region
        check_volume(image, "segmentation")
        out = dict(out or {})
        key = image_key(image)
        lo, hi = region_box(region, image.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
        writer = ResultWriter(shape, self.channel_values, out, probabilities, uncertainty)
        stats = {"voxels": int(math.prod(shape))}
        t0 = time.perf_counter()
        irange = tuple(intensity_range or self._intensity_range(image, key))
        warnings = flat_image_warnings(irange, ctx)
        if warnings:
            stats["warnings"] = warnings
        pred_ctx = span(ctx, 0.0, 0.9 if instances else 1.0)
        if self.config.mode == "quick":
            _predict_quick(self, image, irange, box, writer, pred_ctx, blend)
            stats["refine"] = dict(self.refinement or {"method": "none"})
        else:
            predict_full(self.net, self.anchor, self.config, image, irange, box, writer, pred_ctx)
        stats["predict_seconds"] = time.perf_counter() - t0
        inst = None
        if instances:
            wanted = instance_classes(instances, self.classes)
            if ctx is not None:
                ctx.report(0.9, "splitting objects")
            inst = class_instances(writer.classes, wanted, self.config.voxel_size,
                                   out.get("instances"), probabilities=writer.probabilities,
                                   channel_values=self.channel_values,
                                   diameter=self.config.object_diameter)
            if ctx is not None:
                ctx.report(1.0, "done")
        return writer.result(self.channel_values, instances=inst,
                             region=None if region is None else box, stats=stats)

    # ------------------------------------------------------------------ save/load

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Save weights + settings (:mod:`napari_lsmfm.engine.store`); returns the folder."""
        if not self.trained:
            raise ValueError("nothing to save: the model is not trained yet")
        config, parts = saved.model_record(self)
        return save_task_model(folder, task=self.task, config=config, parts=parts,
                               overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, foundation: Any = None, *, device: str | None = None
             ) -> Segmenter:
        """Load a saved model. ``foundation``: the one it was trained on (quick mode checks
        the weights' fingerprint); None loads it from the recorded source (the embedded
        default, or the saved path). A full-mode model carries its own backbone."""
        return saved.load_segmenter(cls, folder, foundation, device)


def _predict_quick(seg: Segmenter, image, irange, region, write, ctx, blend=None) -> None:
    """Quick-mode probabilities of ``region`` into ``write``: from the whole-volume feature
    cache, window by window, or (``blend``) with the head in every window."""
    device = seg.foundation.device
    head = seg.head.to(device).eval()
    offsets = seg.refinement.offsets if seg.refinement is not None else None
    if offsets is not None:  # the class mix of the volume, not of the strokes
        write = _shifted(write, offsets)
    if blend is not None:
        classify_each_window(head, seg.quick_features, seg.config, image, irange,
                             region, write, device, ctx, blend=blend)
        return
    cached = seg.features(image, span(ctx, 0.0, 0.9))
    if cached is not None:
        classify_cached(head, cached, region, write, device, ctx)
    else:
        classify_windows(head, seg.quick_features, seg.config, image, irange, region,
                         write, device, ctx)


def _shifted(write: Any, offsets: np.ndarray) -> Any:
    def sink(sl: tuple[slice, ...], probs: np.ndarray) -> None:
        write(sl, apply_offsets(probs, offsets, axis=0))

    return sink


def flat_image_warnings(irange: tuple[float, float], ctx: Any = None) -> list[str]:
    """A warning (also reported on ``ctx``) when the intensity range is flat: the image is
    constant, so its voxels cannot be told apart. Empty otherwise."""
    lo, hi = irange
    if hi > lo:
        return []
    text = (f"the image is constant ({lo:g} everywhere): nothing tells its voxels apart, so "
            "every voxel gets the same class; check that the right image was opened")
    if ctx is not None:
        ctx.report(None, f"warning: {text}")
    return [text]
