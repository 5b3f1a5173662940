"""Task heads on top of the foundation, and the one saved-model format for all tasks.

Heads:
- :class:`VoxelHead`: a per-voxel MLP on cached feature vectors (quick mode); input
  standardisation is part of the module, so the saved weights are self-contained.
- :class:`DenseHead`: a small conv head on the foundation's dense output plus the
  normalised intensity (full mode, trained end to end with the backbone).

Saved model (every finetuned head, whatever the task): a folder with
``config.json`` (``format``, ``version``, ``task``, ``foundation`` {source, spec,
fingerprint}, ``normalization``, and the task's own settings) and one safetensors
file per part (``head.safetensors``, ``backbone.safetensors`` when the backbone was
finetuned). No pickle anywhere; written to a temporary folder and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_FORMAT",
    "DenseHead",
    "VoxelHead",
    "check_foundation",
    "foundation_fingerprint",
    "foundation_record",
    "load_task_model",
    "save_task_model",
]

MODEL_FORMAT = "napari-lsmfm-task"
MODEL_VERSION = 1
CONFIG_NAME = "config.json"


class VoxelHead(nn.Module):
    """Per-voxel classifier: standardise, then an MLP; (N, C_in) -> (N, n_out) logits."""

    def __init__(
        self, in_channels: int, n_out: int, hidden: int = 32, depth: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.n_out = int(n_out)
        self.hidden = int(hidden)
        self.depth = int(depth)
        self.dropout = float(dropout)
        self.register_buffer("mean", torch.zeros(self.in_channels))
        self.register_buffer("std", torch.ones(self.in_channels))
        # dropout on the inputs: no single (possibly uninformative) feature is relied upon
        layers: list[nn.Module] = [nn.Dropout(self.dropout)] if self.dropout > 0 else []
        width = self.in_channels
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            width = self.hidden
        layers.append(nn.Linear(width, self.n_out))
        self.mlp = nn.Sequential(*layers)

    def set_standardization(self, samples: torch.Tensor) -> None:
        """Per-channel mean and std from training vectors (N, C_in)."""
        with torch.no_grad():
            self.mean.copy_(samples.mean(0))
            self.std.copy_(samples.std(0).clamp_min(1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std)

    def settings(self) -> dict:
        return {"in_channels": self.in_channels, "n_out": self.n_out, "hidden": self.hidden,
                "depth": self.depth, "dropout": self.dropout}


class DenseHead(nn.Module):
    """Conv head: (B, C_in, z, y, x) -> (B, n_out, z, y, x) logits; two 1x1x1 convs (the
    backbone supplies the spatial context; a 3x3x3 conv here would cost more than it)."""

    def __init__(self, in_channels: int, n_out: int, hidden: int = 32) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.n_out = int(n_out)
        self.hidden = int(hidden)
        self.net = nn.Sequential(
            nn.Conv3d(self.in_channels, self.hidden, 1),
            nn.ReLU(),
            nn.Conv3d(self.hidden, self.n_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def settings(self) -> dict:
        return {"in_channels": self.in_channels, "n_out": self.n_out, "hidden": self.hidden}


# ------------------------------------------------------------------- foundation record

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def foundation_fingerprint(foundation: nn.Module) -> str:
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


def _version(module: nn.Module) -> tuple:
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
    parts: Mapping[str, Mapping[str, torch.Tensor]],
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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        for name, state in parts.items():
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
            save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"format": MODEL_FORMAT})
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_task_model(
    folder: str | os.PathLike, *, task: str | None = None
) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
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
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name in config.get("parts", []):
        path = config_path.parent / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"{folder}: {path.name} is missing; copy the whole model folder")
        try:
            parts[name] = load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types
            raise ValueError(f"{path}: damaged safetensors file ({type(err).__name__})") from None
    return config, parts
