"""The brush layer of the segmentation widget: which Labels layers to offer, a cheap check
before anything slow starts, and keeping it selected for the next stroke.

Brush convention: 0 = not annotated, 1 = background, 2, 3, ... = structures. A layer is
judged on a sample of its values (:func:`label_sample`), never a full scan of a large
array, so choosing and checking stay instant on the UI thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_lsmfm.widgets.parts import PLUGIN_KEY, LayerCombo

BRUSH_ROLE = "napari-lsmfm role"  # metadata of the layers "New brush layer" makes: "brushes"
BRUSH_VALUES = 16  # a brush layer holds at most this many values (0 included) ...
BRUSH_ZEROS = 0.5  # ... and is at least this fraction unpainted (0)
INSTANCE_VALUES = 65  # more sampled values than brushes may ever hold (64 classes and 0)
PAINT_MODES = ("paint", "erase", "fill")


def label_sample(data: Any, budget: int = 2**18) -> np.ndarray:
    """About ``budget`` values of a (Z, Y, X) labels array (numpy, dask, zarr, or a
    multiscale list: its smallest level): up to 16 planes, strided in y and x, read plane
    by plane, so a huge lazy array costs a few small reads."""
    if isinstance(data, (list, tuple)):
        data = data[-1]
    shape = tuple(int(s) for s in data.shape)
    if len(shape) < 3:
        return np.asarray(data[:: max(1, int(np.prod(shape) // budget))]).ravel()
    planes = np.unique(np.linspace(0, shape[-3] - 1, min(16, shape[-3])).astype(int))
    step = max(1, int(np.sqrt(len(planes) * shape[-2] * shape[-1] / budget)))
    lead = (0,) * (len(shape) - 3)
    return np.concatenate([np.asarray(data[(*lead, int(z), slice(None, None, step),
                                            slice(None, None, step))]).ravel()
                           for z in planes])


def brush_like(layer: Any) -> bool:
    """True for a layer to paint brushes in: made by "New brush layer", or (sampled) few
    values and mostly unpainted; False for instance labels and the plugin's results."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get(BRUSH_ROLE) == "brushes":
        return True
    if meta.get(PLUGIN_KEY):
        return False
    values = label_sample(layer.data)
    return len(np.unique(values)) <= BRUSH_VALUES and np.mean(values == 0) >= BRUSH_ZEROS


def check_brush_layer(layer: Any, image_shape: tuple[int, ...]) -> None:
    """ValueError saying what to do when ``layer`` cannot be brushes for an image of
    ``image_shape`` (Z, Y, X): none chosen, another shape, or instance labels (sampled)."""
    new = "press New brush layer and paint 1 = background, 2 = structure on a few slices"
    if layer is None:
        raise ValueError(f"no brush layer: {new}")
    shape = tuple(int(s) for s in np.shape(layer.data[0] if layer.multiscale else layer.data))
    if shape[-3:] != tuple(image_shape[-3:]):
        raise ValueError(f"'{layer.name}' has shape {shape}, the image {tuple(image_shape)}: "
                         f"brushes must match the image; {new}")
    found = len(np.unique(label_sample(layer.data)))
    if found > INSTANCE_VALUES:
        raise ValueError(f"'{layer.name}' holds {found} or more different values: it looks "
                         f"like instance labels (a ground truth), not brushes; {new}")


def keep_selected(viewer: Any, layer: Any) -> None:
    """Make ``layer`` the viewer's only selected (active) layer, ready to paint: napari
    selects every layer it adds, which would leave the next stroke nowhere."""
    if layer is None or layer not in viewer.layers:
        return
    viewer.layers.selection.active = layer
    if layer.mode not in PAINT_MODES:
        layer.mode = "paint"


class BrushCombo(LayerCombo):
    """The Labels layers to paint brushes in: those "New brush layer" made first, then the
    other brush-like ones (:func:`brush_like`), then the rest. It never picks a layer that
    is not brush-like by itself: with none, it shows ``placeholder`` and no choice."""

    def __init__(self, viewer: Any, placeholder: str) -> None:
        self._rank: dict[int, int] = {}  # id(layer.data) -> 0 made here, 1 brush-like, 2 not
        super().__init__(viewer, "Labels")
        self.setPlaceholderText(placeholder)

    def _names(self) -> list[str]:
        layers = [lyr for lyr in self.viewer.layers if lyr.__class__.__name__ == "Labels"]
        rank = {}
        for lyr in layers:  # sampled once per array: painting does not change the verdict
            key = id(lyr.data)
            if key not in self._rank:
                made = (getattr(lyr, "metadata", {}) or {}).get(BRUSH_ROLE) == "brushes"
                self._rank[key] = 0 if made else 1 if brush_like(lyr) else 2
            rank[key] = self._rank[key]
        self._rank = rank
        return [lyr.name for lyr in sorted(layers, key=lambda lyr: rank[id(lyr.data)])]

    def _default(self, names: list[str]) -> int:
        first = self.viewer.layers[names[0]] if names else None
        return 0 if first is not None and self._rank.get(id(first.data), 2) < 2 else -1
