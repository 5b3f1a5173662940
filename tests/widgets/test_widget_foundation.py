"""The Foundation model dock widget in a real headless viewer."""

import time

import pytest
from qtpy.QtCore import QTimer

from napari_lsmfm.engine.jobs import JobContext
from napari_lsmfm.widgets.state import foundation_slot

pytestmark = pytest.mark.gui


class TickRecorder:
    """Records the gaps between ticks of a 20 ms timer on the UI thread."""

    def __init__(self):
        self.times = []
        self.timer = QTimer()
        self.timer.setInterval(20)
        self.timer.timeout.connect(lambda: self.times.append(time.perf_counter()))

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()

    @property
    def max_gap(self):
        return max(b - a for a, b in zip(self.times, self.times[1:], strict=False))


def _dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(
        plugin_name="napari-lsmfm", widget_name="Foundation model"
    )
    return widget


def test_loads_checkpoint_without_blocking(make_napari_viewer, qtbot, tmp_path):
    from _checkpoints import make_lightning_checkpoint

    ckpt = tmp_path / "unet_image_only_best.ckpt"
    make_lightning_checkpoint(ckpt, arch="unet", use_text=False)
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    widget.path_edit.setText(str(ckpt))
    widget.device_combo.setCurrentText("cpu")
    with TickRecorder() as ticks:
        widget.load_button.click()
        assert widget.runner.running
        qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
        qtbot.wait(100)
    assert len(ticks.times) > 3
    assert ticks.max_gap < 0.5, f"UI blocked for {ticks.max_gap:.3f} s"
    foundation = foundation_slot(viewer).foundation
    assert foundation is not None
    assert foundation.info()["architecture"] == "unet"
    assert "unet" in widget.status.text()
    assert widget.load_button.text() == "Load"
    assert widget.move_button.isEnabled()


def test_bad_file_says_why_and_keeps_ui_usable(make_napari_viewer, qtbot, tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    viewer = make_napari_viewer()
    viewer.add_image(__import__("numpy").zeros((4, 8, 8)), name="mine")
    widget = _dock(viewer)
    widget.path_edit.setText(str(bad))
    widget.load()
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=30_000)
    qtbot.wait(100)
    assert "Not loaded" in widget.status.text()
    assert "notes.ckpt" in widget.status.text()
    assert foundation_slot(viewer).foundation is None
    assert [layer.name for layer in viewer.layers] == ["mine"]
    assert widget.load_button.isEnabled() and widget.load_button.text() == "Load"


def test_removing_the_widget_stops_its_job(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    steps = []

    def slow(ctx: JobContext):
        for i in range(600):
            steps.append(i)
            time.sleep(0.01)
            ctx.report(i / 600)

    widget.runner.start(slow, "slow job")
    qtbot.waitUntil(lambda: len(steps) > 5, timeout=5000)
    viewer.window.remove_dock_widget(widget)
    assert widget.runner.wait(2.0), "job kept running after its widget was removed"
    assert len(steps) < 600
