"""Deblur dock widget: the learned model or Richardson-Lucy, and finetuning on the volume.

A short form on :class:`~napari_lsmfm.widgets.base.TaskWidget`: it runs
:func:`napari_lsmfm.tasks.deblur.deblur_volume` or :meth:`Deblurrer.fit` (on the volume
itself) as a job and adds the result as a new image layer "<name> deblurred" with the
source's scale and translation; an existing layer is never overwritten. Lazy (dask,
multiscale) inputs are read tile by tile; a result over :data:`ZARR_OUTPUT_BYTES` goes to
a temporary Zarr store and comes back as dask. The Layers > Filter one-click command is
in :mod:`.commands`. torch is imported only when a job runs or the widget is first shown.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import QCheckBox, QFileDialog, QFormLayout, QLineEdit, QPushButton, QWidget

from napari_lsmfm.engine.jobs import JobContext
from napari_lsmfm.widgets.base import TaskWidget
from napari_lsmfm.widgets.parts import (
    Section,
    choice,
    image_data,
    int_spin,
    put_layer,
    row,
    sigma_spins,
    subform,
)

if TYPE_CHECKING:
    import napari

# Results larger than this are written to a temporary Zarr store instead of memory.
ZARR_OUTPUT_BYTES = 2**30
DEFAULT_MODEL = "Default model"
LOAD_MODEL = "Load model folder…"
METHODS = {"Deblur model": "model", "Richardson-Lucy": "rl"}
UNITS = {"voxels": "voxel", "µm": "um"}
PSF_GAUSSIAN, PSF_FILE = "Gaussian (sigma)", "PSF file (TIFF)"
NOT_FOUNDATION = ("Foundation: not used here. Deblurring runs its own network (a foundation "
                  "backbone trained to restore), whatever model the Foundation widget holds.")


def deblur_job(image: Any, ctx: JobContext, **options: Any) -> Any:
    """Deblur ``image`` (Z, Y, X) with :func:`~napari_lsmfm.tasks.deblur.deblur_volume`
    ``options``: a DeblurResult, numpy, or dask over a temporary Zarr store when its
    result is over :data:`ZARR_OUTPUT_BYTES`."""
    from napari_lsmfm.tasks.deblur import deblur_volume

    return deblur_volume(image, ctx, max_bytes=ZARR_OUTPUT_BYTES, **options)


def add_deblurred(viewer: Any, source: Any, result: Any) -> Any:
    """Add ``result`` (a DeblurResult of ``source``) as a new layer "<source name> deblurred"
    ("… [2]" when that name is taken) with the source's scale and translation."""
    (layer_data,) = result.layers(source.name, scale=source.scale, translate=source.translate)
    return put_layer(viewer, layer_data, keep=True)  # every run's result stays, to compare


