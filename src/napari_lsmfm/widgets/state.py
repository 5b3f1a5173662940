"""Per-viewer state shared by the plugin's widgets (no Qt).

The Foundation model widget loads a model; the task widgets of the same viewer use
it. One :class:`FoundationSlot` per viewer, dropped when the viewer is collected.
"""

from __future__ import annotations

import weakref
from typing import Any

from psygnal import Signal


class FoundationSlot:
    """Holds the foundation model loaded for one viewer; ``changed`` fires on load."""

    changed = Signal(object)

    def __init__(self) -> None:
        self.foundation: Any = None

    def set(self, foundation: Any) -> None:
        self.foundation = foundation
        self.changed.emit(foundation)


_SLOTS: dict[int, FoundationSlot] = {}


def foundation_slot(viewer: Any) -> FoundationSlot:
    """The slot of ``viewer`` (created on first use)."""
    # Plugin widgets get napari's PublicOnlyProxy of the viewer: key on the real one.
    viewer = getattr(viewer, "__wrapped__", viewer)
    key = id(viewer)
    if key not in _SLOTS:
        _SLOTS[key] = FoundationSlot()
        weakref.finalize(viewer, _SLOTS.pop, key, None)
    return _SLOTS[key]
