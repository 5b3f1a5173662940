"""The default foundation model loads once, in the background, when the first widget of
a viewer opens; every widget shows it and every job reuses it (a real headless viewer)."""

import threading

import numpy as np
import pytest
from qtpy.QtWidgets import QApplication

import napari_lsmfm.model as model
from napari_lsmfm.engine.jobs import Cancelled
from napari_lsmfm.engine.libs import PRELOAD_ENV
from napari_lsmfm.model import checkpoints
from napari_lsmfm.widgets.state import FoundationSlot, foundation_slot

pytestmark = pytest.mark.gui


@pytest.fixture
def loads(monkeypatch):
    """Preloading on; records each load of the default model (the real loader runs)."""
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    calls = []
    real = model.load_foundation

    def counted(path=None, **kwargs):
        calls.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(model, "load_foundation", counted)
    return calls


def _dock(viewer, name):
    return viewer.window.add_plugin_dock_widget(plugin_name="napari-lsmfm", widget_name=name)[1]


def _tiny():
    from napari_lsmfm.model import Foundation, FoundationSpec

    spec = FoundationSpec(architecture="unet", embed_dim=8, channels=(8, 16), strides=(2,),
                          num_res_units=0)
    return Foundation(spec, source="mine")


def test_preload_is_shared_by_every_widget_and_job(make_napari_viewer, qtbot, loads,
                                                   monkeypatch):
    gate = threading.Event()  # the preload waits here until the widgets have been checked
    counted = model.load_foundation

    def gated(path=None, **kwargs):
        gate.wait(60)
        return counted(path, **kwargs)

    monkeypatch.setattr(model, "load_foundation", gated)
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = rng.random((16, 32, 32)).astype(np.float32)
    image[:, 8:20, 8:20] += 2  # a bright square prism to brush
    viewer.add_image(image, name="cells")
    foundation_widget = _dock(viewer, "Foundation model")
    segment = _dock(viewer, "Few-shot segmentation")
    slot = foundation_slot(viewer)
    assert slot.preload is not None and slot.preloading()
    assert "background" in segment.foundation_label.text()
    # Train pressed at once: the job waits for the preload instead of loading a copy
    segment.image_combo.setCurrentText("cells")
    strokes = np.zeros(image.shape, np.uint8)
    strokes[8, 10:18, 10:18] = 2
    strokes[8, 24:30, 2:30] = 1
    segment.add_brush_layer().data = strokes
    segment.steps_spin.setValue(20)
    segment.train()
    qtbot.waitUntil(lambda: "waiting for the default" in segment.status.text(), timeout=10_000)
    gate.set()
    qtbot.waitUntil(lambda: not segment.busy and slot.foundation is not None, timeout=120_000)
    assert loads == [None]  # one load of the default model in all
    assert slot.foundation.source == "default"
    assert segment.segmenter.foundation is slot.foundation
    assert slot.preload_seconds is not None and 0 < slot.preload_seconds < 120
    assert "Source: default" in foundation_widget.status.text()
    assert segment.foundation_label.text().startswith("Foundation: unet")
    # a widget opened later shows it and starts nothing
    deblur = _dock(viewer, "Deblur")
    assert deblur.slot.foundation is slot.foundation and loads == [None]


def test_the_users_model_wins_over_the_preload(make_napari_viewer, qtbot, loads):
    viewer = make_napari_viewer()
    segment = _dock(viewer, "Few-shot segmentation")
    slot = foundation_slot(viewer)
    preload = slot.preload
    mine = _tiny()
    slot.set(mine)  # as a Load in the Foundation widget would, while the preload runs
    assert preload.wait(120)
    qtbot.wait(50)  # the preload's result reaches the UI thread
    assert preload.error is None and preload.foundation is not None
    assert slot.foundation is mine
    assert "Foundation: unet" in segment.foundation_label.text()


def test_a_failed_preload_is_a_status_line(make_napari_viewer, qtbot, loads, monkeypatch,
                                           tmp_path):
    monkeypatch.setattr(checkpoints, "DEFAULT_MODEL_DIR", tmp_path / "none")
    viewer = make_napari_viewer()
    segment = _dock(viewer, "Few-shot segmentation")
    slot = foundation_slot(viewer)
    assert slot.preload.wait(60)
    qtbot.waitUntil(lambda: "could not be preloaded" in segment.foundation_label.text(),
                    timeout=10_000)
    assert "No default foundation model" in segment.foundation_label.text()
    assert slot.foundation is None and not slot.preloading()


def test_closing_the_viewer_lets_go_of_the_preload(make_napari_viewer, loads):
    viewer = make_napari_viewer()
    _dock(viewer, "Few-shot segmentation")
    _dock(viewer, "Deblur")
    slot = foundation_slot(viewer)
    preload = slot.preload
    assert slot.users == 2
    viewer.close()
    for _ in range(5):
        QApplication.processEvents()
    assert slot.users == 0
    assert preload.cancelled or not preload.running  # cancelled if it was still loading
    assert preload.wait(60)


def test_a_cancelled_preload_delivers_nothing(monkeypatch):
    """The slot's mechanism: the last widget closing stops the load at its next step."""
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    slot = FoundationSlot()
    slot.attach()
    step, posted = threading.Event(), []

    def load(progress):
        step.wait(10)
        progress(0.5, "half way")  # raises: cancelled
        return object()

    preload = slot.start_preload(load, posted.append)
    slot.detach()
    step.set()
    assert preload.wait(10)
    assert preload.cancelled and preload.foundation is None
    assert isinstance(preload.error, Cancelled) and posted == []
    assert slot.preload is None and slot.foundation is None


def test_preload_can_be_turned_off(make_napari_viewer, monkeypatch):
    monkeypatch.setenv(PRELOAD_ENV, "1")
    viewer = make_napari_viewer()
    _dock(viewer, "Few-shot segmentation")
    assert foundation_slot(viewer).preload is None