class DeblurWidget(TaskWidget):
    """Deblur an image layer with the deblur model or Richardson-Lucy; finetune the model
    on the volume itself."""

    model_buttons = ("save",)
    model_name = "deblur"
    greeting = "Choose an image (a 3D stack) and press Deblur."
    nothing_to_save = "Nothing to save yet: finetune or deblur with a model first."

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(napari_viewer, parent)
        self.models: dict[str, Any] = {}  # model combo text -> loaded Deblurrer
        self.method_combo = choice(list(METHODS), changed=self._show_method)

        # the learned model: a PSF-conditioned one (the shipped one) deblurs for a known
        # PSF, blind otherwise
        self.model_combo = choice([DEFAULT_MODEL, LOAD_MODEL])
        self.model_combo.activated.connect(self._on_model_chosen)
        self._model_choice = DEFAULT_MODEL
        self.psf_known_box = QCheckBox("PSF known")
        self.psf_known_box.setToolTip(
            "Tell the model the microscope's PSF (Gaussian sigmas z, y, x in voxels): sharper "
            "and more faithful when it is right. Unticked, the model estimates the blur itself."
        )
        self.model_sigma_spins = sigma_spins((2.0, 1.0, 1.0))
        for spin in self.model_sigma_spins:
            spin.setEnabled(False)
            self.psf_known_box.toggled.connect(spin.setEnabled)
        self.model_box = QWidget()
        model_form = subform(self.model_box)
        model_form.addRow("Model", row(self.model_combo, self.device_combo))
        model_form.addRow("PSF", row(self.psf_known_box, *self.model_sigma_spins))

        # Richardson-Lucy
        self.psf_combo = choice([PSF_GAUSSIAN, PSF_FILE], changed=self._show_method)
        self.sigma_spins = sigma_spins((2.0, 1.0, 1.0))
        self.unit_combo = choice(
            list(UNITS), tip="µm: converted to voxels with the layer's scale (z, y, x)")
        self.psf_edit = QLineEdit()
        self.psf_edit.setPlaceholderText("a 3D TIFF of the measured PSF")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_psf)
        self.iterations_spin = int_spin(1, 1000, 10)
        self.sigma_row = row(*self.sigma_spins, self.unit_combo)
        self.file_row = row(self.psf_edit, browse)
        self.rl_box = QWidget()
        self._rl_form = subform(self.rl_box)
        self._rl_form.addRow("PSF", self.psf_combo)
        self._rl_form.addRow("Sigma z, y, x", self.sigma_row)
        self._rl_form.addRow("PSF file", self.file_row)
        self._rl_form.addRow("Iterations", self.iterations_spin)
        self.deblur_button = self.run_button("Deblur", self.deblur)

        # finetune on the volume
        self.fit_sigma_spins = sigma_spins((2.0, 1.0, 1.0))
        self.steps_spin = int_spin(1, 100_000, 200)
        self.train_button = self.run_button("Train", self.finetune)
        self.finetune_box = Section("Finetune on this volume")
        fit_form = self.finetune_box.form
        fit_form.addRow("PSF σ (voxels)", row(*self.fit_sigma_spins))
        fit_form.addRow("Steps", self.steps_spin)
        fit_form.addRow(row(self.train_button, self.save_button))
        fit_form.addRow(self.loss_plot)
        self.finetune_box.setToolTip(
            "Blurs the volume further with this PSF and teaches the model to undo it "
            "(no sharp ground truth needed). Stop keeps the best model so far."
        )
        self.idle_only(self.model_combo)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Method", self.method_combo)
        self.set_layout(form, self.model_box, self.rl_box, self.deblur_button,
                        self.finetune_box)
        self._show_method()
        self.update_buttons()

    def show_foundation(self, *_: Any) -> None:
        """Deblurring never uses the viewer's foundation model: the line says so."""
        self.foundation_label.setText(NOT_FOUNDATION)
        self.foundation_label.setToolTip("The Deblur model and its finetuned copies carry "
                                         "their own backbone; loading a foundation model "
                                         "does not change them.")

    show_preload = show_foundation  # nor its preload

    def preload_foundation(self) -> None:
        """Nothing to preload: a deblur job loads its own model (the foundation's would
        only compete with it for the CPU)."""

    # ------------------------------------------------------------- inputs
    def _show_method(self, *_: Any) -> None:
        model = METHODS[self.method_combo.currentText()] == "model"
        self.model_box.setVisible(model)
        self.finetune_box.setVisible(model)
        self.rl_box.setVisible(not model)
        gaussian = self.psf_combo.currentText() == PSF_GAUSSIAN
        for widget, shown in ((self.sigma_row, gaussian), (self.file_row, not gaussian)):
            widget.setVisible(shown)
            label = self._rl_form.labelForField(widget)
            if label is not None:
                label.setVisible(shown)

    def _browse_psf(self) -> None:
        path = QFileDialog.getOpenFileName(self, "PSF (3D TIFF)", "",
                                           "TIFF (*.tif *.tiff);;All files (*)")[0]
        if path:
            self.psf_edit.setText(path)

    def _options(self, layer: Any) -> dict:
        """The keyword arguments of :func:`~napari_lsmfm.tasks.deblur.deblur` from the form."""
        if METHODS[self.method_combo.currentText()] == "model":
            options = {"method": "model", "model": self.models.get(self._model_choice),
                       "device": self.device_combo.currentText()}
            if self.psf_known_box.isChecked():
                options["psf_sigma"] = tuple(s.value() for s in self.model_sigma_spins)
            return options
        options: dict[str, Any] = {"method": "rl", "iterations": self.iterations_spin.value()}
        if self.psf_combo.currentText() == PSF_FILE:
            path = self.psf_edit.text().strip()
            if not path:
                raise ValueError("choose a PSF file (a 3D TIFF), or a Gaussian PSF")
            options["psf"] = path
        elif UNITS[self.unit_combo.currentText()] == "um":
            options["psf_sigma_um"] = tuple(s.value() for s in self.sigma_spins)
            options["voxel_size"] = tuple(float(s) for s in layer.scale[-3:])
        else:
            options["psf_sigma"] = tuple(s.value() for s in self.sigma_spins)
        return options

    # ------------------------------------------------------------ actions
    def deblur(self) -> None:
        """Deblur the chosen image with the form's settings (what the Deblur button does)."""
        if self.runner.running:
            return
        try:
            layer = self.image_layer()
            options = self._options(layer)
        except ValueError as exc:
            self.say(str(exc), error=True)
            return
        image = image_data(layer)
        model_key = self._model_choice

        def done(result: Any) -> None:
            if result.model is not None and model_key not in self.models:
                self.models[model_key] = result.model  # load the default once
            new = add_deblurred(self.viewer, layer, result)
            where = " (on disk, read lazily)" if result.folder else ""
            self.say(f"Deblurred '{layer.name}' in {result.seconds:.1f} s → '{new.name}'"
                     f"{where}.")

        self.start_job(lambda ctx: deblur_job(image, ctx, **options),
                       f"Deblurring '{layer.name}'", done, button=self.deblur_button)

    def finetune(self) -> None:
        """Finetune the chosen model on the image (what the Train button does): the result
        is a new entry of the model list; the model it started from stays as it was."""
        if self.runner.running:
            return
        try:
            layer = self.image_layer()
        except ValueError as exc:
            self.say(str(exc), error=True)
            return
        image = image_data(layer)
        key = self._model_choice
        base = self.models.get(key)
        sigma = tuple(s.value() for s in self.fit_sigma_spins)
        steps = int(self.steps_spin.value())
        device = self.device_combo.currentText()
        voxel_size = tuple(float(s) for s in layer.scale[-3:])

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.io.check import check_volume
            from napari_lsmfm.tasks.deblur import load_default_deblur

            loaded = None
            if base is None:
                check_volume(image, "deblurring", values=True, min_size=2)
                ctx.report(0.0, "loading the default deblur model")
                loaded = load_default_deblur(device)
            tuned = copy.deepcopy(base if base is not None else loaded)
            tuned.to_device(device)
            fit = tuned.fit(image, sigma, ctx, steps=steps, voxel_size=voxel_size)
            return loaded, tuned, fit

        def done(out: Any) -> None:
            loaded, tuned, fit = out
            if loaded is not None:
                self.models[key] = loaded
            name = self._add_model(f"{key} finetuned on {layer.name}", tuned)
            state = "stopped early, best model kept" if fit["stopped"] else "finetuned"
            self.say(f"{state}: {fit['steps_done']} steps in {fit['seconds']:.1f} s, best "
                     f"loss {fit['best_loss']:.4g}. Model '{name}' selected; press Deblur.")

        self.loss_plot.clear()
        self.start_job(job, f"Finetuning on '{layer.name}'", done, button=self.train_button)

    def load_model(self, folder: str) -> None:
        """Load a saved deblur model folder in a job; it becomes the chosen model."""
        from napari_lsmfm.tasks.deblur import Deblurrer

        device = self.device_combo.currentText()

        def job(ctx: JobContext) -> Any:
            ctx.report(0.1, f"loading {Path(folder).name}")
            return Deblurrer.load(folder, device=device)

        def done(model: Any) -> None:
            name = self._add_model(Path(folder).name, model)
            self.say(f"Loaded '{name}'. Press Deblur.")

        self.start_job(job, "Loading deblur model", done)

    def current_model(self) -> Any:
        return self.models.get(self._model_choice)

    def _on_model_chosen(self, *_: Any) -> None:
        text = self.model_combo.currentText()
        if text != LOAD_MODEL:
            self._model_choice = text
            return
        self.model_combo.setCurrentText(self._model_choice)  # until the load succeeds
        self.ask_load_model()

    def _add_model(self, name: str, model: Any) -> str:
        candidate, n = name, 1
        while candidate in self.models or candidate in (DEFAULT_MODEL, LOAD_MODEL):
            n += 1
            candidate = f"{name} [{n}]"
        self.models[candidate] = model
        self.model_combo.insertItem(self.model_combo.count() - 1, candidate)
        self.model_combo.setCurrentText(candidate)
        self._model_choice = candidate
        return candidate
