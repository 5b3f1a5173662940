"""Click corrections of a prediction (seed: VISTA3D), and the simulated expert who clicks.

A positive click says "this voxel belongs to the object", a negative one "this voxel is
background". :class:`ClickCorrector` turns every click so far into a few extra sparse
labels (a ball of ``radius`` voxels: the object's class, or background 1), conditions the
segmenter's quick model on them with a residual correction fitted in a few steps on the
cached features (:mod:`napari_lsmfm.tasks.segment.residual`; anchored by the
segmenter's own strokes, so what they say stays true) and re-predicts only the box of
``reach`` voxels around the click. Where the click is about a border (``wand``, the
default), the change is the zone the click stands for, flooded from the clicked voxel
through voxels the model was no surer of than there: a positive click adds the connected
missed rim or object, a negative one takes off the connected, no deeper part of the
object on the click's side. The segmenter itself is never changed; nothing is
recomputed of the foundation features of a cached volume.

:func:`simulate_click` is the expert of the benchmarks and tests (the VISTA3D rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from napari_lsmfm.review.objects import ReviewError
from napari_lsmfm.tasks.segment import SparseLabels
from napari_lsmfm.tasks.segment.features import image_key
from napari_lsmfm.tasks.segment.residual import (
    Residual,
    fit_residual,
    head_inputs,
    model_probabilities,
    region_inputs,
)

__all__ = ["ANCHORS", "LOCAL", "LOCAL_WEIGHT", "MAX_REACH", "MIN_REACH", "REACH_FACTOR",
           "STEPS", "STRENGTH", "WAND", "WAND_FLOOR", "ClickCorrector", "simulate_click"]

REACH_FACTOR = 1.5  # the box around a click: this many object diameters
MIN_REACH, MAX_REACH = 8, 96  # voxels per axis
DEFAULT_DIAMETER = 16  # voxels, when no object tells the size
STEPS = 30  # residual training steps per click
STRENGTH = 1.0  # weight of the clicks' loss against the anchors'
ANCHORS = 20_000  # anchor voxels (strokes, or the model's own prediction)
LOCAL, LOCAL_WEIGHT = 2_000, 1.0  # region voxels keeping the model's answer, their weight
WAND, WAND_FLOOR = 0.05, 0.1  # the click's flood: probability tolerance, lowest probability


class ClickCorrector:
    """Re-predicts the neighbourhood of a click with the segmenter conditioned on clicks.

    Args:
        segmenter: a trained quick-mode :class:`~napari_lsmfm.tasks.segment.Segmenter`
            (not changed; a later retrain of it is picked up at the next click).
        image: the (Z, Y, X) volume it segmented.
        reach: the box around a click, in voxels (one number or z, y, x); None = about
            ``REACH_FACTOR`` times the diameter of the object at (or nearest) the click.
        radius: clicked voxels: a ball of this radius (voxels) around the point.
        steps: residual training steps per click (None: ``STEPS``).
        strokes: the anchors: training strokes on this image (a :class:`SparseLabels` or
            brush array); None = the segmenter's last fit's when it was on this image,
            else (a loaded model, another image) its own prediction on a sample of it.
        strength: weight of the clicks against the anchors.
        wand: the flood's probability tolerance (:meth:`_wand`; tuned on the validation
            split of ``benchmarks/review.py``); None = the conditioned model's mask alone.
    """

    def __init__(self, segmenter: Any, image: Any, *, reach: int | Sequence[int] | None = None,
                 radius: int = 1, steps: int | None = None, strokes: Any = None,
                 strength: float = STRENGTH, wand: float | None = WAND) -> None:
        if getattr(segmenter, "config", None) is None or segmenter.config.mode != "quick":
            raise ValueError("click corrections need a quick-mode segmenter")
        if not segmenter.trained:
            raise ValueError("the segmenter is not trained yet: train it before correcting")
        if int(radius) < 0:
            raise ValueError(f"radius must be 0 or more voxels, got {radius}")
        self.segmenter, self.image = segmenter, image
        self.shape = tuple(int(s) for s in image.shape)
        if strokes is not None and not isinstance(strokes, SparseLabels):
            strokes = SparseLabels.from_array(strokes, self.shape)
        if strokes is not None and tuple(strokes.image_shape) != self.shape:
            raise ValueError(f"the strokes were made for shape {tuple(strokes.image_shape)}, "
                             f"the image is {self.shape}")
        self.reach = None if reach is None else _triple(reach)
        self.radius, self.strength = int(radius), float(strength)
        self.wand = None if wand is None else float(wand)
        self.steps = STEPS if steps is None else int(steps)
        self._strokes = strokes
        self._irange = None if segmenter.features(image) is not None \
            else segmenter.foundation.intensity_range(image)
        self.clicks: list[tuple[tuple[int, int, int], int]] = []  # (point, brush value)
        self._click_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._head = None
        self._residual: Residual | None = None
        self._anchors: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # ----------------------------------------------------------------- public

    def correct(self, session: Any, point: Sequence[float], positive: bool
                ) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """Condition on one more click at ``point`` (z, y, x voxels) and re-predict its
        neighbourhood: returns (region, mask), ``mask`` the boolean foreground of the
        clicked object's class (``session.record(id).cls``; class 2 / the first class
        without one) inside the box ``region``. ``session``: a ReviewSession (its labels
        and records give the object and its size) or None."""
        p = self._point(point)
        search = self._box(p, self._search_reach())
        near = None if session is None else np.asarray(session.labels[search])
        obj = _object_near(near, tuple(c - s.start for c, s in zip(p, search, strict=True)))
        cls = self._object_class(session, obj)
        region = self._box(p, self.reach or self._reach_of(near, obj))
        self._sync()
        if session is not None:
            self._forget_undone(session.clicks)
        self._add_click(p, cls if positive else 1)
        base = self.segmenter.predict(self.image, region=region, probabilities="float32",
                                      uncertainty=False).probabilities
        feats = region_inputs(self.segmenter, self.image, region, self._irange)
        k = base.shape[0]
        feats = feats.reshape(feats.shape[0], -1).T
        base = np.asarray(base, np.float32).reshape(k, -1).T
        self._residual = fit_residual(
            self._residual, [(self._anchors, 1.0), (self._local(feats, base), LOCAL_WEIGHT),
                             (self._clicks_now(), self.strength)],
            steps=self.steps, seed=len(self.clicks))
        shape = tuple(s.stop - s.start for s in region)
        local = tuple(c - s.start for c, s in zip(p, region, strict=True))
        if self.wand is not None and session is not None:
            prob = base[:, self.segmenter.channel_values.index(cls)].reshape(shape)
            zone = self._wand(np.asarray(session.labels[region]), prob, local, obj, positive)
            if zone is not None:  # the conditioned model's mask is not needed then
                return region, zone
        return region, self._region_mask(region, shape, feats, base, cls)

    def _forget_undone(self, live: Sequence[tuple[Sequence[int], bool]]) -> None:
        """Drop the clicks the session no longer has in force (undone)."""
        left = [(tuple(int(c) for c in p), bool(pos)) for p, pos in live]
        keep = []
        for i, (p, value) in enumerate(self.clicks):
            if (p, value != 1) in left:
                left.remove((p, value != 1))
                keep.append(i)
        if len(keep) != len(self.clicks):
            self.clicks = [self.clicks[i] for i in keep]
            self._click_parts = [self._click_parts[i] for i in keep]

    def reset(self) -> None:
        """Forget every click (the model's own prediction again)."""
        self.clicks, self._click_parts, self._head = [], [], None

    # ---------------------------------------------------------------- helpers

    def _point(self, point: Sequence[float]) -> tuple[int, int, int]:
        p = np.round(np.asarray(point, np.float64)).astype(np.int64).reshape(-1)
        if len(p) != 3:
            raise ReviewError(f"a click needs three coordinates (z, y, x), got {len(p)}")
        if (p < 0).any() or (p >= np.asarray(self.shape)).any():
            raise ReviewError(f"the click {tuple(int(v) for v in p)} lies outside the image "
                             f"of shape {self.shape}")
        return tuple(int(v) for v in p)

    def _box(self, p: tuple[int, int, int], reach: tuple[int, int, int]
             ) -> tuple[slice, slice, slice]:
        out = []
        for c, r, n in zip(p, reach, self.shape, strict=True):
            r = min(int(r), n)
            lo = min(max(0, c - r // 2), n - r)
            out.append(slice(lo, lo + r))
        return tuple(out)  # type: ignore[return-value]

    def _spacing(self) -> np.ndarray:
        vs = self.segmenter.config.voxel_size
        return np.asarray(vs if vs is not None else (1.0, 1.0, 1.0), np.float64)

    def _search_reach(self) -> tuple[int, int, int]:
        """The box searched for the clicked object: MAX_REACH voxels along x, the same
        length in micrometres along the other axes."""
        sp = self._spacing()
        return tuple(int(max(MIN_REACH, round(MAX_REACH * sp[2] / v))) for v in sp
                     )  # type: ignore[return-value]

    def _reach_of(self, near: np.ndarray | None, obj: int) -> tuple[int, int, int]:
        """REACH_FACTOR times the object's local diameter (twice its largest inscribed
        radius, in the search box), per axis in voxels."""
        sp = self._spacing()
        if near is not None and obj:
            inside = np.pad(near == obj, 1)
            d_um = 2.0 * float(ndi.distance_transform_edt(inside, sampling=sp).max())
        else:
            d = self.segmenter.config.object_diameter
            d_um = float(d) if d is not None else DEFAULT_DIAMETER * sp[2]
        return tuple(int(np.clip(math.ceil(REACH_FACTOR * d_um / v), MIN_REACH, MAX_REACH))
                     for v in sp)  # type: ignore[return-value]

    def _local(self, feats: np.ndarray, base: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local anchors: a sample of the region's voxels with the model's own answer."""
        rng = np.random.default_rng(len(self.clicks))
        idx = rng.choice(len(base), size=min(LOCAL, len(base)), replace=False)
        return feats[idx], base[idx], np.argmax(base[idx], 1)

    def _object_class(self, session: Any, obj: int) -> int:
        classes = self.segmenter.classes
        if obj and session is not None:
            cls = int(session.record(obj).cls)
            if cls in classes:
                return cls
        return 2 if 2 in classes else int(classes[0])

    def _sync(self) -> None:
        """(Re)build the anchors and the residual when the segmenter's model changed."""
        seg = self.segmenter
        if self._head is seg.head and self._anchors is not None:
            return
        strokes = self._strokes
        if strokes is None and seg.strokes is not None \
                and seg.strokes_image == image_key(self.image):
            strokes = seg.strokes  # trained on this image: its strokes anchor
        if strokes is not None:
            strokes = strokes.subsample(ANCHORS, seg.config.seed)
            targets = strokes.targets(seg.classes)
            coords = strokes.coords[targets >= 0]
            targets = targets[targets >= 0]
            feats = head_inputs(seg, self.image, coords, self._irange)
            probs = model_probabilities(seg, feats)
        else:  # a loaded model: its own prediction on a sample of the volume
            rng = np.random.default_rng(seg.config.seed)
            coords = np.stack([rng.integers(0, n, ANCHORS) for n in self.shape], 1)
            feats = head_inputs(seg, self.image, coords, self._irange)
            probs = model_probabilities(seg, feats)
            targets = np.argmax(probs, 1)
        self._anchors = (feats, probs, targets)
        self._residual = Residual(feats, np.log(np.clip(probs, 1e-4, 1.0)))
        self._head = seg.head
        self._click_parts = [self._click_part(c, v) for c, v in self.clicks]

    def _ball(self, p: tuple[int, int, int]) -> np.ndarray:
        r = self.radius
        offs = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1)
        offs = offs.reshape(-1, 3)
        offs = offs[(offs**2).sum(1) <= r * r]
        pts = offs + np.asarray(p)
        inside = ((pts >= 0) & (pts < np.asarray(self.shape))).all(1)
        return pts[inside]

    def _click_part(self, p, value) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seg = self.segmenter
        coords = self._ball(p)
        feats = head_inputs(seg, self.image, coords, self._irange)
        target = 0 if value == 1 else 1 + seg.classes.index(value)
        return feats, model_probabilities(seg, feats), np.full(len(coords), target, np.int64)

    def _add_click(self, p: tuple[int, int, int], value: int) -> None:
        self.clicks.append((p, int(value)))
        self._click_parts.append(self._click_part(p, value))

    def _clicks_now(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.concatenate([part[i] for part in self._click_parts])
                     for i in range(3))  # type: ignore[return-value]

    def _wand(self, labels: np.ndarray, prob: np.ndarray, local: tuple[int, int, int],
              obj: int, positive: bool) -> np.ndarray | None:
        """The zone a click stands for, flooded from the clicked voxel through voxels the
        model is no surer of than there (``prob``: its probability of the object's class,
        before the clicks): a negative click on object ``obj`` takes off the connected
        part of it at most ``wand`` more probable than the click (a halo or a lobe; the
        surer core stays); a positive click adds the connected background at least as
        probable, less ``wand`` (a missed rim or object). Returns the mask for
        :func:`~napari_lsmfm.review.edits.apply_click`, None when the wand does not apply
        (a negative click off every object)."""
        at = float(prob[local])
        if not positive:
            own = labels == obj
            if not own[local]:
                return None
            # no deeper than the click either: a confident click takes off a halo, not the
            # object it surrounds
            sp = self._spacing()
            depth = ndi.distance_transform_edt(np.pad(own, 1, mode="edge"),
                                               sampling=sp)[1:-1, 1:-1, 1:-1]
            near = np.zeros(own.shape, bool)  # and on the click's side of the object
            near[local] = True
            near = ndi.distance_transform_edt(~near, sampling=sp) <= depth.max()
            comp, _ = ndi.label(own & near & (prob <= at + self.wand)
                                & (depth <= depth[local] + 0.5 * sp.min()))
            return ~(comp == comp[local])
        comp, _ = ndi.label((labels == 0) & (prob >= max(WAND_FLOOR, at - self.wand)))
        zone = comp == comp[local] if comp[local] else np.zeros(labels.shape, bool)
        zone[local] = True
        return zone

    def _region_mask(self, region: tuple[slice, slice, slice], shape: tuple[int, ...],
                     feats: np.ndarray, base: np.ndarray, cls: int) -> np.ndarray:
        flat = self._residual.probabilities(feats, base)
        index = self.segmenter.channel_values.index(cls)
        mask = (np.argmax(flat, 1) == index).reshape(shape)
        lo = np.array([s.start for s in region])
        hi = np.array([s.stop for s in region])
        for p, value in self.clicks:  # the clicked voxels as the expert said
            pts = self._ball(p)
            pts = pts[((pts >= lo) & (pts < hi)).all(1)] - lo
            if value == cls:
                mask[tuple(pts.T)] = True
            elif value == 1:
                mask[tuple(pts.T)] = False
        return mask


def _triple(reach: int | Sequence[int]) -> tuple[int, int, int]:
    r = (int(reach),) * 3 if np.isscalar(reach) else tuple(int(v) for v in reach)
    if len(r) != 3 or min(r) < 1:
        raise ValueError(f"reach must be one or three positive voxel counts, got {reach}")
    return r  # type: ignore[return-value]


def _object_near(labels: np.ndarray | None, local: tuple[int, int, int]) -> int:
    """The object at ``local`` in ``labels`` or, when none, the nearest one; 0 when none."""
    if labels is None:
        return 0
    if labels[local] or not labels.any():
        return int(labels[local])
    idx = ndi.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
    return int(labels[tuple(idx[(slice(None), *local)])])


def simulate_click(pred_fg: np.ndarray, truth_fg: np.ndarray, rng: np.random.Generator
                   ) -> tuple[tuple[int, int, int], bool] | None:
    """The simulated expert's next click (the VISTA3D rule): the largest connected
    component of the errors after a 3x3x3 erosion (the errors as they are when the
    erosion leaves nothing), a random voxel of it, positive when false negatives
    outnumber false positives in that component. Returns ((z, y, x), positive), or None
    when the prediction has no error."""
    pred_fg, truth_fg = np.asarray(pred_fg, bool), np.asarray(truth_fg, bool)
    if pred_fg.shape != truth_fg.shape:
        raise ValueError(f"the masks differ in shape: {pred_fg.shape} and {truth_fg.shape}")
    error = pred_fg != truth_fg
    if not error.any():
        return None
    cube = np.ones((3, 3, 3), bool)
    core = ndi.binary_erosion(error, structure=cube)
    if not core.any():
        core = error
    comps, n = ndi.label(core, structure=cube)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)
    sizes[0] = 0
    biggest = comps == int(np.argmax(sizes))
    fn = int((biggest & truth_fg).sum())
    fp = int(biggest.sum()) - fn
    # the click lands on the kind of error it corrects (a component can hold both, where
    # an object sits shifted: missed on one side, too much on the other)
    where = np.flatnonzero((biggest & (truth_fg if fn > fp else ~truth_fg)).ravel())
    flat = int(where[rng.integers(len(where))])
    point = tuple(int(v) for v in np.unravel_index(flat, error.shape))
    return point, fn > fp  # type: ignore[return-value]
