"""The parts of the "Predict whole volume" widget that are not its form.

Where the outputs go (:func:`default_output`, :func:`output_paths`), the question asked
when they exist (:func:`ask_existing`, one function a test can answer), the job that
runs :func:`napari_lsmfm.scale.predict_volume` (:func:`prediction_job`), and the layer
that shows the output while it fills: level 0 of the Zarr store read lazily
(:func:`live_layer`, refreshed as blocks finish), then its pyramid (:func:`show_pyramid`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QMessageBox, QWidget

from napari_lsmfm.engine.jobs import JobContext
from napari_lsmfm.widgets.parts import PLUGIN_KEY, put_result_layer

SHARED_MODEL = "Segmentation widget's model"
DEBLUR_MODEL = "Default deblur model"
FOLDER_MODEL = "Saved model folder…"
SUFFIX = {"segment": "segmentation", "deblur": "deblurred"}
STORE_KEY = "lsmfm_store"  # layer metadata: the Zarr store the layer shows


def default_output(layer: Any, task: str) -> Path:
    """``<image stem>_<segmentation|deblurred>.zarr`` beside the layer's source file
    (napari's ``source.path`` or the plugin reader's ``metadata["path"]``), else in the
    user's home folder."""
    source = getattr(getattr(layer, "source", None), "path", None)
    source = source or (getattr(layer, "metadata", {}) or {}).get("path")
    stem = re.sub(r"[^\w.-]+", "_", layer.name).strip("._") or "image"
    folder = Path.home()
    if source:
        from napari_lsmfm.io.write import volume_stem

        src = Path(str(source).rstrip("/\\"))
        folder, stem = src.parent, volume_stem(src)
    return folder / f"{stem}_{SUFFIX.get(task, 'prediction')}.zarr"


def output_paths(out: Path, instances: bool) -> dict[str, Path]:
    """The outputs of a run: the main one ("out") and, asked for, "instances" beside it."""
    paths = {"out": out}
    if instances:
        stem = out.name[:-5] if out.name.lower().endswith(".zarr") else out.name
        paths["instances"] = out.with_name(f"{stem}_instances.zarr")
    return paths


def existing(paths: dict[str, Path]) -> tuple[list[Path], bool]:
    """(the outputs that exist already, whether the main one can be resumed: a partial
    output an interrupted run left, not a hidden temporary)."""
    from napari_lsmfm.io.output import partial_info

    found = [p for p in paths.values() if p.exists() or p.is_symlink()]
    mark = partial_info(paths["out"]) if paths["out"] in found else None
    return found, bool(mark) and mark.get("resumable", True) and not mark.get("temporary")


def ask_existing(parent: QWidget, paths: list[Path], resumable: bool) -> str:
    """Ask what to do with outputs that exist: "resume" (only when ``resumable``),
    "replace" or "cancel" (the default: nothing is touched)."""
    names = "\n".join(str(p) for p in paths)
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("Output exists")
    if resumable:
        box.setText(f"{paths[0].name} is the partial output of an interrupted run.")
        box.setInformativeText(f"Resume it (only the missing blocks run), or replace it?\n"
                               f"{names}")
    else:
        box.setText(f"{'These outputs exist' if len(paths) > 1 else 'This output exists'}; "
                    "replace?")
        box.setInformativeText(f"{names}\nReplacing deletes what is there.")
    buttons = {}
    if resumable:
        buttons["resume"] = box.addButton("Resume", QMessageBox.ButtonRole.AcceptRole)
    buttons["replace"] = box.addButton("Replace", QMessageBox.ButtonRole.DestructiveRole)
    buttons["cancel"] = box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(buttons["resume" if resumable else "cancel"])
    box.setEscapeButton(buttons["cancel"])
    box.exec()
    clicked = box.clickedButton()
    box.deleteLater()
    return next((k for k, b in buttons.items() if b is clicked), "cancel")


def saved_model_task(folder: str) -> str:
    """The task of a saved model folder ("segment" / "deblur"); ValueError for another."""
    from napari_lsmfm.tasks.registry import saved_task

    if not folder:
        raise ValueError("choose a saved model folder (Browse…)")
    task = saved_task(folder)
    if task not in SUFFIX:
        raise ValueError(f"{folder} is a {task!r} model; whole volumes are predicted with "
                         "segmentation or deblur models")
    return task


