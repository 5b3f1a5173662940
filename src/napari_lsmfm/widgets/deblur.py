"""Deblur dock widget, and the one-click "Deblur with the default model" command.

Thin: it reads the form, runs :func:`napari_lsmfm.tasks.deblur.deblur` (the learned
model or Richardson-Lucy) or :meth:`~napari_lsmfm.tasks.deblur.Deblurrer.fit_self` as a
job (:mod:`napari_lsmfm.workers`), and adds the result as a new image layer
"<name> deblurred" with the source's scale and translation; an existing layer is never
overwritten. Lazy (dask, multiscale) inputs are read tile by tile; a result over
:data:`ZARR_OUTPUT_BYTES` goes to a temporary Zarr store and comes back as a dask array.
torch is imported only when a job runs or the widget is first shown.
"""

from __future__ import annotations

import atexit
import copy
import html
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_lsmfm.engine.jobs import JobContext, Update
from napari_lsmfm.widgets.parts import (
    DeviceCombo,
    LayerCombo,
    LossPlot,
    put_result_layer,
    row,
    show_update,
)
from napari_lsmfm.widgets.runner import JobRunner

if TYPE_CHECKING:
    import napari

# Results larger than this are written to a temporary Zarr store instead of memory.
ZARR_OUTPUT_BYTES = 2**30
CONTRAST_SAMPLES = 2**21  # voxels read to choose the result's contrast limits
DEFAULT_MODEL = "Default model"
LOAD_MODEL = "Load model folder…"
METHODS = {"Deblur model": "model", "Richardson-Lucy": "rl"}
UNITS = {"voxels": "voxel", "µm": "um"}
PSF_GAUSSIAN, PSF_FILE = "Gaussian (sigma)", "PSF file (TIFF)"


# ------------------------------------------------------------------ shared core


@dataclass
class Deblurred:
    """A finished deblur job: the volume (numpy, or dask over a temporary Zarr store),
    contrast limits for display, the seconds it took, and the model used (if any)."""

    data: Any
    contrast_limits: tuple[float, float]
    seconds: float
    folder: str | None = None
    model: Any = None


