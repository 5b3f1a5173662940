"""The one saved-model format and the one atomic writer, for every task and pretraining.

Saved model (every finetuned head, whatever the task): a folder with ``config.json``
(``format``, ``version``, ``task``, ``foundation`` {source, spec, fingerprint},
``normalization``, and the task's own settings) and one safetensors file per part
(``head.safetensors``, ``backbone.safetensors`` when the backbone was finetuned). No
pickle anywhere.

Every file or folder the package writes under a user's name goes through
:class:`StagedOutput` (:func:`atomic_write` for one call): it is made under a hidden
temporary name next to the target and renamed into place only when complete, so a
crash, Ctrl-C or ``kill -9`` never leaves half a result under the real name, and
``--overwrite`` removes the old result only after the new one is complete. A Zarr output
filled block by block also carries a *partial* mark (:mod:`napari_lsmfm.io.output`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ANOTHER_RUN",
    "CONFIG_NAME",
    "MODEL_FORMAT",
    "MODEL_VERSION",
    "StagedOutput",
    "atomic_write",
    "check_foundation",
    "foundation_fingerprint",
    "foundation_record",
    "is_temporary",
    "load_task_model",
    "remove_path",
    "remove_stale_temporaries",
    "save_task_model",
    "swap_paths",
    "temporary_path",
    "user_named",
]

MODEL_FORMAT = "napari-lsmfm-task"
MODEL_VERSION = 1
CONFIG_NAME = "config.json"


# ------------------------------------------------------------------- atomic writer

TEMP_TAG = ".partial-"  # .NAME.partial-HOST-PID-RANDOM: being built (or, after a swap, the old)
OLD_TAG = ".old-"  # .NAME.old-HOST-PID-RANDOM: the old folder, moved aside during a swap
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux): swap two paths in one step
ANOTHER_RUN = ("another run wrote this output while this one worked; this result was not kept "
               "(choose another name and run again)")


class StagedOutput:
    """A file or folder built under a hidden temporary name beside ``target``
    (:attr:`tmp`, ``.NAME.partial-HOST-PID-RANDOM``) and moved into place by
    :meth:`commit` only when complete; :meth:`abort` (or leaving a ``with`` block by an
    exception, Ctrl-C included) removes it, and ``target`` stays as it was.

    ``replace``: whether ``commit`` may replace a ``target`` that exists then (False: an
    output another run made meanwhile is kept, and this one is refused). An old folder is
    swapped out in one step (``renameat2``) and removed after, so a kill at any moment
    leaves the old result or the new one under the name, never a mix. Temporaries that
    killed runs left beside ``target`` are removed (an old folder moved aside is put back).
    """

    def __init__(self, target: str | os.PathLike, *, replace: bool = True) -> None:
        self.target = Path(target)
        self.replace = replace
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.target)
        self.tmp = temporary_path(self.target)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def commit(self, *, mode: int | None = None) -> Path:
        """Move the finished temporary over ``target`` (``mode``: permissions of a file);
        FileExistsError when ``target`` appeared meanwhile and ``replace`` is False."""
        tmp, target = self.tmp, self.target
        if mode is not None and tmp.is_file():
            os.chmod(tmp, mode)
        there = target.exists() or target.is_symlink()
        if there and not self.replace:
            raise FileExistsError(errno.EEXIST, ANOTHER_RUN, str(target))
        if tmp.is_dir() and there and target.is_dir() and not target.is_symlink():
            if swap_paths(tmp, target):
                remove_path(tmp)  # the old result, now under the temporary name
                return target
            old = temporary_path(target, OLD_TAG)
            os.replace(target, old)
            os.replace(tmp, target)
            remove_path(old)
        elif tmp.is_dir() and there:
            target.unlink()  # a file (or link) where a folder goes
            os.replace(tmp, target)
        elif tmp.is_dir() or self.replace:
            # a folder: rename fails on a non-empty folder that appeared meanwhile
            (os.replace if self.replace else os.rename)(tmp, target)
        else:
            _link_no_replace(tmp, target)
        return target

    def abort(self) -> None:
        """Remove the temporary (nothing under ``target`` changes)."""
        remove_path(self.tmp)


def atomic_write(target: str | os.PathLike, write: Callable[[Path], Any], *,
                 mode: int | None = None, replace: bool = True) -> Path:
    """Make ``target`` (a file or a folder) all at once: ``write(tmp)`` creates it under
    a hidden temporary name beside ``target`` (a :class:`StagedOutput`); only when that
    returns is it moved over ``target``. On any error, Ctrl-C included, the temporary is
    removed and ``target`` is as it was; an OSError names ``target``, never the
    temporary. ``mode``: permissions for a written file (e.g. 0o644 for shared weights).
    ``replace=False``: refuse (FileExistsError) when ``target`` appeared while writing.
    Checking whether ``target`` may be replaced at all is the caller's job. Returns
    ``target``.
    """
    staged = StagedOutput(target, replace=replace)
    try:
        write(staged.tmp)
        staged.commit(mode=mode)
    except BaseException as err:
        staged.abort()
        renamed = user_named(err, staged.tmp, staged.target)
        if renamed is not err:
            raise renamed from None
        raise
    return staged.target


def user_named(err: BaseException, tmp: Path, target: Path) -> BaseException:
    """``err`` with ``target`` instead of the hidden temporary ``tmp`` in its file name
    (an OSError about the temporary), else ``err`` itself."""
    if not isinstance(err, OSError) or str(tmp) not in f"{err.filename} {err.filename2}":
        return err
    try:
        return type(err)(err.errno, err.strerror or str(err), str(target))
    except Exception:  # noqa: BLE001 - an OSError subclass with another signature
        return err


def temporary_path(target: str | os.PathLike, tag: str = TEMP_TAG) -> Path:
    """A fresh hidden name beside ``target`` that says which run owns it:
    ``.NAME<tag>HOST-PID-RANDOM`` (HOST: 6 hex digits of the host name's hash)."""
    target = Path(target)
    return target.with_name(f".{target.name}{tag}{_owner()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a name :func:`temporary_path` makes (a hidden output being built)."""
    name = Path(path).name
    return name.startswith(".") and (TEMP_TAG in name or OLD_TAG in name)


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``target`` left by killed runs of this host (their
    process is gone); an old folder a killed swap moved aside is put back when
    ``target`` is missing. Returns the paths removed or restored."""
    target = Path(target)
    prefix = f".{target.name}"
    try:
        entries = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    host = _owner().split("-")[0]
    done = []
    for entry in entries:
        rest = entry.name[len(prefix):]
        tag = next((t for t in (TEMP_TAG, OLD_TAG) if rest.startswith(t)), None)
        if tag is None:
            continue
        owner = rest[len(tag):].split("-")
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
            continue
        if _alive(int(owner[1])):
            continue
        try:
            if tag == OLD_TAG and not (target.exists() or target.is_symlink()):
                os.replace(entry, target)
            else:
                remove_path(entry)
        except OSError:
            continue
        done.append(entry)
    return done


def swap_paths(a: Path, b: Path) -> bool:
    """Exchange two existing paths in one step (Linux ``renameat2``); False where the
    system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                     ctypes.c_uint]
    at_cwd = -100
    return func(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _link_no_replace(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)  # fails when target exists: no other run's file is replaced
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, ANOTHER_RUN, str(target)) from None
    except OSError:  # no hard links here (some network and FAT file systems)
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "already exists", str(target)) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _owner() -> str:
    host = hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()
    return f"{host[:6]}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


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
            # said in the viewer's Save dialog too: no command-line flag here (the CLI
            # checks its outputs first, with its own --overwrite advice)
            raise FileExistsError(f"{folder} already exists; choose another name")
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
