"""The one saved-model format and the one atomic writer, for every task and pretraining.

Saved model (every finetuned head, whatever the task): a folder with ``config.json``
(``format``, ``version``, ``task``, ``foundation`` {source, spec, fingerprint},
``normalization``, and the task's own settings) and one safetensors file per part
(``head.safetensors``, ``backbone.safetensors`` when the backbone was finetuned). No
pickle anywhere.

Every file or folder the package writes under a user's name goes through
:func:`atomic_write`: it is made under a hidden temporary name next to the target and
renamed into place only when complete, so a crash or Ctrl-C never leaves half a result
under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_NAME",
    "MODEL_FORMAT",
    "MODEL_VERSION",
    "atomic_write",
    "check_foundation",
    "foundation_fingerprint",
    "foundation_record",
    "load_task_model",
    "remove_path",
    "save_task_model",
]

MODEL_FORMAT = "napari-lsmfm-task"
MODEL_VERSION = 1
CONFIG_NAME = "config.json"


# ------------------------------------------------------------------- atomic writer


def atomic_write(target: str | os.PathLike, write: Callable[[Path], Any], *,
                 mode: int | None = None) -> Path:
    """Make ``target`` (a file or a folder) all at once: ``write(tmp)`` creates it under
    a hidden temporary name beside ``target``; only when that returns is it renamed over
    ``target`` (a folder already there is moved aside first and removed after). On any
    error, Ctrl-C included, the temporary is removed and ``target`` is as it was.
    ``mode``: permissions for a written file (e.g. 0o644 for shared weights). Checking
    whether ``target`` may be replaced is the caller's job. Returns ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if mode is not None and tmp.is_file():
            os.chmod(tmp, mode)
        _replace(tmp, target)
    except BaseException:
        remove_path(tmp)
        raise
    return target


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    elif tmp.is_dir() and (path.exists() or path.is_symlink()):
        path.unlink()  # a file (or link) where a folder goes
        os.replace(tmp, path)
    else:
        os.replace(tmp, path)  # atomic for files on one file system


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a folder tree if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ------------------------------------------------------------------- foundation record

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def foundation_fingerprint(foundation: Any) -> str:
    """sha256 (first 16 hex digits) of the backbone's tensors: names which weights made
    the features. Cached per foundation object (call again after changing its weights)."""
    backbone = getattr(foundation, "backbone", foundation)
    cached = _FINGERPRINTS.get(foundation)
    if cached is not None and cached[0] == _version(backbone):
        return cached[1]
    digest = hashlib.sha256()
    for key, tensor in sorted(backbone.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    value = digest.hexdigest()[:16]
    _FINGERPRINTS[foundation] = (_version(backbone), value)
    return value


def _version(module: Any) -> tuple:
    # in-place updates (optimiser steps) bump each tensor's version counter
    return tuple(p._version for p in module.parameters())


def foundation_record(foundation: Any) -> dict:
    """What a saved head records about the foundation that made its features."""
    return {
        "source": str(getattr(foundation, "source", "memory")),
        "spec": foundation.spec.to_dict(),
        "fingerprint": foundation_fingerprint(foundation),
    }


def check_foundation(record: Mapping[str, Any], foundation: Any, *, exact: bool = True) -> None:
    """Raise ValueError when ``foundation`` is not the one ``record`` names.

    ``exact`` also compares the weights' fingerprint (needed when the head reads the
    foundation's frozen features); otherwise only the architecture must match.
    """
    spec = foundation.spec.to_dict()
    saved = dict(record.get("spec") or {})
    keys = ("architecture", "embed_dim", "feature_size", "channels", "strides", "num_res_units")
    diff = [k for k in keys if saved.get(k) != spec.get(k)]
    if diff:
        raise ValueError(
            "this model was trained on a different foundation "
            f"({', '.join(f'{k}: saved {saved.get(k)!r}, given {spec.get(k)!r}' for k in diff)}); "
            f"load it with the foundation it was trained on ({record.get('source')!r})"
        )
    if exact and record.get("fingerprint") not in (None, foundation_fingerprint(foundation)):
        raise ValueError(
            "this model was trained on the features of other foundation weights "
            f"(saved from {record.get('source')!r}, fingerprint {record.get('fingerprint')}); "
            "load those weights first, or train the head again on this foundation"
        )


# ----------------------------------------------------------------------- save / load


def save_task_model(
    folder: str | os.PathLike,
    *,
    task: str,
    config: Mapping[str, Any],
    parts: Mapping[str, Mapping[str, Any]],
    overwrite: bool = False,
) -> Path:
    """Write a task model: ``folder/config.json`` plus ``folder/<part>.safetensors``.

    ``config`` holds the task's settings (JSON-ready) and must include ``foundation``
    (see :func:`foundation_record`) and ``normalization``. Refuses to replace an existing
    folder unless ``overwrite`` (FileExistsError). Returns the folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    if folder.exists():
        if not overwrite:
            raise FileExistsError(
                f"{folder} already exists; choose another name or pass overwrite=True "
                "(--overwrite on the command line)"
            )
        if not (folder / CONFIG_NAME).is_file():
            raise FileExistsError(
                f"{folder} exists and is not a saved napari-lsmfm model; it will not be replaced"
            )
    body = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "task": task, **config}
    body["parts"] = sorted(parts)
    text = json.dumps(body, indent=2)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        for name, state in parts.items():
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"format": MODEL_FORMAT})
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")

    atomic_write(folder, write)
    return folder


def load_task_model(
    folder: str | os.PathLike, *, task: str | None = None
) -> tuple[dict, dict[str, dict[str, Any]]]:
    """Read a task model folder: (config dict, {part: state dict on the CPU}).

    Raises ValueError when the folder is not a saved napari-lsmfm task model, is of
    another task than ``task``, or a part is missing or damaged; FileNotFoundError when
    the folder does not exist.
    """
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(2, "no saved model here", str(folder))
    config_path = folder / CONFIG_NAME if folder.is_dir() else folder
    if config_path.name != CONFIG_NAME or not config_path.is_file():
        raise ValueError(f"{folder}: not a saved napari-lsmfm model (no {CONFIG_NAME} inside)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path}: cannot be read ({err})") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{config_path}: not a napari-lsmfm task model (format "
            f"{config.get('format') if isinstance(config, dict) else None!r}); "
            "a foundation model folder is given with --weights instead"
        )
    if not isinstance(config.get("version"), int) or config["version"] > MODEL_VERSION:
        raise ValueError(
            f"{config_path}: model format version {config.get('version')!r} is newer than this "
            "napari-lsmfm reads; update napari-lsmfm"
        )
    if task is not None and config.get("task") != task:
        raise ValueError(
            f"{folder}: a {config.get('task')!r} model, not a {task!r} model"
        )
    parts: dict[str, dict[str, Any]] = {}
    for name in config.get("parts", []):
        path = config_path.parent / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"{folder}: {path.name} is missing; copy the whole model folder")
        try:
            parts[name] = load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types
            raise ValueError(f"{path}: damaged safetensors file ({type(err).__name__})") from None
    return config, parts
