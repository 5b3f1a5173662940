"""Fitting saved tensors into modules: every key used, every parameter set, or a clear error.

Shared by the published-checkpoint reader (:mod:`.published`) and our own format
(:mod:`.saved`): :func:`fit_state` loads a state dict strictly (only a named head may be
dropped, for a shape mismatch) and :class:`LoadReport` records what loading did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import backbones
from .foundation import FoundationSpec
from .pickled import CheckpointError

Progress = Callable[[float, str], Any]


@dataclass
class LoadReport:
    """What loading did. `used`: checkpoint keys loaded into the foundation; `ignored`:
    keys that are not part of it (teacher, reconstruction head, ...); `dropped`: head keys
    skipped for a shape mismatch; `notes`: anything a user should know."""

    format: str
    used: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def report_progress(progress: Progress | None, fraction: float, message: str) -> None:
    """Call ``progress(fraction, message)`` when a callback was given."""
    if progress is not None:
        progress(float(fraction), message)


def fit_state(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    path: Path | str,
    what: str,
    expected: str,
    head_prefixes: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
    """Load `state` into `module` so that every key is used and every parameter is set.

    Only keys under `head_prefixes` may be dropped, and only for a shape mismatch.
    Returns (used keys, dropped keys); raises CheckpointError naming what did not fit.
    """
    own = module.state_dict()
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    dropped = [k for k in mismatched if head_prefixes and k.startswith(head_prefixes)]
    mismatched = [k for k in mismatched if k not in dropped]
    missing = [k for k in own if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs "
                f"model {tuple(own[k].shape)}"
            )
        if missing:
            parts.append(f"missing {len(missing)} key(s): {backbones.describe_keys(missing)}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} key(s): {backbones.describe_keys(unexpected)}"
            )
        raise CheckpointError(
            f"{path}: the {what} weights do not match the expected {expected} "
            f"({'; '.join(parts)}); the file is "
            "from another model or damaged — use an unmodified published or napari-lsmfm file."
        )
    used = {k: v for k, v in state.items() if k not in dropped}
    module.load_state_dict(used, strict=not dropped)
    return list(used), dropped


def load_encoder_weights(
    network: nn.Module, state: Mapping[str, torch.Tensor], *, architecture: str
) -> LoadReport:
    """Load a foundation backbone's weights (e.g. `foundation.backbone.state_dict()`) into a
    network of the same architecture with another number of outputs, as the published
    finetuning does: every key must fit except the final layer's, which is dropped on a
    shape mismatch and reported."""
    used, dropped = fit_state(
        network,
        state,
        path="backbone",
        what="encoder",
        expected=f"{architecture} network",
        head_prefixes=backbones.HEAD_PREFIXES[architecture],
    )
    notes = [f"kept the network's own final layer ({len(dropped)} tensors)"] if dropped else []
    return LoadReport(format="state_dict", used=used, dropped=dropped, notes=notes)


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` under ``prefix``, with the prefix removed from their keys."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def describe_spec(spec: FoundationSpec) -> str:
    """The architecture in one line, e.g. ``SwinUNETR(feature_size=36, embed_dim=512)``."""
    if spec.architecture == "swinunetr":
        return f"SwinUNETR(feature_size={spec.feature_size}, embed_dim={spec.embed_dim})"
    return (
        f"UNet(channels={list(spec.channels)}, strides={list(spec.strides)}, "
        f"num_res_units={spec.num_res_units}, norm={spec.norm}, embed_dim={spec.embed_dim})"
    )
