"""Open napari with the sample data and the plugin's widgets.

``python -m napari_lsmfm.demo`` shows the viewer: the widgets docked as tabs, the
workflow's first one (segmentation, naming the loaded model) in front. With
``--headless`` (what ``scripts/demo.sh`` uses when there is no display) it runs the same
workflow on a hidden viewer, waits for the foundation model to load, and writes
``screenshot.png`` and ``summary.json`` (every widget's status line, plain text) to
``--out``; ``--train`` also brushes three slices from the sample's ground truth and
trains (quick mode) before the screenshot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

PLUGIN = "napari-lsmfm"
SAMPLES = ("nuclei", "vessels", "plaques")
FRONT = "Few-shot segmentation"  # the workflow's first widget, shown in front
DOCK_WIDTH = 430  # px: the widest form (about 390 px) and a margin


def manifest_widgets() -> list[str]:
    """Display names of the plugin's dock widgets, from the installed manifest."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()  # a fresh process has not looked at the installed entry points yet
    manifest = pm.get_manifest(PLUGIN)
    return [w.display_name for w in manifest.contributions.widgets or []]


def build(viewer: Any, sample: str = "nuclei", weights: str | None = None) -> dict[str, Any]:
    """Open one sample, dock every plugin widget (as tabs, segmentation in front), start
    loading the foundation model."""
    viewer.open_sample(PLUGIN, sample)
    widgets, docks = {}, {}
    for name in manifest_widgets():
        docks[name], widgets[name] = viewer.window.add_plugin_dock_widget(
            plugin_name=PLUGIN, widget_name=name, tabify=True
        )
    if FRONT in docks:
        docks[FRONT].raise_()  # a tabified dock raised is the tab shown
        fit_docks(docks[FRONT])
    foundation = widgets.get("Foundation model")
    if foundation is not None:
        if weights:
            foundation.path_edit.setText(weights)
        foundation.load()
    return widgets


def fit_docks(widget: Any, width: int = DOCK_WIDTH) -> None:
    """Give the dock area of ``widget`` (the tabbed widgets) ``width`` px; the canvas
    keeps the rest."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    dock = widget
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    if dock is not None and isinstance(dock.parentWidget(), QMainWindow):
        dock.parentWidget().resizeDocks([dock], [width], Qt.Orientation.Horizontal)


def wait_for(widgets: dict[str, Any], timeout: float = 300.0) -> None:
    """Process events until no widget has a running job (headless runs)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        QApplication.processEvents()
        if not any(getattr(w, "busy", False) for w in widgets.values()):
            break
        time.sleep(0.05)
    for _ in range(20):  # let the finished signals and the last updates arrive
        QApplication.processEvents()
        time.sleep(0.02)


def brush_and_train(viewer: Any, widget: Any, sample: str, steps: int = 300) -> None:
    """Paint a New brush layer from the sample's ground truth on three slices (every
    object as class 2, 3 % of the rest as background 1), then press Train."""
    import numpy as np

    truth = np.asarray(viewer.layers[f"{sample} ground truth"].data)
    layer = widget.add_brush_layer()
    strokes = np.zeros(truth.shape, np.uint8)
    rng = np.random.default_rng(0)
    for z in np.linspace(0, truth.shape[0] - 1, 5).astype(int)[1:-1]:
        strokes[z][truth[z] > 0] = 2
        strokes[z][(truth[z] == 0) & (rng.random(truth[z].shape) < 0.03)] = 1
    layer.data = strokes
    widget.steps_spin.setValue(steps)
    widget.train_button.click()


def summarize(viewer: Any, widgets: dict[str, Any]) -> dict[str, Any]:
    from napari_lsmfm.widgets.state import foundation_slot

    foundation = foundation_slot(viewer).foundation
    status = widgets.get("Foundation model")
    return {
        "layers": [
            {
                "name": layer.name,
                "type": type(layer).__name__.lower(),
                "shape": list(layer.data.shape),
                "dtype": str(layer.data.dtype),
                "scale": [float(s) for s in layer.scale],
            }
            for layer in viewer.layers
        ],
        "widgets": list(widgets),
        "foundation": foundation.info() if foundation is not None else None,
        "foundation_status": status.status.text() if status is not None else None,
        "status": {name: w.status.text() for name, w in widgets.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headless", action="store_true", help="no window; write files")
    parser.add_argument("--out", default="demo_output", help="folder for the headless outputs")
    parser.add_argument("--sample", default="nuclei", choices=SAMPLES)
    parser.add_argument("--weights", default=None, help="foundation weights (default: embedded)")
    parser.add_argument("--train", action="store_true",
                        help="headless: brush three slices from the ground truth and train")
    args = parser.parse_args(argv)

    import napari

    viewer = napari.Viewer(show=not args.headless, title="napari-lsmfm demo")
    widgets = build(viewer, args.sample, args.weights)
    if not args.headless:
        napari.run()
        return 0

    wait_for(widgets)
    if args.train and FRONT in widgets:
        brush_and_train(viewer, widgets[FRONT], args.sample)
        wait_for(widgets)
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, viewer.layers[0].data.shape[0] // 2 * viewer.layers[0].scale[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    viewer.window.resize(1500, 900)
    if FRONT in widgets:
        fit_docks(widgets[FRONT])
    viewer.screenshot(str(out / "screenshot.png"), canvas_only=False)
    summary = summarize(viewer, widgets)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out / 'screenshot.png'} and {out / 'summary.json'}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
