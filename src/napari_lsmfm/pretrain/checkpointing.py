"""Resumable pretraining checkpoints: ``OUT/checkpoints/step_NNNNNN.pt``, the last few kept.

A checkpoint holds everything a resumed run needs to continue as if never stopped: the
model (student and heads), the teacher, the optimizer, the loss scaler, the RNG state,
the recent loss history and the wall time so far. Files are written whole or not at
all (:func:`~napari_lsmfm.engine.store.atomic_write`) and read weights-only.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_lsmfm.engine.store import atomic_write

from .config import PretrainConfig

CHECKPOINT_FORMAT = "napari-lsmfm-pretrain"
CHECKPOINT_DIR = "checkpoints"
_CKPT_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(out: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of step ``step`` of a run writing to ``out`` goes."""
    return Path(out) / CHECKPOINT_DIR / f"step_{step:06d}.pt"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step under ``out/checkpoints``, or None."""
    folder = Path(out).expanduser() / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_NAME.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a pretraining checkpoint (``weights_only=True``: plain tensors and containers).
    Raises ValueError when the file is not one."""
    path = Path(path).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle refusals, ...
        raise ValueError(
            f"{path} is not a readable pretraining checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); resume from another "
            f"step_*.pt or start afresh"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a napari-lsmfm pretraining checkpoint")
    return state


def write_checkpoint(path: Path, state: dict, keep: int) -> None:
    """Write ``state`` to ``path`` (whole or not at all), then delete all but the ``keep``
    newest checkpoints beside it (``keep`` 0: keep all)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if keep > 0:
        older = sorted(
            (int(m.group(1)), p) for p in path.parent.iterdir() if (m := _CKPT_NAME.match(p.name))
        )
        for _, old in older[:-keep]:
            old.unlink(missing_ok=True)


def checkpoint_state(
    step: int,
    spec: dict,
    config: PretrainConfig,
    model: nn.Module,
    teacher: Any,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    history: Sequence[dict[str, float]],
    wall_time_s: float,
) -> dict:
    """What a checkpoint of step ``step`` holds (see :func:`load_checkpoint`): ``spec`` is
    the student's FoundationSpec as a dict, ``teacher`` the EMA teacher or None,
    ``scaler`` the fp16 loss scaler or None, ``history`` the recent loss records."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "step": step,
        "spec": spec,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "teacher": teacher.backbone.state_dict() if teacher is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "history": list(history),
        "wall_time_s": wall_time_s,
    }


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (keys, dtypes, shapes and bytes): equal digests mean
    identical weights (used to check that DDP ranks agree)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
