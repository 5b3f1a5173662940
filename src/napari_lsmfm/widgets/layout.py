"""Layout parts of the dock widgets: the scrolling form and plain-text labels."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QLabel, QLayout, QScrollArea, QVBoxLayout, QWidget


def scrolled(*parts: QWidget | QLayout) -> QScrollArea:
    """``parts`` stacked in a vertical scroll area without a frame or a horizontal bar:
    docks stacked on a small screen still fit, each scrolling its own form."""
    form = QWidget()
    inner = QVBoxLayout(form)
    inner.setContentsMargins(0, 0, 0, 0)
    for part in parts:
        if isinstance(part, QLayout):
            inner.addLayout(part)
        else:
            inner.addWidget(part)
    inner.addStretch(1)
    scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(form)
    return scroll


def plain_label(text: str = "") -> QLabel:
    """A word-wrapped label showing ``text`` as typed (names with quotes or "<" too)."""
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    return label
