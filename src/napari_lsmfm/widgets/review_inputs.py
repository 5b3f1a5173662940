"""What the review widget reads: the layers it is given or finds by name, and the keys
and clicks on the reviewed layer.

:func:`session_inputs` gathers a ReviewSession's arguments from the viewer's layers;
:func:`bind_keys` puts the review keys on the reviewed layer (they work while it is the
active layer in the canvas, as the dock's own shortcuts do while the dock has focus);
:func:`click_callback` turns a click on it into a click correction.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import numpy as np

from napari_lsmfm.widgets.parts import LayerCombo, image_data

NONE = "none"

# key -> method; napari's spelling of the same keys binds them on the reviewed layer
KEYS = {"A": "accept", "R": "reject", "L": "relabel", "M": "merge", "S": "split",
        "N": "next_object", "P": "previous_object", "Ctrl+Z": "undo", "Ctrl+Shift+Z": "redo"}


class OptionalLayerCombo(LayerCombo):
    """A LayerCombo whose first choice is "none" (the default)."""

    optional = True

    def _names(self) -> list[str]:
        return [NONE, *super()._names()] if self.optional else super()._names()

    def layer(self) -> Any:
        return None if self.currentText() == NONE else super().layer()


def session_inputs(viewer: Any, prediction: Any, image: Any) -> dict:
    """ReviewSession arguments for ``prediction`` (a labels layer) of ``image``: the
    labels, and the segmentation's layers of the image found by name where present and
    of the same shape ("{image} segmentation", "{image} uncertainty", "{image}
    probability N")."""
    labels = image_data(prediction)
    shape = tuple(labels.shape[-3:])
    base = image.name if image is not None else prediction.name.removesuffix(" instances")

    def named(name: str) -> Any:
        layer = viewer.layers[name] if name in viewer.layers else None
        data = image_data(layer) if layer is not None else None
        return data if data is not None and tuple(data.shape) == shape else None

    pattern = re.compile(rf"{re.escape(base)} probability (\d+)$")
    found = sorted((int(m.group(1)), named(lyr.name)) for lyr in viewer.layers
                   if (m := pattern.match(lyr.name)))
    found = [(v, d) for v, d in found if d is not None]
    probabilities = None
    if found:
        arrays = [d for _, d in found]
        if all(isinstance(d, np.ndarray) for d in arrays):
            probabilities = np.stack(arrays)
        else:
            import dask.array as da

            probabilities = da.stack([da.asarray(d) for d in arrays])
    return {"labels": labels, "image": None if image is None else image_data(image),
            "classes": named(f"{base} segmentation"), "probabilities": probabilities,
            "channel_values": tuple(v for v, _ in found),
            "uncertainty": named(f"{base} uncertainty"),
            "voxel_size": tuple(float(s) for s in prediction.scale[-3:])}


class PredictionCombo(OptionalLayerCombo):
    """The Labels layers to review; "{image} instances" of the chosen image by default."""

    optional = False
    preferred = ""

    def _default(self, names: list[str]) -> int:
        return names.index(self.preferred) if self.preferred in names else super()._default(
            names)


def source_file(layer: Any) -> str | None:
    """The file ``layer`` was opened from (None: made in memory, or no layer)."""
    return getattr(getattr(layer, "source", None), "path", None) if layer is not None else None


def bind_keys(layer: Any, widget: Any) -> None:
    """The review keys on the reviewed layer too (when it is active in the canvas),
    holding the widget weakly; a closed widget's keys do nothing."""
    ref = weakref.ref(widget)

    def bind(name: str) -> Any:
        def press(_layer: Any) -> None:
            owner = ref()
            if owner is not None and owner.layer is layer:
                getattr(owner, name)()
        return press

    for key, name in KEYS.items():
        layer.bind_key(key, bind(name), overwrite=True)


def click_callback(tools: Any) -> Any:
    """A mouse callback for the reviewed layer: a click (not a drag) in 2D corrects at the
    clicked voxel (Shift: negative). Holds the tools weakly."""
    ref = weakref.ref(tools)

    def on_press(layer: Any, event: Any) -> Any:
        owner = ref()
        current = None if owner is None else owner.owner.layer
        if current is None or event.button != 1 or current.name != layer.name:
            return  # (a layer of an earlier review keeps no say)
        start, modifiers = np.asarray(event.position), set(event.modifiers)
        pixel, dragged = np.asarray(event.pos, float), False
        yield
        while event.type == "mouse_move":  # a few pixels of jitter are still a click
            dragged = dragged or float(np.abs(np.asarray(event.pos) - pixel).max()) > 4
            yield
        if dragged:
            return
        if owner.owner.viewer.dims.ndisplay != 2:
            owner.owner.say("Click corrections work on a 2D slice: switch the viewer to 2D.")
            return
        owner.click_at(layer.world_to_data(start)[-3:], positive="Shift" not in modifiers)

    on_press.review_clicks = True
    return on_press
