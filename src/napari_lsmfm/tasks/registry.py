"""The task registry: a saved model names its task; this maps the name to its class.

A new task registers here (name -> "module:Class"); :func:`load_model` then opens its
saved models without the caller knowing which task made them (the command line's
``--model`` and the coming ``lsmfm predict`` use it). Classes are imported only when
asked for, so the registry itself costs nothing.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from napari_lsmfm.engine.store import CONFIG_NAME, MODEL_FORMAT

__all__ = ["TASKS", "load_model", "saved_task", "task_class"]

TASKS: dict[str, str] = {
    "segment": "napari_lsmfm.tasks.segment:Segmenter",
    "deblur": "napari_lsmfm.tasks.deblur:Deblurrer",
    "classify": "napari_lsmfm.tasks.classify:Classifier",
}


def task_class(name: str) -> type:
    """The class of task ``name`` (ValueError listing the known tasks when unknown)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; this napari-lsmfm knows {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def saved_task(folder: str | os.PathLike) -> str:
    """The task name recorded in a saved model folder (ValueError when it is not one)."""
    path = Path(folder).expanduser() / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: not a saved napari-lsmfm model ({err})") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise ValueError(f"{folder}: not a napari-lsmfm task model")
    return str(config.get("task"))


def load_model(folder: str | os.PathLike, foundation: Any = None, *,
               device: str | None = None) -> Any:
    """Load any saved task model: its class's ``load(folder, foundation, device=...)``."""
    return task_class(saved_task(folder)).load(folder, foundation, device=device)
