"""Qt parts shared by the dock widgets: layer pickers, form pieces, loss plot, result layers."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QPointF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

PLUGIN_KEY = "napari-lsmfm"


def follow(owner: QObject, signal: Any, method: Callable[..., Any]) -> Callable[[], None]:
    """Connect a napari or psygnal ``signal`` to ``method`` of ``owner`` while ``owner`` lives.

    The connection holds ``owner`` weakly and is dropped when Qt destroys it (widget or
    viewer closed), so no callback ever reaches a deleted Qt object. Returns a function
    that drops it sooner.
    """
    ref = weakref.WeakMethod(method)

    def relay(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    def drop(*_: Any) -> None:
        signal.disconnect(relay)

    signal.connect(relay)
    owner.destroyed.connect(drop)
    return drop


def volume_layer(layer: Any) -> Any:
    """``layer`` if it can be a task's input, else ValueError saying what to choose."""
    if layer is None:
        raise ValueError("choose an image layer (a 3D stack)")
    if getattr(layer, "rgb", False):
        raise ValueError(f"'{layer.name}' is RGB: use one grey-scale fluorescence channel")
    return layer


def image_data(layer: Any) -> Any:
    """The array a task reads: the layer's data as is (numpy, dask, zarr), or for a
    multiscale layer its highest-resolution level."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of one type, kept in sync with the layer list;
    ``currentTextChanged`` fires whenever the chosen layer changes, by the user or not."""

    def __init__(self, viewer: Any, layer_type: str) -> None:
        super().__init__(minimumContentsLength=8)  # long layer names do not widen the dock
        self.setSizeAdjustPolicy(self.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.viewer = viewer
        self.layer_type = layer_type  # "Image" or "Labels"
        events = viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            follow(self, getattr(events, name), self.refresh)
        self.refresh()

    def _names(self) -> list[str]:
        return [lyr.name for lyr in self.viewer.layers
                if lyr.__class__.__name__ == self.layer_type]

    def _default(self, names: list[str]) -> int:  # the choice when the current one is gone
        return 0 if names else -1

    def refresh(self, *_: Any) -> None:
        current = self.currentText()
        names = self._names()
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        self.setCurrentIndex(names.index(current) if current in names else self._default(names))
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentTextChanged.emit(self.currentText())

    def showPopup(self) -> None:  # noqa: N802 (Qt API): names may have changed
        self.refresh()
        super().showPopup()

    def layer(self) -> Any:
        name = self.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None


class LossPlot(QWidget):
    """A minimal live loss curve (no plotting library needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []
        self.setMinimumHeight(56)  # small: the docks must fit a 1000 px screen
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def clear(self) -> None:
        self.values = []
        self.update()

    def add(self, value: float) -> None:
        if np.isfinite(value):
            self.values.append(float(value))
            self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(30, 30, 36))
        painter.setPen(QColor(160, 160, 170))
        if len(self.values) < 2:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "loss")
            return
        v = np.asarray(self.values)
        lo, hi = float(v.min()), float(v.max())
        span = hi - lo or 1.0
        w, h, m = self.width(), self.height(), 6
        points = [
            QPointF(m + (w - 2 * m) * i / (len(v) - 1), m + (h - 2 * m) * (1 - (x - lo) / span))
            for i, x in enumerate(v)
        ]
        painter.setPen(QPen(QColor(90, 180, 250), 1.5))
        painter.drawPolyline(QPolygonF(points))
        painter.setPen(QColor(200, 200, 210))
        painter.drawText(m, 14, f"loss {v[-1]:.4g} (min {lo:.4g}, {len(v)} steps)")


def row(*widgets: QWidget) -> QWidget:
    """``widgets`` side by side."""
    box = QWidget()
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        lay.addWidget(w)
    return box


def choice(items: list[str], *, tip: str = "",
           changed: Callable[..., Any] | None = None) -> QComboBox:
    """A combo box of ``items`` with tooltip ``tip``; ``changed(text)`` on a new choice."""
    combo = QComboBox(toolTip=tip)
    combo.addItems(items)
    if changed is not None:
        combo.currentTextChanged.connect(changed)
    return combo


def int_spin(low: int, high: int, value: int) -> QSpinBox:
    """An integer spin box over [low, high] set to ``value``."""
    return QSpinBox(minimum=low, maximum=high, value=value)


def subform(box: QWidget) -> QFormLayout:
    """A form layout filling ``box`` edge to edge (a part of a larger form)."""
    form = QFormLayout(box)
    form.setContentsMargins(0, 0, 0, 0)
    return form


def sigma_spins(values: tuple[float, float, float]) -> list[QDoubleSpinBox]:
    """Three narrow spin boxes (type or scroll) for Gaussian PSF sigmas (z, y, x), 0.1-100."""
    spins = []
    for axis, value in zip("zyx", values, strict=True):
        spin = QDoubleSpinBox(minimum=0.1, maximum=100.0, singleStep=0.1, decimals=2,
                              buttonSymbols=QDoubleSpinBox.ButtonSymbols.NoButtons,
                              styleSheet="min-width: 48px")  # napari: 90 px
        spin.setValue(value)
        spin.setToolTip(f"Gaussian PSF sigma along {axis}")
        spins.append(spin)
    return spins


class Section(QWidget):
    """A titled part of a form that folds away behind an arrow; ``form`` holds its rows."""

    def __init__(self, title: str, *, expanded: bool = False) -> None:
        super().__init__()
        self.toggle = QToolButton(text=title, checkable=True, checked=expanded)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.setAutoRaise(True)
        self.toggle.toggled.connect(self.expand)
        self.body = QWidget()
        self.form = subform(self.body)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.toggle)
        layout.addWidget(self.body)
        self.expand(expanded)

    def expand(self, shown: bool) -> None:
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)
        self.body.setVisible(shown)


def put_result_layer(viewer: Any, name: str, data: Any, kind: str, **kwargs: Any) -> Any:
    """Add a result layer, or update in place the one this plugin made before under
    ``name`` (its data, scale and translation: a region's result may differ in shape).

    A layer of that name that the user made (or another plugin) is never touched: the
    result goes to a new name ``name [2]``, ``name [3]``...
    """
    candidate, n = name, 1
    while candidate in viewer.layers:
        layer = viewer.layers[candidate]
        meta = getattr(layer, "metadata", {}) or {}
        if (meta.get(PLUGIN_KEY) == name and layer.__class__.__name__.lower() == kind
                and layer.data.ndim == np.ndim(data)):
            layer.data = data
            for key in ("scale", "translate"):
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            return layer
        n += 1
        candidate = f"{name} [{n}]"
    metadata = {**kwargs.pop("metadata", {}), PLUGIN_KEY: name}
    adder = {"labels": viewer.add_labels, "image": viewer.add_image}[kind]
    return adder(data, name=candidate, metadata=metadata, **kwargs)


def put_layer(viewer: Any, layer_data: tuple[Any, dict, str], *, keep: bool = False) -> Any:
    """:func:`put_result_layer` for one napari ``(data, kwargs, layer_type)`` tuple (what
    ``TaskResult.layers`` returns). ``keep``: earlier results stay, this one gets a new
    name ("<name> [2]", "[3]"...) when the name is taken."""
    data, kwargs, kind = layer_data
    kwargs = dict(kwargs)
    base = name = kwargs.pop("name")
    n = 1
    while keep and name in viewer.layers:
        n += 1
        name = f"{base} [{n}]"
    return put_result_layer(viewer, name, data, kind, **kwargs)


class LayerQueue:
    """Adds result layers one per turn of the event loop.

    Creating a napari layer (its vispy node, controls and thumbnail) is napari's own work
    on the UI thread, 0.1-0.2 s each on a busy 2-core machine; three or four at once
    would freeze the viewer for half a second. ``pending`` is True until all are in.
    """

    def __init__(self) -> None:
        self._todo: list[Any] = []

    @property
    def pending(self) -> bool:
        return bool(self._todo)

    def add(self, thunk: Any) -> None:
        self._todo.append(thunk)
        if len(self._todo) == 1:
            QTimer.singleShot(0, self._next)

    def _next(self) -> None:
        try:
            self._todo[0]()
        finally:
            self._todo.pop(0)
            if self._todo:
                QTimer.singleShot(0, self._next)


class DeviceCombo(QComboBox):
    """auto / cpu at first; :meth:`list_devices` (called when the widget is first shown)
    adds the GPUs. Listing them imports torch, so it is not done at import."""

    def __init__(self) -> None:
        super().__init__()
        self.addItems(["auto", "cpu"])
        self._listed = False  # GPUs not listed yet

    def list_devices(self) -> None:
        if self._listed:
            return
        from napari_lsmfm.model import available_devices

        self._listed = True
        current = self.currentText()
        self.clear()
        self.addItems(available_devices())
        self.setCurrentText(current)
