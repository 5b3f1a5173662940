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
from qtpy.QtCore import QTimer

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
    """The Labels layers to review: "{image} instances" of the chosen image by default,
    else the newest "... instances" or "... segmentation" layer, never a ground truth,
    brush or reviewed layer first. Until the user picks one, the choice follows new
    layers (a prediction made after the widget opened)."""

    optional = False
    preferred = ""
    NOT_FIRST = re.compile(r"ground truth|brush|reviewed|truth$", re.IGNORECASE)

    def __init__(self, viewer: Any, layer_type: str) -> None:
        self.chosen = False  # the user picked a layer: keep it
        super().__init__(viewer, layer_type)
        self.activated.connect(lambda *_: setattr(self, "chosen", True))

    def _default(self, names: list[str]) -> int:
        if self.preferred in names:
            return names.index(self.preferred)
        for suffix in (" instances", " segmentation"):
            hits = [i for i, n in enumerate(names) if n.endswith(suffix)]
            if hits:
                return hits[-1]
        plain = [i for i, n in enumerate(names) if not self.NOT_FIRST.search(n)]
        return plain[0] if plain else super()._default(names)

    def refresh(self, *_: Any) -> None:
        super().refresh()
        names = self._names()
        best = self._default(names)
        if not self.chosen and best >= 0 and self.currentText() != names[best]:
            self.setCurrentIndex(best)


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


def painted_box(data: Any, atoms: Any) -> tuple[tuple[slice, ...], np.ndarray]:
    """The box a napari paint event (``atoms``: its ``value``, napari's undo atoms, done
    by the brush, the fill or the eraser) changed in ``data``, and that box's labels
    before the paint. ValueError for atoms of an unknown kind."""
    boxes = []
    for atom in atoms:
        if hasattr(atom, "slice_key"):  # a masked atom: a box and the old values in it
            boxes.append(tuple(slice(s.start, s.stop) for s in atom.slice_key))
        elif isinstance(atom, tuple) and len(atom) == 3:  # (indices, old values, new)
            idx = [np.asarray(i) for i in atom[0]]
            if idx[0].size:
                boxes.append(tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx))
        else:
            raise ValueError(f"unknown paint record {type(atom).__name__}")
    if not boxes:
        raise ValueError("nothing was painted")
    box = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes))
                for a in range(len(boxes[0])))
    before = np.asarray(data[box]).copy()
    for atom in reversed(list(atoms)):  # undo the atoms on the copy, newest first
        if hasattr(atom, "slice_key"):
            inner = tuple(slice(s.start - b.start, s.stop - b.start)
                          for s, b in zip(atom.slice_key, box, strict=True))
            if atom.mask is None:
                before[inner] = atom.old_values
            else:
                view = before[inner]
                view[atom.mask] = atom.old_values
        else:
            idx = tuple(np.asarray(i) - b.start for i, b in zip(atom[0], box, strict=True))
            before[idx] = atom[1]
    return box, before


def follow_paint(layer: Any, widget: Any) -> None:
    """Painting on the reviewed layer (napari's brush, fill, eraser) becomes a review
    decision (``ReviewSession.paint``): undoable, saved, and training labels."""
    owner = weakref.ref(widget)

    def on_paint(event: Any) -> None:
        w = owner()
        if w is None or w.session is None or w.layer is not layer:
            return
        try:
            box, before = painted_box(layer.data, event.value)
        except ValueError:
            return
        # napari sends the event before it writes a single brush dab: read it next turn
        QTimer.singleShot(0, lambda: record(w, box, before))

    def record(w: Any, box: tuple[slice, ...], before: np.ndarray) -> None:
        if w.session is None or w.layer is not layer:
            return
        after = np.asarray(layer.data[box]).copy()
        if np.array_equal(after, before):
            return
        layer.data[box] = before  # as it was: the session writes the painted labels
        w.decide("paint", box, after, said="Painted correction recorded (undo: Ctrl+Z).")

    layer.events.paint.connect(on_paint)


SPLIT_LINE = "split line"  # a Shapes layer: its last line or path cuts the selected object


def split_stroke(viewer: Any, labels_layer: Any) -> np.ndarray | None:
    """The voxels (N, 3) of the last line or path drawn in the "split line" Shapes layer,
    in the labels' data coordinates, one per voxel along each segment; None when there
    is no such layer or shape (the split is then a seeded watershed)."""
    if SPLIT_LINE not in viewer.layers:
        return None
    from napari.layers import Shapes

    shapes = viewer.layers[SPLIT_LINE]
    if not isinstance(shapes, Shapes) or not len(shapes.data):
        return None
    kinds = list(shapes.shape_type)
    lines = [i for i, k in enumerate(kinds) if k in ("line", "path")]
    if not lines:
        return None
    vertices = np.asarray(shapes.data[lines[-1]], np.float64)
    pts = np.asarray([labels_layer.world_to_data(shapes.data_to_world(v)) for v in vertices],
                     np.float64)[:, -3:]
    out = [pts[:1]]
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        n = max(2, int(np.ceil(np.abs(b - a).max())) + 1)
        out.append(a + (b - a) * np.linspace(0, 1, n)[:, None])
    return np.round(np.concatenate(out)).astype(np.int64)