def image_data(layer: Any) -> Any:
    """The array to deblur: the layer's data as is (numpy, dask, zarr), or for a
    multiscale layer its highest-resolution level."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return data


def _output_for(image: Any) -> tuple[Any, str | None]:
    """None (deblur allocates numpy) or, above ZARR_OUTPUT_BYTES, an empty Zarr array of
    the image's shape and dtype in a temporary folder (removed when Python exits)."""
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "uif":
        dtype = np.dtype(np.float32)
    shape = tuple(int(s) for s in image.shape)
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize <= ZARR_OUTPUT_BYTES:
        return None, None
    import zarr

    folder = tempfile.mkdtemp(prefix="lsmfm-deblur-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    chunks = tuple(min(s, c) for s, c in zip(shape, (32, 256, 256), strict=False))
    out = zarr.open(str(Path(folder) / "deblurred.zarr"), mode="w", shape=shape,
                    dtype=dtype, chunks=chunks)
    return out, folder


def _contrast_limits(data: Any) -> tuple[float, float]:
    """0.1th-99.95th percentiles of a strided subsample (sharpened peaks stay visible)."""
    shape = tuple(int(s) for s in data.shape)
    step = max(1, int(np.ceil((np.prod(shape, dtype=np.float64) / CONTRAST_SAMPLES)
                              ** (1 / len(shape)))))
    sample = np.asarray(data[(slice(None, None, step),) * len(shape)], np.float64)
    lo, hi = (float(v) for v in np.percentile(sample, (0.1, 99.95)))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def deblur_job(image: Any, ctx: JobContext, **options: Any) -> Deblurred:
    """Deblur ``image`` (Z, Y, X) with :func:`~napari_lsmfm.tasks.deblur.deblur`
    ``options``; numpy out, or a temporary Zarr store (returned as dask) when large."""
    from napari_lsmfm.tasks.deblur import check_deblur_input, deblur, load_default_deblur

    t0 = time.perf_counter()
    if options.get("method", "model") == "model" and options.get("model") is None:
        check_deblur_input(image)  # say what is wrong with the image before loading
        ctx.report(0.0, "loading the default deblur model")
        options["model"] = load_default_deblur(options.get("device"))
    out, folder = _output_for(image)
    result = deblur(image, ctx=ctx, out=out, **options)
    if folder is not None:
        import dask.array as da

        result = da.from_zarr(out)
    ctx.report(1.0, "choosing contrast limits")
    return Deblurred(result, _contrast_limits(result), time.perf_counter() - t0, folder,
                     options.get("model"))


def add_deblurred(viewer: Any, source: Any, result: Deblurred) -> Any:
    """Add ``result`` as a new layer "<source name> deblurred" ("… [2]" when that name
    is taken) with the source's scale and translation; returns the layer."""
    base = f"{source.name} deblurred"
    name, n = base, 1
    while name in viewer.layers:  # every run keeps its own result for comparison
        n += 1
        name = f"{base} [{n}]"
    metadata = {"deblurred_from": source.name}
    if result.folder:
        metadata["zarr"] = result.folder
    return put_result_layer(
        viewer, name, result.data, "image", scale=tuple(source.scale),
        translate=tuple(source.translate), contrast_limits=result.contrast_limits,
        metadata=metadata,
    )


# ------------------------------------------------------------------- the widget


class DeblurWidget(QWidget):
    """Deblur an image layer with the deblur model or Richardson-Lucy; finetune the model
    on the volume itself."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.runner = JobRunner(self)
        self.models: dict[str, Any] = {}  # model combo text -> loaded Deblurrer

        self.image_combo = LayerCombo(napari_viewer, "Image")
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(METHODS))
        self.method_combo.currentTextChanged.connect(self._show_method)

        # the learned model
        self.model_combo = QComboBox()
        self.model_combo.addItems([DEFAULT_MODEL, LOAD_MODEL])
        self.model_combo.activated.connect(self._on_model_chosen)
        self._model_choice = DEFAULT_MODEL
        self.device_combo = DeviceCombo()
        self.model_box = QWidget()
        model_form = QFormLayout(self.model_box)
        model_form.setContentsMargins(0, 0, 0, 0)
        model_form.addRow("Model", self.model_combo)
        # a PSF-conditioned model (the shipped one) deblurs for a known PSF; blind otherwise
        self.psf_known_box = QCheckBox("PSF known (sigma z, y, x in voxels)")
        self.psf_known_box.setToolTip(
            "Tell the model the microscope's PSF (Gaussian sigmas in voxels): sharper and "
            "more faithful when it is right. Unticked, the model estimates the blur itself."
        )
        self.model_sigma_spins = _sigma_spins((2.0, 1.0, 1.0))
        model_form.addRow(self.psf_known_box)
        model_form.addRow("Sigma z, y, x", row(*self.model_sigma_spins))
        model_form.addRow("Device", self.device_combo)

        # Richardson-Lucy
        self.psf_combo = QComboBox()
        self.psf_combo.addItems([PSF_GAUSSIAN, PSF_FILE])
        self.psf_combo.currentTextChanged.connect(self._show_method)
        self.sigma_spins = _sigma_spins((2.0, 1.0, 1.0))
        self.unit_combo = QComboBox()
        self.unit_combo.addItems(list(UNITS))
        self.unit_combo.setToolTip("µm: converted to voxels with the layer's scale (z, y, x)")
        self.psf_edit = QLineEdit()
        self.psf_edit.setPlaceholderText("a 3D TIFF of the measured PSF")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_psf)
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 1000)
        self.iterations_spin.setValue(10)
        self.sigma_row = row(*self.sigma_spins, self.unit_combo)
        self.file_row = row(self.psf_edit, browse)
        self.rl_box = QWidget()
        rl_form = QFormLayout(self.rl_box)
        rl_form.setContentsMargins(0, 0, 0, 0)
        rl_form.addRow("PSF", self.psf_combo)
        rl_form.addRow("Sigma z, y, x", self.sigma_row)
        rl_form.addRow("PSF file", self.file_row)
        rl_form.addRow("Iterations", self.iterations_spin)
        self._rl_form = rl_form

        self.deblur_button = QPushButton("Deblur")
        self.deblur_button.clicked.connect(self.deblur)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.runner.cancel)

        # finetune on the volume
        self.fit_sigma_spins = _sigma_spins((2.0, 1.0, 1.0))
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(200)
        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.finetune)
        self.save_button = QPushButton("Save model…")
        self.save_button.clicked.connect(self._on_save_clicked)
        self.loss_plot = LossPlot()
        self.finetune_box = QGroupBox("Finetune on this volume")
        fit_form = QFormLayout(self.finetune_box)
        fit_form.addRow("PSF sigma z, y, x (voxels)", row(*self.fit_sigma_spins))
        fit_form.addRow("Steps", self.steps_spin)
        fit_form.addRow(row(self.train_button, self.save_button))
        fit_form.addRow(self.loss_plot)
        self.finetune_box.setToolTip(
            "Blurs the volume further with this PSF and teaches the model to undo it "
            "(no sharp ground truth needed). Stop keeps the best model so far."
        )

        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.status = QLabel("Choose an image (a 3D stack) and press Deblur.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Method", self.method_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.model_box)
        layout.addWidget(self.rl_box)
        layout.addWidget(row(self.deblur_button, self.stop_button))
        layout.addWidget(self.finetune_box)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self._after: Any = None  # what to do with the running job's result
        self.runner.updated.connect(self._on_update)
        self.runner.succeeded.connect(lambda out: self._after(out))
        self.runner.failed.connect(self._on_failed)
        self.runner.stopped.connect(lambda: self._say("Stopped."))
        self.runner.finished.connect(self._update_buttons)
        self._show_method()
        self._update_buttons()

    # ------------------------------------------------------------- inputs
    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.device_combo.list_devices()  # imports torch: when first shown, not at import
        super().showEvent(event)

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

    def _image(self) -> Any:
        layer = self.image_combo.layer()
        if layer is None:
            raise ValueError("choose an image layer (a 3D stack)")
        if getattr(layer, "rgb", False):
            raise ValueError(f"'{layer.name}' is RGB: use one grey-scale fluorescence channel")
        return layer

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
            layer = self._image()
            options = self._options(layer)
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        image = image_data(layer)
        model_key = self._model_choice

        def done(result: Deblurred) -> None:
            if result.model is not None and model_key not in self.models:
                self.models[model_key] = result.model  # load the default once
            new = add_deblurred(self.viewer, layer, result)
            self.progress_bar.setValue(1000)
            where = " (on disk, read lazily)" if result.folder else ""
            self._say(f"Deblurred '{layer.name}' in {result.seconds:.1f} s → '{new.name}'"
                      f"{where}.")

        self._start(lambda ctx: deblur_job(image, ctx, **options), done,
                    f"Deblurring '{layer.name}'")

    def finetune(self) -> None:
        """Finetune the chosen model on the image (what the Train button does): the result
        is a new entry of the model list; the model it started from stays as it was."""
        if self.runner.running:
            return
        try:
            layer = self._image()
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        image = image_data(layer)
        key = self._model_choice
        base = self.models.get(key)
        sigma = tuple(s.value() for s in self.fit_sigma_spins)
        steps = int(self.steps_spin.value())
        device = self.device_combo.currentText()
        voxel_size = tuple(float(s) for s in layer.scale[-3:])

        def job(ctx: JobContext) -> Any:
            from napari_lsmfm.tasks.deblur import check_deblur_input, load_default_deblur

            loaded = None
            if base is None:
                check_deblur_input(image)
                ctx.report(0.0, "loading the default deblur model")
                loaded = load_default_deblur(device)
            tuned = copy.deepcopy(base if base is not None else loaded)
            tuned.to_device(device)
            fit = tuned.fit_self(image, ctx, psf_sigma_vox=sigma, steps=steps,
                                 voxel_size=voxel_size)
            return loaded, tuned, fit

        def done(out: Any) -> None:
            loaded, tuned, fit = out
            if loaded is not None:
                self.models[key] = loaded
            name = self._add_model(f"{key} finetuned on {layer.name}", tuned)
            state = "stopped early, best model kept" if fit["stopped"] else "finetuned"
            self.progress_bar.setValue(1000)
            self._say(f"{state}: {fit['steps_done']} steps in {fit['seconds']:.1f} s, best "
                      f"loss {fit['best_loss']:.4g}. Model '{name}' selected; press Deblur.")

        self.loss_plot.clear()
        self._start(job, done, f"Finetuning on '{layer.name}'")

    def load_model(self, folder: str) -> None:
        """Load a saved deblur model folder in a job; it becomes the chosen model."""
        from napari_lsmfm.tasks.deblur import Deblurrer

        device = self.device_combo.currentText()

        def job(ctx: JobContext) -> Any:
            ctx.report(0.1, f"loading {Path(folder).name}")
            return Deblurrer.load(folder, device=device)

        def done(model: Any) -> None:
            name = self._add_model(Path(folder).name, model)
            self._say(f"Loaded '{name}'. Press Deblur.")

        self._start(job, done, "Loading deblur model")

    def save_model(self, folder: str) -> None:
        """Save the chosen model (e.g. one finetuned here) to a new folder."""
        model = self.models.get(self._model_choice)
        if model is None:
            self._say("Nothing to save yet: finetune or deblur with a model first.", error=True)
            return
        try:
            path = model.save(folder)
        except (ValueError, OSError) as exc:
            self._say(f"Not saved: {exc}", error=True)
            return
        self._say(f"Saved to {path}")

    def _on_save_clicked(self) -> None:
        folder = QFileDialog.getSaveFileName(self, "Save deblur model (a new folder)", "", "")[0]
        if folder:
            self.save_model(folder)

    def _on_model_chosen(self, *_: Any) -> None:
        text = self.model_combo.currentText()
        if text != LOAD_MODEL:
            self._model_choice = text
            return
        self.model_combo.setCurrentText(self._model_choice)  # until the load succeeds
        folder = QFileDialog.getExistingDirectory(self, "Load deblur model folder")
        if folder:
            self.load_model(folder)

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

    def _start(self, job: Any, done: Any, description: str) -> None:
        self._after = done
        self.progress_bar.setValue(0)
        self._say(f"{description}…")
        self.runner.start(job, description)
        self._update_buttons()

    # ------------------------------------------------------------ results
    def _on_update(self, update: Update) -> None:
        show_update(update, self.progress_bar, self.status, self.loss_plot)

    def _on_failed(self, exc: Exception) -> None:
        self.progress_bar.setValue(0)
        self._say(f"Failed: {exc}", error=True)

    def _update_buttons(self) -> None:
        running = self.runner.running
        for button in (self.deblur_button, self.train_button, self.save_button):
            button.setEnabled(not running)
        self.model_combo.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(f"<b>{html.escape(text)}</b>" if error else html.escape(text))


def _sigma_spins(values: tuple[float, float, float]) -> list[QDoubleSpinBox]:
    spins = []
    for axis, value in zip("zyx", values, strict=True):
        spin = QDoubleSpinBox()
        spin.setRange(0.1, 100.0)
        spin.setSingleStep(0.1)
        spin.setDecimals(2)
        spin.setValue(value)
        spin.setToolTip(f"Gaussian PSF sigma along {axis}")
        spins.append(spin)
    return spins


# ------------------------------------------------------- the one-click command

_ONE_CLICK: set[JobRunner] = set()  # running one-click jobs (kept alive until finished)


def deblur_selected(viewer: napari.viewer.Viewer) -> None:
    """Deblur the selected image layer with the shipped deblur model, in a worker thread.

    The napari command ``napari-lsmfm.deblur_selected`` (Layers > Filter); napari passes
    the current viewer. Adds "<name> deblurred" when done; errors (no image selected, a
    2D image, no default model installed) become viewer notifications.
    """
    from napari.utils.notifications import show_info

    layers = viewer.layers
    active = layers.selection.active
    images = [active] if active is not None else list(layers.selection)
    images = [layer for layer in images if layer.__class__.__name__ == "Image"]
    if not images:
        show_info("Select an image layer (a 3D stack) to deblur.")
        return
    layer = images[0]
    if getattr(layer, "rgb", False):
        show_info(f"'{layer.name}' is RGB: deblurring needs one grey-scale channel.")
        return
    image = image_data(layer)
    # A hidden owner in the viewer's window: the job is cancelled if the window closes.
    real = getattr(viewer, "__wrapped__", viewer)
    window = getattr(getattr(real, "window", None), "_qt_window", None)
    owner = QWidget(window)
    owner.hide()
    runner = JobRunner(owner)
    _ONE_CLICK.add(runner)

    def finished() -> None:
        _ONE_CLICK.discard(runner)
        owner.deleteLater()

    runner.succeeded.connect(lambda result: add_deblurred(viewer, layer, result))
    runner.finished.connect(finished)
    runner.start(lambda ctx: deblur_job(image, ctx, method="model", model=None),
                 f"Deblurring '{layer.name}'")
