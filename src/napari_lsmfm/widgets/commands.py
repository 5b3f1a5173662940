"""The plugin's menu commands: one-click jobs on the selected layer, without a dock widget.

``napari-lsmfm.deblur_selected`` (Layers > Filter) deblurs the selected image with the
shipped model, in the same job runner the widgets use; progress shows in napari's
activity dock and errors as notifications.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import QWidget

from napari_lsmfm.widgets import deblur as deblur_form
from napari_lsmfm.widgets.parts import image_data, volume_layer
from napari_lsmfm.widgets.runner import JobRunner

if TYPE_CHECKING:
    import napari

RUNNING: set[JobRunner] = set()  # running one-click jobs (kept alive until finished)


def deblur_selected(viewer: napari.viewer.Viewer) -> None:
    """Deblur the selected image layer with the shipped deblur model, in a worker thread.

    napari passes the current viewer. Adds "<name> deblurred" when done; errors (no image
    selected, a 2D image, no default model installed) become viewer notifications.
    """
    from napari.utils.notifications import show_info

    layers = viewer.layers
    active = layers.selection.active
    images = [active] if active is not None else list(layers.selection)
    images = [layer for layer in images if layer.__class__.__name__ == "Image"]
    if not images:
        show_info("Select an image layer (a 3D stack) to deblur.")
        return
    try:
        layer = volume_layer(images[0])
    except ValueError as exc:
        show_info(f"{exc}.")
        return
    image = image_data(layer)
    runner = JobRunner(_hidden_owner(viewer))
    RUNNING.add(runner)

    def finished() -> None:
        RUNNING.discard(runner)
        runner.parent().deleteLater()

    runner.succeeded.connect(lambda result: deblur_form.add_deblurred(viewer, layer, result))
    runner.finished.connect(finished)
    runner.start(lambda ctx: deblur_form.deblur_job(image, ctx, method="model", model=None),
                 f"Deblurring '{layer.name}'")


def _hidden_owner(viewer: napari.viewer.Viewer) -> QWidget:
    """A hidden widget in the viewer's window: its job is cancelled if the window closes."""
    real = getattr(viewer, "__wrapped__", viewer)  # napari's PublicOnlyProxy
    # napari has no public handle on its Qt main window
    window = getattr(getattr(real, "window", None), "_qt_window", None)
    owner = QWidget(window)
    owner.hide()
    return owner
