"""What a prediction returns (:class:`SegmentationResult`) and how it is filled block
by block (:class:`ResultWriter`): class map, probabilities, uncertainty, instances."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_lsmfm.tasks.base import LayerData, TaskResult
from napari_lsmfm.tasks.instances import split_instances

from .labels import class_dtype

__all__ = ["ResultWriter", "SegmentationResult", "check_class_dtype", "class_instances",
           "instance_classes", "normalized_entropy", "probability_dtype"]


@dataclass
class SegmentationResult(TaskResult):
    """What a prediction returns (arrays cover ``region`` of the image, all of it by default).

    classes: (Z, Y, X) uint8 / uint16 / uint32 (the smallest holding every class value,
        :func:`~.labels.class_dtype`) with the brushed class values, background 0.
    probabilities: (C, Z, Y, X) per-class probabilities (float32, float16, or uint8 where
        255 = 1), channel i for ``channel_values[i]`` (channel 0 = background); or None.
    uncertainty: (Z, Y, X) float32 normalised entropy in [0, 1]; or None.
    instances: (Z, Y, X) uint32 object ids for the classes asked for; or None.
    region: the (z, y, x) slices of the image the arrays cover; None = all of it.
    stats: numbers about the run ("voxels", "predict_seconds"; ``segment`` adds "fit"
        and "segmenter").
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

    def layers(self, name: str = "image", *, scale: Any = None,
               translate: Any = None) -> list[LayerData]:
        """napari layers, the class map first: ``"{name} segmentation"`` (labels), then,
        where present and hidden, ``"{name} uncertainty"``, one ``"{name} probability
        {value}"`` per class (background left out) and ``"{name} instances"`` (labels).
        ``scale`` / ``translate``: the source image layer's (shifted to ``region``)."""
        geometry = self.geometry(scale, translate)
        out: list[LayerData] = [(self.classes, {"name": f"{name} segmentation", **geometry},
                                 "labels")]
        if self.uncertainty is not None:
            out.append((self.uncertainty, {
                "name": f"{name} uncertainty", "colormap": "magma", "blending": "additive",
                "opacity": 0.5, "visible": False, "contrast_limits": (0.0, 1.0), **geometry,
            }, "image"))
        if self.probabilities is not None:
            for i, value in enumerate(self.channel_values):
                if value == 0:
                    continue
                out.append((self.probabilities[i], {
                    "name": f"{name} probability {value}", "colormap": "green",
                    "blending": "additive", "visible": False, **geometry,
                }, "image"))
        if self.instances is not None:
            out.append((self.instances, {"name": f"{name} instances", **geometry}, "labels"))
        return out


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy over channels (axis 0) divided by its maximum, log(C): float32 in [0, 1]
    (0 = certain, 1 = every class equally likely)."""
    p = np.clip(probs, 1e-7, 1.0)
    h = -(p * np.log(p)).sum(0)
    return (h / math.log(max(probs.shape[0], 2))).astype(np.float32)


def probability_dtype(probabilities: bool | str) -> Any:
    """The dtype asked for by ``probabilities`` (True = float32; False / None = none)."""
    if probabilities is False or probabilities is None:
        return None
    if probabilities is True:
        return np.float32
    names = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
    if probabilities not in names:
        raise ValueError(f"probabilities must be True, False, or one of {sorted(names)}")
    return names[probabilities]


def check_out(array: Any, shape: Sequence[int], name: str) -> None:
    """Raise ValueError unless the ``out[name]`` array given has ``shape``."""
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"out[{name!r}] has shape {tuple(array.shape)}, expected {tuple(shape)}")


def check_class_dtype(dtype: Any, channel_values: Sequence[int]) -> None:
    """Raise ValueError, before any work, unless a class map of ``dtype`` holds every one
    of ``channel_values`` (a narrower one would wrap them: 70000 in uint16 is 4464)."""
    dtype = np.dtype(dtype)
    top = max(int(v) for v in channel_values)
    if dtype.kind not in "iu" or top > np.iinfo(dtype).max:
        raise ValueError(
            f"the class map is {dtype} but the class values go up to {top}; give a "
            f"{class_dtype(channel_values)} array (out['classes'])"
        )


class ResultWriter:
    """The output arrays of one prediction over a region of ``shape`` (Z, Y, X), and the
    sink that fills them from blocks of probabilities.

    ``out`` arrays ("classes", "probabilities", "uncertainty") are filled in place
    (e.g. zarr); missing ones are allocated as numpy (classes in
    :func:`~.labels.class_dtype` of the values: uint8, uint16 above 255, uint32 above
    65535; probabilities in ``probability_dtype(probabilities)``; uncertainty float32).
    A given "classes" array too narrow for the class values is refused (ValueError).
    """

    def __init__(self, shape: Sequence[int], channel_values: Sequence[int],
                 out: Mapping[str, Any], probabilities: bool | str, uncertainty: bool) -> None:
        shape = tuple(int(s) for s in shape)
        n_out = len(channel_values)
        cdtype = class_dtype(channel_values)
        pdtype = probability_dtype(probabilities)
        self.classes = out.get("classes")
        if self.classes is None:
            self.classes = np.zeros(shape, cdtype)
        check_class_dtype(self.classes.dtype, channel_values)
        self.probabilities = out.get("probabilities")
        if pdtype is not None and self.probabilities is None:
            self.probabilities = np.zeros((n_out, *shape), pdtype)
        self.uncertainty = out.get("uncertainty")
        if uncertainty and self.uncertainty is None:
            self.uncertainty = np.zeros(shape, np.float32)
        check_out(self.classes, shape, "classes")
        if self.probabilities is not None:
            check_out(self.probabilities, (n_out, *shape), "probabilities")
        if self.uncertainty is not None:
            check_out(self.uncertainty, shape, "uncertainty")
        self.lut = np.asarray(channel_values, np.int64)

    def __call__(self, sl: tuple[slice, ...], probs: np.ndarray) -> None:
        """Write the block ``sl`` (slices of the region) from ``probs`` (C, z, y, x) float32."""
        self.classes[sl] = self.lut[np.argmax(probs, 0)].astype(self.classes.dtype, copy=False)
        if self.probabilities is not None:
            p = probs
            if np.dtype(self.probabilities.dtype) == np.uint8:
                p = np.round(probs * 255.0)
            self.probabilities[(slice(None), *sl)] = p.astype(self.probabilities.dtype,
                                                               copy=False)
        if self.uncertainty is not None:
            self.uncertainty[sl] = normalized_entropy(probs)

    def result(self, channel_values: Sequence[int], **fields: Any) -> SegmentationResult:
        """The result holding these arrays (``fields``: instances, region, stats)."""
        return SegmentationResult(classes=self.classes, probabilities=self.probabilities,
                                  uncertainty=self.uncertainty,
                                  channel_values=tuple(channel_values), **fields)


def instance_classes(request: bool | Sequence[int], classes: Sequence[int]) -> tuple[int, ...]:
    """The classes to split into objects: all for True, else those given (each must be one
    of the model's ``classes``)."""
    wanted = tuple(classes) if request is True else tuple(int(c) for c in request)
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise ValueError(f"no class {unknown} in this model (classes {tuple(classes)})")
    return wanted


def class_instances(classes: Any, wanted: Sequence[int], voxel_size: Sequence[float] | None,
                    target: Any = None, *, probabilities: Any = None,
                    channel_values: Sequence[int] | None = None,
                    diameter: float | None = None) -> Any:
    """Objects of the classes ``wanted`` in a class map (Z, Y, X): uint32 ids, unique
    across classes, 0 elsewhere; written into ``target`` when given (and returned).

    ``probabilities`` (C, Z, Y, X; float or uint8) with their ``channel_values``: each
    class's probability, so a dip between touching objects helps split them;
    ``diameter``: the objects' typical diameter in micrometres (as ``voxel_size``)."""
    labels = np.asarray(classes)
    result = np.zeros(labels.shape, np.uint32)
    offset = 0
    for value in wanted:
        prob = None
        if probabilities is not None and channel_values is not None:
            prob = np.asarray(probabilities[list(channel_values).index(value)])
        inst = split_instances(labels == value, voxel_size=voxel_size, probability=prob,
                               diameter=diameter)
        inst[inst > 0] += offset
        offset = max(offset, int(inst.max()))
        result = np.maximum(result, inst)
    if target is not None:
        check_out(target, labels.shape, "instances")
        target[...] = result
        return target
    return result