def load_model(choice: str, folder: str, foundation: Any, device: str) -> Any:
    """(In a job.) The model of ``choice``: the default deblur model, or a saved folder on
    the viewer's ``foundation`` when it is the one the model was trained on (else on the
    one the folder records)."""
    from napari_lsmfm.tasks.registry import load_model as load_saved

    if choice == DEBLUR_MODEL:
        from napari_lsmfm.tasks.deblur import load_default_deblur

        return load_default_deblur(device)
    if foundation is not None:
        try:
            return load_saved(folder, foundation, device=device)
        except ValueError:  # trained on another foundation: the folder says which
            pass
    return load_saved(folder, None, device=device)


def prediction_job(model: Any, loader: Any, image: Any, paths: dict[str, Path],
                   counts: dict[str, int], **options: Any) -> Any:
    """``job(ctx)`` predicting ``image`` with ``model`` (or ``loader()``'s) into ``paths``;
    returns (summary, the model used). ``counts`` ("done", "skipped") follow the blocks
    from the worker thread, for the status line."""

    def on_block(record: dict) -> None:
        counts["done"] += 1
        counts["skipped"] += int(bool(record.get("skipped")))

    def job(ctx: JobContext) -> Any:
        from napari_lsmfm.scale import predict_volume

        used = model
        if used is None:
            ctx.report(0.0, "loading the model")
            used = loader()
        summary = predict_volume(used, image, paths["out"], instances=paths.get("instances"),
                                 ctx=ctx, on_block=on_block, **options)
        return summary, used

    return job


def live_layer(viewer: Any, out: Path, source: Any, task: str) -> Any:
    """A layer "<image> prediction" over level 0 of ``out`` read lazily from disk (blocks
    not written yet read as 0), with ``source``'s scale and translation; it shows each
    block once refreshed. The layer of an earlier, interrupted run of ``out`` is reused;
    other layers keep their names and data (this one gets "… [2]")."""
    import zarr

    data = zarr.open_array(str(out / "0"), mode="r")
    base = name = f"{source.name} prediction"
    n = 1
    while name in viewer.layers:
        layer = viewer.layers[name]
        if (layer.metadata.get(STORE_KEY) == str(out) and not layer.multiscale
                and layer.data.shape == data.shape):
            layer.data = data
            return layer
        n += 1
        name = f"{base} [{n}]"
    kwargs: dict[str, Any] = {"scale": tuple(source.scale[-3:]), "name": name,
                              "translate": tuple(source.translate[-3:]),
                              "metadata": {PLUGIN_KEY: base, STORE_KEY: str(out)}}
    if task == "deblur":
        return viewer.add_image(data, contrast_limits=tuple(source.contrast_limits), **kwargs)
    return viewer.add_labels(data, **kwargs)


def show_pyramid(viewer: Any, layer: Any, out: Path, *, name: str = "", kind: str = "labels",
                 **kwargs: Any) -> Any:
    """Show the finished ``out``: its pyramid (a multiscale layer in place of ``layer``,
    at the same place in the list) or level 0 when it has one level. ``layer`` None: a
    new layer ``name`` of ``kind`` with ``kwargs`` (scale, translate)."""
    from napari_lsmfm.io import open_volume

    levels = list(open_volume(out).metadata.get("multiscale_levels") or [])
    if layer is None or len(levels) < 2:
        if layer is not None:
            layer.refresh()
            return layer
        data = levels if len(levels) > 1 else levels[0]
        return put_result_layer(viewer, name, data, kind, multiscale=len(levels) > 1,
                                metadata={STORE_KEY: str(out)}, **kwargs)
    kind = layer.__class__.__name__.lower()
    keep = {"name": layer.name, "scale": layer.scale, "translate": layer.translate,
            "opacity": layer.opacity, "visible": layer.visible,
            "metadata": {**layer.metadata, STORE_KEY: str(out)}}
    if kind == "image":
        keep.update(contrast_limits=layer.contrast_limits, colormap=layer.colormap)
    index = viewer.layers.index(layer)
    selected = layer in viewer.layers.selection
    viewer.layers.remove(layer)
    adder = viewer.add_image if kind == "image" else viewer.add_labels
    new = adder(levels, multiscale=True, **keep)
    viewer.layers.move(viewer.layers.index(new), index)
    if not selected:
        viewer.layers.selection.discard(new)
    return new


def summary_text(summary: dict, out: Path) -> str:
    """The status line after a run: blocks done / skipped / resumed, speed, where."""
    parts = [f"{summary['blocks']} blocks ({summary['predicted']} predicted, "
             f"{summary['skipped']} skipped empty"]
    if summary.get("resumed"):
        parts.append(f", {summary['resumed']} from before")
    return (f"Done: {''.join(parts)}) in {summary['seconds']:.1f} s, "
            f"{summary['voxels_per_second'] / 1e6:.2f} M voxels/s → {out}")
