"""Describing foundation weights: what :meth:`Foundation.info` and ``lsmfm info`` say.

``lsmfm info`` describes a weights file from its config and tensor shapes, without
building the network (so without importing MONAI, which takes seconds): the parameter
count of a module is the count of its saved floating point tensors, batch-norm
statistics left out. Only a text tower is built, to check it fits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import backbones

if TYPE_CHECKING:
    from .foundation import FoundationSpec


def no_text_reason(spec: FoundationSpec) -> str:
    """Why a foundation of ``spec`` has no text tower when nothing more specific is known."""
    if spec.variant == "image_only":
        return "This foundation is image-only: it has no text tower to embed prompts."
    return "This foundation has no text tower loaded."


def spec_info(spec: FoundationSpec, *, parameters: int, text_tower: Any,
              text_unavailable_reason: str | None, source: str, device: str) -> dict:
    """The description :meth:`Foundation.info` gives, from its parts."""
    out: dict[str, Any] = {"architecture": spec.architecture}
    if spec.architecture == "swinunetr":
        out["feature_size"] = spec.feature_size
    else:
        out["channels"] = list(spec.channels)
        out["strides"] = list(spec.strides)
        out["num_res_units"] = spec.num_res_units
        out["norm"] = list(spec.norm) if isinstance(spec.norm, tuple) else spec.norm
    out.update(
        embed_dim=spec.embed_dim,
        proj_dim=spec.proj_dim,
        parameters=int(parameters),
        variant=spec.variant,
        text_tower=text_tower is not None,
        text_tower_kind=text_tower.kind if text_tower is not None else None,
        text_unavailable_reason=text_unavailable_reason,
        source=source,
        device=device,
    )
    return out


# Saved tensors of a backbone that are buffers, not parameters (besides integer ones such
# as num_batches_tracked and SwinUNETR's relative_position_index).
FLOAT_BUFFERS = ("running_mean", "running_var")


def count_saved_parameters(tensors: dict[str, torch.Tensor]) -> int:
    """The parameters a module would have whose state dict is ``tensors``: floating point
    tensors other than batch-norm statistics."""
    return sum(t.numel() for k, t in tensors.items()
               if t.is_floating_point() and not k.endswith(FLOAT_BUFFERS))


def describe_weights(spec: FoundationSpec, image_tensors: dict[str, torch.Tensor],
                     text_tower: Any, text_unavailable_reason: str | None, *, source: str,
                     report: Any) -> dict:
    """What :meth:`Foundation.info` would say (on the CPU) of weights not built into a
    network: ``image_tensors`` (backbone and image projection) are counted, ``text_tower``
    (a built tower or None) measured; ``report`` (a LoadReport) adds format and notes."""
    if text_tower is None and text_unavailable_reason is None:
        text_unavailable_reason = no_text_reason(spec)
    info = spec_info(
        spec, parameters=count_saved_parameters(image_tensors)
        + backbones.count_parameters(text_tower), text_tower=text_tower,
        text_unavailable_reason=text_unavailable_reason if text_tower is None else None,
        source=source, device="cpu")
    info["format"] = report.format
    info["notes"] = list(report.notes)
    return info
