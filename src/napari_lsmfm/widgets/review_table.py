"""The review widget's table of objects: one row per object of a review session.

Columns: id, class, size in voxels and um^3, confidence, mean uncertainty and the
decision. Click a header to sort by it; the default, the confidence column, sorts in
the session's queue order (least certain first). :meth:`ObjectTable.sync` brings the
table in line with the session after a decision, an undo or a re-ranking, touching
only the rows that changed (a volume may hold tens of thousands of objects).
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtGui import QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

COLUMNS = ("id", "class", "voxels", "µm³", "confidence", "uncertainty", "status")
HEADERS = ("id", "cls", "vox", "µm³", "conf", "unc", "✓✗")  # a narrow dock fits
TIPS = {"confidence": "mean class probability inside the object; sorts in the review "
                      "queue's order (least certain first; by uncertainty, then id, "
                      "without probabilities)", "uncertainty": "mean uncertainty inside",
        "status": "the decision: ✓ accepted, ✗ rejected, ✎ corrected, empty: pending"}
ID_COLUMN, QUEUE_COLUMN = 0, COLUMNS.index("confidence")
STATUS_MARKS = {"pending": "", "accepted": "✓", "rejected": "✗", "corrected": "✎"}  # narrow
STATUS_COLOURS = {"accepted": QColor(110, 200, 120), "rejected": QColor(230, 110, 100),
                  "corrected": QColor(120, 170, 240)}


BULK = 200  # more changed rows than this: refilled with sorting off, then sorted once


class SortItem(QTableWidgetItem):
    """A cell that sorts by a number (``key``); empty cells (None) sort last."""

    def __init__(self, key: Any, text: str) -> None:
        super().__init__(text)
        self.key, self.order = key, sort_key(key)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        return self.order < getattr(other, "order", (1, 0.0, ""))


def sort_key(value: Any) -> tuple:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0.0, "")
    if isinstance(value, tuple):
        return value
    if isinstance(value, str):
        return (0, 0.0, value)
    return (0, float(value), "")


def queue_key(record: Any) -> tuple:
    """The order of ``ReviewSession.queue()`` (its default): by confidence, else by
    1 - uncertainty, then by id; objects with neither last, by id."""
    value = record.confidence
    if value is None and record.uncertainty is not None:
        value = 1.0 - record.uncertainty
    return (0, float(value), int(record.id)) if value is not None else (1, int(record.id), 0)


def number(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def row_cells(record: Any) -> tuple[tuple[Any, str], ...]:
    """(sort key, text) of each cell of one object's row, in :data:`COLUMNS` order; the
    confidence cell sorts in the queue's order (:func:`queue_key`)."""
    return ((int(record.id), str(record.id)), (int(record.cls), str(record.cls)),
            (int(record.voxels), str(record.voxels)),
            (float(record.volume_um3), f"{record.volume_um3:.0f}"),
            (queue_key(record), number(record.confidence)),
            (record.uncertainty, number(record.uncertainty)),
            (record.status, STATUS_MARKS.get(record.status, record.status)))


