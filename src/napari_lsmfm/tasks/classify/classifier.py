"""The :class:`Classifier`: sorts objects, points or tiles into classes from a few examples
(a probe on the foundation's embeddings), from words (prompts in the image-text space),
or both (prompts as priors, examples as evidence), and says ``unknown`` for what matches
no class. Made of the shared parts: the foundation's one normalisation, the training
loop, the saved-model format; :mod:`.embed`, :mod:`.probe`, :mod:`.prompts`,
:mod:`.openset` hold the steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.engine.grid import as_triple, region_box
from napari_lsmfm.engine.jobs import span
from napari_lsmfm.engine.train import FitReport
from napari_lsmfm.io.check import check_volume
from napari_lsmfm.tasks.heads import ForestHead

from . import saved
from .config import ClassifyConfig
from .embed import ItemFeatures, embed_items
from .examples import Examples, Items, object_items, point_items, tile_items
from .mix import forest_share, mixed_logits
from .openset import OpenSet, graph_columns, prototype_scores
from .probe import Probe, pseudo_labelled, train_probe
from .prompts import describe, parse_prompts, text_prototypes
from .result import ClassificationResult

__all__ = ["Classifier"]

CACHE_ENTRIES = 4  # item features of this many inputs are kept


def _key(image: Any, source: Any, kind: str, extra: Any) -> tuple:
    from napari_lsmfm.tasks.segment.features import image_key

    other = image_key(source) if isinstance(source, np.ndarray) else (id(source), None)
    return (image_key(image), other, kind, extra)


class Classifier:
    """Classify objects of a labels layer, points or tiles of a volume.

    >>> clf = Classifier(foundation)
    >>> clf.fit(image, Examples(points, names), objects=labels)   # few-shot
    >>> result = clf.predict(image, objects=labels)               # ClassificationResult
    >>> Classifier(foundation, prompts=("nucleus", "vessel")).fit(image)   # zero-shot
    >>> clf.save("probe"); Classifier.load("probe", foundation)
    """

    task = "classify"

    def __init__(self, foundation: Any, config: ClassifyConfig | None = None,
                 **overrides: Any) -> None:
        if config is None:
            config = ClassifyConfig(**overrides)
        elif overrides:
            config = ClassifyConfig.from_dict({**config.to_dict(), **overrides})
        self.foundation = foundation
        self.config = config
        self.mode: str | None = None  # "objects", "points", "tiles"; None: any (zero-shot)
        self.class_names: tuple[str, ...] = ()
        self.probe: Probe | None = None
        self.forest: ForestHead | None = None  # on the hand-made measures, mixed with the probe
        self.forest_weight = 0.0  # the forest's share of the class probabilities
        self.openset: OpenSet | None = None
        self.text: np.ndarray | None = None  # (C, P) class text embeddings
        self.text_rows: tuple[int, ...] = ()  # class index of each text row
        self.prompt_weight = 1.0
        self.history: list[float] = []
        self._cache: dict[tuple, ItemFeatures] = {}
        self._ranges: dict[tuple, tuple[float, float]] = {}

    @property
    def trained(self) -> bool:
        return bool(self.class_names)

    @property
    def device(self) -> Any:
        return self.foundation.device

    def to_device(self, device: Any = "auto") -> Classifier:
        """Run on ``device`` (auto / cpu / cuda:N / mps): moves the foundation (shared with
        whoever passed it); the probe is small and runs where its inputs are."""
        self.foundation.to_device(device)
        return self

    # ----------------------------------------------------------------- features
    def _irange(self, image: Any) -> tuple[float, float]:
        from napari_lsmfm.tasks.segment.features import image_key

        key = image_key(image)
        if key not in self._ranges:
            self._ranges = {key: self.foundation.intensity_range(image)}
        return self._ranges[key]

    def items(self, image: Any, *, objects: Any = None, points: Any = None,
              tiles: Any = None) -> Items:
        """The items of one input kind (exactly one of ``objects`` (a labels array),
        ``points`` ((N, 3) z, y, x voxels) or ``tiles`` (a size, voxels))."""
        given = [k for k, v in (("objects", objects), ("points", points), ("tiles", tiles))
                 if v is not None]
        if len(given) != 1:
            raise ValueError("give one of objects= (a labels layer), points= (z, y, x) or "
                             f"tiles= (a tile size); got {given or 'none'}")
        if objects is not None:
            if tuple(objects.shape) != tuple(image.shape):
                raise ValueError(f"the labels {tuple(objects.shape)} and the image "
                                 f"{tuple(image.shape)} must have the same shape")
            return object_items(objects)
        if points is not None:
            return point_items(points, image.shape)
        return tile_items(image.shape, as_triple(tiles, "tiles", positive=True))

    def features(self, image: Any, items: Items, ctx: Any = None) -> ItemFeatures:
        """:func:`~.embed.embed_items` of ``items`` (those of the last few inputs are cached:
        fitting on one volume and classifying another embeds each once)."""
        cfg = self.config
        extra = (cfg.patch, cfg.point_radius, cfg.voxel_size, items.tile, cfg.levels,
                 np.asarray(items.centres).tobytes())
        key = _key(image, items.mask_source, items.kind, extra)
        if key not in self._cache:
            feats = embed_items(self.foundation, image, items, self._irange(image),
                                patch=cfg.patch, voxel_size=cfg.voxel_size,
                                point_radius=cfg.point_radius, batch_size=cfg.batch_size,
                                levels=cfg.levels, ctx=ctx)
            while len(self._cache) >= CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = feats
        return self._cache[key]

    def clear_cache(self) -> None:
        self._cache.clear()
        self._ranges.clear()

    # --------------------------------------------------------------------- fit
    def fit(self, image: Any, targets: Examples | None = None, ctx: Any = None, *,
            objects: Any = None, tiles: Any = None) -> FitReport:
        """Learn the classes.

        Args:
            image: (Z, Y, X) numpy, dask or zarr volume.
            targets: :class:`~.examples.Examples` (positions z, y, x voxels and a class
                each); None: zero-shot from ``config.prompts`` alone.
            ctx: JobContext (progress; Stop during training keeps the best probe).
            objects: a labels array of the image's shape: examples are the objects under
                their positions (features masked by the object, plus shape measures);
                ``tiles``: a tile size: examples are the tiles holding them; neither: a
                window around each example point.

        Returns:
            A FitReport (extra: classes, counts, mode, threshold, calibrated,
            self_trained: whether the probe was fitted again with pseudo-labels).
        """
        t0 = time.perf_counter()
        check_volume(image, "classification")
        cfg = self.config
        if targets is None:
            return self._fit_prompts(t0)
        ex = targets if isinstance(targets, Examples) else Examples(*targets)
        ex.check()
        prompts = parse_prompts(cfg.prompts) if cfg.prompts else {}
        stray = [name for name in prompts if name not in ex.classes]
        if stray:
            raise ValueError(f"the prompt class {stray[0]!r} has no example; with examples, "
                             f"every prompt names one of their classes {ex.classes}")
        if objects is not None:
            items = self.items(image, objects=objects)
            index = _object_index(items, ex.points)
        elif tiles is not None:
            items = self.items(image, tiles=tiles)
            index = _tile_index(items, point_items(ex.points, image.shape).centres)
        else:
            items = self.items(image, points=ex.points)
            index = np.arange(len(ex.points))
        feats = self.features(image, items, span(ctx, 0.0, 0.8))
        names = list(ex.classes)
        targets_idx = np.array([names.index(n) for n in ex.names], np.int64)
        population = feats.probe_inputs
        x = population[index]
        *widths, measures = feats.probe_blocks
        train = {"population": population, "head": cfg.head, "hidden": cfg.hidden,
                 "steps": cfg.steps, "lr": cfg.lr, "l2": cfg.l2, "seed": cfg.seed,
                 "blocks": [(w, 1.0) for w in widths] + [(measures, cfg.measure_weight)]}
        probe, report = train_probe(x, targets_idx, len(names), ctx=span(ctx, 0.8, 0.9),
                                    **train)
        self_trained = bool(cfg.self_train > 0 and len(population) > len(x)
                            and min(ex.counts().values()) < cfg.self_train_below)
        rows, labels = index, targets_idx
        if self_trained:
            rows, labels = pseudo_labelled(probe, population, index, targets_idx, len(names),
                                           cfg.self_train)
            probe, report = train_probe(population[rows], labels, len(names),
                                        ctx=span(ctx, 0.9, 1.0), **train)
        self.forest, self.forest_weight, losses = None, 0.0, {}
        if cfg.forest_weight > 0 or cfg.choose_mix:
            self.forest_weight, losses = forest_share(cfg, feats, index, targets_idx, train)
            self.forest = ForestHead(measures, len(names), cfg.forest_trees, None,
                                     seed=cfg.seed).fit(feats.measures[rows], labels)
        z = self._standardized(probe, x)
        self.openset = OpenSet.fit(z, targets_idx, len(names), known_rate=cfg.known_rate,
                                   threshold=cfg.unknown_threshold,
                                   spread_from=graph_columns(x.shape[1], measures)
                                   if cfg.spread else None)
        self.probe, self.mode, self.class_names = probe, items.kind, tuple(names)
        self.text, self.text_rows = None, ()
        if prompts:
            self.text = text_prototypes(self.foundation, prompts)
            self.text_rows = tuple(names.index(n) for n in prompts)
            rarest = min(ex.counts().values())
            self.prompt_weight = cfg.prior_strength / (cfg.prior_strength + rarest)
        self.history = report.history
        return report.update(seconds=time.perf_counter() - t0, classes=list(names),
                             counts=ex.counts(), mode=items.kind,
                             threshold=self.openset.threshold,
                             calibrated=self.openset.calibrated, self_trained=self_trained,
                             forest_weight=self.forest_weight, mix_losses=losses)

    def _fit_prompts(self, t0: float) -> FitReport:
        if not self.config.prompts:
            raise ValueError("give examples (points or objects with a class) or prompts "
                             "(class names or descriptions) to classify")
        prompts = parse_prompts(self.config.prompts)
        if len(prompts) < 2:
            raise ValueError("one prompt names one class; zero-shot needs at least two (e.g. "
                             "'nucleus;blood vessel')")
        self.text = text_prototypes(self.foundation, prompts)
        self.text_rows = tuple(range(len(prompts)))
        self.class_names, self.mode, self.probe = tuple(prompts), None, None
        self.forest = None
        self.prompt_weight = 1.0
        threshold = self.config.unknown_threshold
        self.openset = None if threshold is None else OpenSet(self.text, threshold)
        return FitReport(best_loss=0.0, seconds=time.perf_counter() - t0).update(
            classes=list(prompts), zero_shot=True)

    @staticmethod
    def _standardized(probe: Probe, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return probe.standardize(torch.as_tensor(x)).numpy()

    # ----------------------------------------------------------------- predict
    def predict(self, image: Any, ctx: Any = None, *, region: Sequence[slice] | None = None,
                out: Mapping[str, Any] | None = None, objects: Any = None, points: Any = None,
                tiles: Any = None) -> ClassificationResult:
        """Classify the objects of ``objects`` (a labels array), the ``points`` ((N, 3) z, y, x
        voxels) or the tiles of size ``tiles`` of ``image`` (or of its ``region``: points
        are then relative to it). ``out``: {"map": array} to fill with the class map
        (objects: the labels' shape; tiles: tiles per axis) instead of a new one.
        Returns a :class:`ClassificationResult` in input order."""
        if not self.trained:
            raise ValueError("the classifier is not trained yet: give examples or prompts and "
                             "fit first")
        check_volume(image, "classification")
        t0 = time.perf_counter()
        box = None
        if region is not None:
            lo, hi = region_box(region, image.shape)
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            image = image[box]
            objects = objects[box] if objects is not None else None
        items = self.items(image, objects=objects, points=points, tiles=tiles)
        if self.mode is not None and items.kind != self.mode:
            arg = {"objects": "objects=", "points": "points=", "tiles": "tiles="}[self.mode]
            raise ValueError(f"this classifier learnt from {self.mode}; classify {self.mode} "
                             f"with it ({arg}), or train another on {items.kind}")
        feats = self.features(image, items, span(ctx, 0.0, 0.95))
        probs, scores, unknown = self.decide(feats)
        result = ClassificationResult(
            items.kind, self.class_names, items.centres, probs.argmax(1),
            probs.max(1).astype(np.float32), unknown, probs, scores, items.labels,
            items.mask_source, items.tile, items.grid, box,
            stats={"items": len(items), "seconds": time.perf_counter() - t0})
        if out is not None and out.get("map") is not None and items.kind != "points":
            target = out["map"]
            target[...] = np.asarray(result.class_map())
        if ctx is not None:
            ctx.report(1.0, f"classified {len(items)} {items.kind}")
        return result

    def decide(self, feats: ItemFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities (N, C) float32, open-set scores (N,), unknown (N,) bool) of items."""
        import torch

        n, c = len(feats.embedding), len(self.class_names)
        logits = np.zeros((n, c), np.float64)
        scores = np.full(n, np.nan, np.float32)
        unknown = np.zeros(n, bool)
        if self.probe is not None:
            x = torch.as_tensor(feats.probe_inputs)
            with torch.no_grad():
                logits += self.probe(x).double().numpy()
            if self.forest is not None:
                logits = mixed_logits(logits, self.forest.probabilities(feats.measures),
                                      self.forest_weight)
            z = self._standardized(self.probe, feats.probe_inputs)
            scores, unknown = self.openset.judge(z)
            scores = scores.astype(np.float32)
        if self.text is not None:
            scale = math.exp(min(float(self.foundation.logit_scale or math.log(10.0)),
                                 math.log(100.0)))
            sims = prototype_scores(feats.embedding, self.text)
            logits[:, list(self.text_rows)] += self.prompt_weight * scale * sims
            if self.probe is None:
                scores = sims.max(1).astype(np.float32)
        if self.probe is None and self.openset is not None:
            unknown = scores < self.openset.threshold
        if not self.config.open_set:
            unknown = np.zeros(n, bool)
        logits -= logits.max(1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(1, keepdims=True)
        return probs.astype(np.float32), scores, unknown

    def describe(self, image: Any, ctx: Any = None, *, top: int = 3, **inputs: Any
                 ) -> list[list[tuple[str, float]]]:
        """The nearest caption descriptions of each object, point or tile (``objects=`` /
        ``points=`` / ``tiles=``) through the text tower, or "unknown" when none is near
        (:func:`~.prompts.describe`); input order."""
        check_volume(image, "classification")
        feats = self.features(image, self.items(image, **inputs), ctx)
        return describe(self.foundation, feats.embedding, top=top)

    # --------------------------------------------------------------- save/load
    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Save the probe, prototypes, threshold and prompts (the engine's saved-model
        format: config.json plus safetensors); returns the folder."""
        if not self.trained:
            raise ValueError("nothing to save: the classifier is not trained yet")
        return saved.save_classifier(self, folder, overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, foundation: Any = None, *, device: str | None = None
             ) -> Classifier:
        """Load a saved classifier; ``foundation``: the one it was trained on (checked by its
        weights' fingerprint); None loads the one it names (the embedded default or a path)."""
        return saved.load_classifier(cls, folder, foundation, device)


def _object_index(items: Items, points: np.ndarray) -> np.ndarray:
    """The item index of the object under each example point (ValueError when none)."""
    pts = point_items(points, items.mask_source.shape).centres
    where = {int(v): i for i, v in enumerate(items.labels)}
    index = []
    for p in pts:
        c = tuple(int(v) for v in np.clip(np.round(p), 0, np.asarray(items.mask_source.shape) - 1))
        value = int(np.asarray(items.mask_source[c]))
        if value == 0:
            raise ValueError(f"the example at z,y,x = {', '.join(f'{v:g}' for v in p)} is not on "
                             "an object of the labels layer; put it inside an object")
        index.append(where[value])
    return np.asarray(index, np.int64)


def _tile_index(items: Items, points: np.ndarray) -> np.ndarray:
    lo, hi = items.boxes[:, :, 0], items.boxes[:, :, 1]
    out = []
    for p in np.round(points):
        inside = np.flatnonzero(((lo <= p) & (p < hi)).all(1))
        out.append(int(inside[0]))
    return np.asarray(out, np.int64)
