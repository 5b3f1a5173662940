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


def foundation_rows(foundation: Any) -> list[tuple[str, str]]:
    """(label, value) rows describing a loaded foundation model, for the widgets."""
    info = foundation.info()
    size = info.get("feature_size") or info.get("channels")
    text = "available" if info["text_tower"] else "not available"
    reason = getattr(foundation, "text_unavailable_reason", None)
    if reason and not info["text_tower"]:
        text += f" ({reason})"
    return [
        ("Architecture", f"{info['architecture']} ({size})"),
        ("Parameters", f"{info['parameters'] / 1e6:.1f} M"),
        ("Variant", str(info["variant"])),
        ("Text tower", text),
        ("Device", str(info.get("device", ""))),
        ("Source", str(info["source"])),
    ]


def describe_foundation(foundation: Any) -> str:
    """One line: architecture, variant, size and device of a loaded foundation model."""
    info = foundation.info()
    return (f"{info['architecture']} ({info['variant']}), "
            f"{info['parameters'] / 1e6:.1f} M parameters, on {info.get('device', '')}")