class ObjectTable(QTableWidget):
    """The objects of a :class:`~napari_lsmfm.review.ReviewSession`, sortable, rows
    selectable (several with Ctrl / Shift for a merge)."""

    def __init__(self) -> None:
        super().__init__(0, len(COLUMNS))
        self.setHorizontalHeaderLabels(list(HEADERS))
        for j, name in enumerate(COLUMNS):
            self.horizontalHeaderItem(j).setToolTip(TIPS.get(name, name))
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.verticalHeader().setVisible(False)
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)  # fits the dock
        header.setMinimumSectionSize(16)
        self.setStyleSheet("QTableWidget::item { padding: 0px 2px; } "
                           "QHeaderView::section { padding: 0px 2px; }")
        self.setMinimumHeight(220)
        self.setSortingEnabled(True)
        self.sortItems(QUEUE_COLUMN)  # the queue: least certain first
        self._records: dict[int, Any] = {}  # id -> the record its row shows
        self._items: dict[int, SortItem] = {}  # id -> its row's id cell (finds the row)

    # ------------------------------------------------------------ contents
    def sync(self, session: Any) -> int:
        """Rows for ``session.objects``: gone objects' rows removed, new ones added,
        changed ones (a new record) updated, the rest untouched. Returns the rows touched."""
        records = session.objects
        gone = [oid for oid in self._records if oid not in records]
        changed = [oid for oid, rec in records.items() if self._records.get(oid) is not rec]
        if not gone and not changed:
            return 0
        bulk = len(gone) + len(changed) > BULK
        self.blockSignals(True)
        if bulk:
            self.setSortingEnabled(False)
        try:
            for oid in gone:
                self.removeRow(self._items.pop(oid).row())
            for oid in changed:
                item = self._items.get(oid)
                row = item.row() if item is not None else self.rowCount()
                if item is None:
                    self.insertRow(row)
                self._fill(row, oid, row_cells(records[oid]))
        finally:
            self._records = dict(records)
            if bulk:
                self.setSortingEnabled(True)  # sorts once by the current column
            self.blockSignals(False)
        return len(gone) + len(changed)

    def _fill(self, row: int, oid: int, cells: tuple) -> None:
        colour = STATUS_COLOURS.get(cells[-1][0])
        sorted_by = self.horizontalHeader().sortIndicatorSection()
        # the sorted column last: setting it moves the row to its place
        for column in sorted(range(len(cells)), key=lambda c: c == sorted_by):
            key, text = cells[column]
            item = SortItem(key, text)
            if column == len(COLUMNS) - 1:
                item.setToolTip(key)  # the decision in words
                if colour is not None:
                    item.setForeground(colour)
            if column == ID_COLUMN:
                self._items[oid] = item
            self.setItem(row, column, item)

    def clear_objects(self) -> None:
        self.setRowCount(0)
        self._records, self._items = {}, {}

    # ------------------------------------------------------------- lookup
    def id_at(self, row: int) -> int | None:
        item = self.item(row, ID_COLUMN)
        return None if item is None else int(item.key)

    def row_of(self, oid: int) -> int | None:
        item = self._items.get(int(oid))
        return None if item is None else item.row()

    def ids(self) -> list[int]:
        """The object ids in the table's order (as sorted now)."""
        return [self.id_at(r) for r in range(self.rowCount())]

    def current_id(self) -> int | None:
        """The object of the current row (the row clicked or walked to last)."""
        row = self.currentRow()
        return self.id_at(row) if row >= 0 else None

    def selected_ids(self) -> list[int]:
        """The selected objects' ids, the current row's last (the one clicked last)."""
        rows = sorted({index.row() for index in self.selectionModel().selectedRows()})
        current = self.currentRow()
        rows.sort(key=lambda r: r == current)
        return [self.id_at(r) for r in rows]

    def select_id(self, oid: int, *, add: bool = False) -> bool:
        """Make ``oid``'s row the current one (and the only one selected unless ``add``);
        False when the table has no such object."""
        row = self.row_of(oid)
        if row is None:
            return False
        flags = self.selectionModel().SelectionFlag
        mode = (flags.Select if add else flags.ClearAndSelect) | flags.Rows
        self.selectionModel().setCurrentIndex(self.model().index(row, 0), mode)
        self.scrollToItem(self.item(row, 0), QAbstractItemView.ScrollHint.EnsureVisible)
        return True

    def status(self, oid: int) -> str | None:
        """The decision the table shows for ``oid`` (None: not in the table)."""
        record = self._records.get(int(oid))
        return None if record is None else record.status

    def neighbour(self, oid: int | None, step: int, *, pending: bool = False) -> int | None:
        """The object ``step`` rows after (before, when negative) ``oid`` in the table's
        order, or the first (last) row when ``oid`` has none; ``pending``: the next one
        not decided yet. None when there is none."""
        n = self.rowCount()
        row = self.row_of(oid) if oid is not None else None
        i = (row if row is not None else (-1 if step > 0 else n)) + step
        while 0 <= i < n:
            found = self.id_at(i)
            if not pending or self.status(found) == "pending":
                return found
            i += step
        return None

