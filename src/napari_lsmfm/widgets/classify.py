"""Classify dock widget: objects of a labels layer, points or tiles, from examples (a
Points layer with a ``class`` feature) and / or text prompts, with ``unknown``.

A short form on :class:`~napari_lsmfm.widgets.base.TaskWidget`: the job fits a
:class:`~napari_lsmfm.tasks.classify.Classifier` (or applies a loaded one) and classifies;
the result's layers are added (``<image> classes``, ``<image> class table``, ``<image>
tile classes``), the user's layers are never changed. The table lists every item, lowest
confidence first (click a header to sort); clicking a row centres the camera on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_lsmfm.engine.jobs import JobContext, span
from napari_lsmfm.widgets.base import TaskWidget
from napari_lsmfm.widgets.parts import (
    PLUGIN_KEY,
    LayerCombo,
    choice,
    image_data,
    int_spin,
    put_layer,
    row,
)

MODES = {"Objects (labels layer)": "objects", "Points": "points", "Tiles": "tiles"}
EXAMPLES_LAYER = "examples"


def layer_examples(layer: Any) -> Any:
    """Examples from a Points layer whose features have a ``class`` column (positions in the
    layer's data coordinates, z, y, x voxels of the image); None for no layer."""
    from napari_lsmfm.tasks.classify import Examples

    if layer is None or len(layer.data) == 0:
        return None
    features = layer.features
    if "class" not in getattr(features, "columns", ()):
        raise ValueError(f"the points layer '{layer.name}' has no 'class' feature; add one "
                         "(Add examples layer) and give each point a class")
    # (napari keeps categories no point has any more, e.g. a default renamed: not classes)
    names = [str(v) for v in features["class"]]
    return Examples(np.asarray(layer.data)[:, -3:], names)


def put_points(viewer: Any, layer_data: tuple) -> Any:
    """Add a points result layer, or update the one this plugin made under that name."""
    data, kwargs, _ = layer_data
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    old = viewer.layers[name] if name in viewer.layers else None
    if old is not None and (old.metadata or {}).get(PLUGIN_KEY) == name:
        viewer.layers.remove(old)
    elif old is not None:
        name = f"{name} [2]"
    metadata = {**kwargs.pop("metadata", {}), PLUGIN_KEY: name}
    return viewer.add_points(data, name=name, metadata=metadata, **kwargs)


class ClassifyWidget(TaskWidget):
    """Classify objects, points or tiles from examples and / or prompts."""

    model_buttons = ("save", "load")
    model_name = "classifier"
    loss_curve = False
    greeting = ("Choose the image and what to classify; mark examples (a Points layer with a "
                "'class' feature) or type prompts, then press Classify.")
    nothing_to_save = "Nothing to save yet: classify with examples or prompts first."

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.model: Any = None  # the last trained or loaded Classifier
        self.result: Any = None
        self.source: Any = None  # the image layer of the result
        self.mode_combo = choice(list(MODES), changed=self._show_mode)
        self.labels_combo = LayerCombo(napari_viewer, "Labels")
        self.points_combo = LayerCombo(napari_viewer, "Points")
        self.tile_spins = [int_spin(2, 4096, v) for v in (32, 64, 64)]
        self.examples_combo = LayerCombo(napari_viewer, "Points")
        self.class_edit = QLineEdit("class 1")
        self.class_edit.setToolTip("the class new example points get")
        self.class_edit.textChanged.connect(self._set_default_class)
        add = QPushButton("Add examples layer")
        add.clicked.connect(lambda *_: self.add_examples_layer())
        self.prompts_edit = QLineEdit()
        self.prompts_edit.setPlaceholderText("e.g. nucleus; blood vessel; amyloid plaque")
        self.prompts_edit.setToolTip("class names or descriptions ('name: description'), "
                                     "separated by ';'; with examples they are priors")
        self.run_btn = self.run_button("Classify", self.classify)
        self.table = QTableWidget(0, 6)
        self.table.setHorizontalHeaderLabels(["item", "class", "confidence", "z", "y", "x"])
        self.table.setSortingEnabled(True)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.cellClicked.connect(self.centre_on_row)
        export = QPushButton("Export CSV…")
        export.clicked.connect(lambda *_: self.ask_export())
        self.idle_only(self.mode_combo)

        self.form = QFormLayout()
        self.form.addRow("Image", self.image_combo)
        self.form.addRow("Classify", self.mode_combo)
        self.form.addRow("Labels", self.labels_combo)
        self.form.addRow("Points", self.points_combo)
        self.form.addRow("Tile z, y, x", row(*self.tile_spins))
        self.form.addRow("Examples", self.examples_combo)
        self.form.addRow("New examples", row(self.class_edit, add))
        self.form.addRow("Prompts", self.prompts_edit)
        self.set_layout(self.form, row(self.run_btn, self.device_combo), self.table,
                        row(export, self.save_button, self.load_button))
        self._show_mode()
        self.update_buttons()

    # ----------------------------------------------------------------- form
    @property
    def mode(self) -> str:
        return MODES[self.mode_combo.currentText()]

    def set_mode(self, mode: str) -> None:
        self.mode_combo.setCurrentText(next(k for k, v in MODES.items() if v == mode))

    def _show_mode(self, *_: Any) -> None:
        for widget, mode in ((self.labels_combo, "objects"), (self.points_combo, "points"),
                             (self.tile_spins[0].parent(), "tiles")):
            widget.setVisible(self.mode == mode)
            label = self.form.labelForField(widget)
            if label is not None:
                label.setVisible(self.mode == mode)

    def add_examples_layer(self) -> Any:
        """A new Points layer "examples" with a ``class`` feature (new points get the class
        typed beside the button), chosen as the examples."""
        layer = self.viewer.add_points(np.empty((0, 3)), name=EXAMPLES_LAYER, ndim=3,
                                       features={"class": np.array([], dtype=object)},
                                       size=4)
        layer.feature_defaults["class"] = self.class_edit.text().strip() or "class 1"
        layer.mode = "add"
        self.examples_combo.refresh()
        self.examples_combo.setCurrentText(layer.name)
        return layer

    def _set_default_class(self, text: str) -> None:
        layer = self.examples_combo.layer()
        if layer is not None and "class" in layer.features:
            layer.feature_defaults["class"] = text.strip() or "class 1"

    # ------------------------------------------------------------ the job
    def inputs(self) -> dict:
        """What to classify, from the form: {"objects": labels} / {"points": (N, 3)} /
        {"tiles": (z, y, x)} (ValueError saying what to choose)."""
        if self.mode == "objects":
            layer = self.labels_combo.layer()
            if layer is None:
                raise ValueError("choose a labels layer whose objects to classify")
            return {"objects": np.asarray(image_data(layer))}
        if self.mode == "points":
            layer = self.points_combo.layer()
            if layer is None or len(layer.data) == 0:
                raise ValueError("choose a points layer with the points to classify")
            return {"points": np.asarray(layer.data)[:, -3:]}
        return {"tiles": tuple(s.value() for s in self.tile_spins)}

    def classify(self) -> None:
        """Fit on the examples / prompts (or apply the loaded classifier) and classify."""
        if self.runner.running:
            return
        try:
            layer = self.image_layer()
            inputs = self.inputs()
            examples = layer_examples(self.examples_combo.layer())
        except ValueError as exc:
            self.say(str(exc), error=True)
            return
        prompts = tuple(p for p in self.prompts_edit.text().split(";") if p.strip())
        image = image_data(layer)
        voxel_size = tuple(float(s) for s in layer.scale[-3:])
        device = self.device_combo.currentText()
        loaded = self.model if examples is None and not prompts else None
        if examples is None and not prompts and loaded is None:
            self.say("mark examples (Add examples layer) or type prompts, or load a "
                     "classifier", error=True)
            return

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.tasks.classify import Classifier

            fm = self.foundation_for(ctx, device) if loaded is None else loaded.foundation
            clf = loaded
            if clf is None:
                extra = {"tile": inputs["tiles"]} if "tiles" in inputs else {}
                clf = Classifier(fm, voxel_size=voxel_size, prompts=prompts, **extra)
                fit_kw = {k: v for k, v in inputs.items() if k != "points"}
                clf.fit(image, examples, span(ctx, 0.0, 0.7), **fit_kw)
            return fm, clf, clf.predict(image, span(ctx, 0.7, 1.0), **inputs)

        def done(out: Any) -> None:
            fm, self.model, self.result = out
            self.share_foundation(fm)
            self.source = layer
            self.show_result(layer, self.result)

        self.start_job(job, f"Classifying '{layer.name}'", done, button=self.run_btn)

    def show_result(self, layer: Any, result: Any) -> None:
        """Add the result's layers (beside the user's) and fill the table."""
        for layer_data in result.layers(layer.name, scale=layer.scale[-3:],
                                        translate=layer.translate[-3:]):
            if layer_data[2] == "points":
                put_points(self.viewer, layer_data)
            else:
                put_layer(self.viewer, layer_data)
        rows = result.table()
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            key = r.get("label", i + 1)
            values = [key, r["class"], r["confidence"], r["z"], r["y"], r["x"]]
            for j, value in enumerate(values):
                item = QTableWidgetItem()
                item.setData(0, value)  # numbers sort as numbers
                item.setData(256, i)  # the row in the result (Qt.UserRole)
                self.table.setItem(i, j, item)
        self.table.setSortingEnabled(True)
        self.table.sortItems(2)  # lowest confidence first
        unknown = int(np.sum(result.unknown))
        self.say(f"Classified {len(rows)} {result.kind} into {', '.join(result.class_names)}"
                 f" ({unknown} unknown). Lowest confidence first; click a row to go there.")

    def centre_on_row(self, table_row: int, *_: Any) -> None:
        """Centre the camera on the item of a table row (and step to its z plane)."""
        if self.result is None or self.source is None:
            return
        index = int(self.table.item(table_row, 0).data(256))
        rows = self.result.table()
        centre = np.asarray([rows[index][k] for k in "zyx"], float)
        world = centre * np.asarray(self.source.scale[-3:]) + np.asarray(
            self.source.translate[-3:])
        self.viewer.camera.center = tuple(world[-3:])
        self.viewer.dims.set_point(self.viewer.dims.ndim - 3, float(world[0]))

    # ------------------------------------------------------------ files
    def export_csv(self, path: str) -> None:
        if self.result is None:
            self.say("Nothing to export yet: classify first.", error=True)
            return
        try:
            written = self.result.to_csv(path)
        except OSError as exc:
            self.say(f"Not exported: {exc}", error=True)
            return
        self.say(f"Exported {len(self.result.classes)} rows to {written}")

    def ask_export(self) -> None:
        path = QFileDialog.getSaveFileName(self, "Export classes (CSV)", "", "CSV (*.csv)")[0]
        if path:
            self.export_csv(path)

    def current_model(self) -> Any:
        return self.model

    def load_model(self, folder: str) -> None:
        """Load a saved classifier in a job; Classify then applies it (with no examples or
        prompts in the form)."""
        device = self.device_combo.currentText()

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.tasks.classify import Classifier

            fm = self.slot.foundation
            ctx.report(0.1, f"loading {Path(folder).name}")
            return Classifier.load(folder, fm, device=device)

        def done(model: Any) -> None:
            self.model = model
            self.share_foundation(model.foundation)
            if model.mode is not None:
                self.set_mode(model.mode)
            self.say(f"Loaded '{Path(folder).name}' ({', '.join(model.class_names)}). Clear "
                     "the examples and prompts and press Classify to apply it.")

        self.start_job(job, "Loading classifier", done)
