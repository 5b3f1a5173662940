"""The two published backbones, built with MONAI so that checkpoints load key for key.

A backbone maps (B, 1, D, H, W) to dense features (B, embed_dim, D, H, W). Besides the
dense output it offers encoder levels, read through forward hooks (never by forking
MONAI's forward):

- SwinUNETR: the five hidden states of `swinViT`, channels fs, 2fs, 4fs, 8fs, 16fs at
  strides 2, 4, 8, 16, 32 (sizes must be multiples of 32).
- UNet: the output of each down block and of the bottom block; strides are the
  cumulative products of `strides` (sizes must be multiples of their product).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .monai_import import import_monai

ARCHITECTURES = ("swinunetr", "unet")

# Defaults of the published pretraining code when its config leaves a value out.
PUBLISHED_SWIN_FEATURE_SIZE = 48
PUBLISHED_UNET = {
    "channels": (32, 64, 128, 256, 512),
    "strides": (2, 2, 2, 2),
    "num_res_units": 2,
    "norm": "INSTANCE",
}

# Keys of the network's final layer, the only ones that may differ when the same encoder
# is reused with another number of output channels (as the published finetuning does).
HEAD_PREFIXES = {"swinunetr": ("out.",), "unet": ("model.2.",)}


def build_backbone(spec: Any) -> nn.Module:
    """A MONAI SwinUNETR or UNet with one input channel and `spec.embed_dim` outputs."""
    import_monai()  # without transformers (.monai_import)
    if spec.architecture == "swinunetr":
        from monai.networks.nets import SwinUNETR

        kwargs: dict[str, Any] = {
            "in_channels": 1,
            "out_channels": int(spec.embed_dim),
            "feature_size": int(spec.feature_size),
        }
        # MONAI < 1.5 still asks for img_size (used only for checks); >= 1.5 rejects it.
        if "img_size" in inspect.signature(SwinUNETR.__init__).parameters:
            kwargs["img_size"] = (96, 96, 96)
        return SwinUNETR(**kwargs)
    if spec.architecture == "unet":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=int(spec.embed_dim),
            channels=tuple(int(c) for c in spec.channels),
            strides=tuple(int(s) for s in spec.strides),
            num_res_units=int(spec.num_res_units),
            norm=spec.norm,
        )
    raise ValueError(
        f"Unknown architecture {spec.architecture!r}; expected one of {ARCHITECTURES}."
    )


def size_multiple(spec: Any) -> int:
    """Spatial sizes the backbone accepts are multiples of this (inputs are padded to it)."""
    if spec.architecture == "swinunetr":
        return 32
    return max(1, math.prod(int(s) for s in spec.strides))


def encoder_channels(spec: Any) -> list[int]:
    """Channels of the encoder levels, finest first (the dense output not included)."""
    if spec.architecture == "swinunetr":
        fs = int(spec.feature_size)
        return [fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs]
    return [int(c) for c in spec.channels]


def encoder_strides(spec: Any) -> list[int]:
    """Strides (voxels of input per voxel of the level) of the encoder levels, finest first."""
    if spec.architecture == "swinunetr":
        return [2, 4, 8, 16, 32]
    strides = [int(s) for s in spec.strides]
    out, total = [], 1
    for i in range(len(spec.channels)):
        total *= strides[i] if i < len(strides) else 1  # the bottom block keeps the size
        out.append(total)
    return out


def encoder_taps(backbone: nn.Module, spec: Any) -> list[nn.Module]:
    """Modules whose outputs are the encoder levels, finest first.

    SwinUNETR: [swinViT] (it returns the five levels as a list). UNet: the down block of
    each level, then the bottom block.
    """
    if spec.architecture == "swinunetr":
        return [backbone.swinViT]
    taps: list[nn.Module] = []
    block: nn.Module = backbone.model
    # MONAI's UNet nests Sequential(down, SkipConnection(Sequential(...)), up) per level.
    # (MONAI's Convolution is a Sequential too: the bottom block is one when the UNet has
    # no residual units, so test for the skip connection, not the type.)
    while isinstance(block, nn.Sequential) and len(block) == 3 and hasattr(block[1], "submodule"):
        taps.append(block[0])
        block = block[1].submodule
    taps.append(block)
    return taps


def infer_architecture(encoder_state: Mapping[str, Any]) -> str | None:
    """Which backbone these (prefix-free) encoder keys belong to, or None."""
    keys = list(encoder_state)
    # any of a layout's keys names it, so a file missing a few (e.g. the first layer's)
    # is still recognised and then told which keys are missing
    if any(k.startswith(("swinViT.", "encoder10.", "decoder5.")) for k in keys):
        return "swinunetr"
    if any(k.startswith("model.") and k.split(".")[1].isdigit() for k in keys if "." in k):
        return "unet"
    return None


def infer_embed_dim(encoder_state: Mapping[str, torch.Tensor], architecture: str) -> int | None:
    """Output channels of the backbone, read from the shapes of its final layer."""
    if architecture == "swinunetr":
        weight = encoder_state.get("out.conv.conv.weight")
        return int(weight.shape[0]) if weight is not None else None
    # UNet's top up block: a transposed conv (in, out, k, k, k), then an optional residual unit.
    bias = encoder_state.get("model.2.0.conv.bias")
    if bias is not None:
        return int(bias.shape[0])
    weight = encoder_state.get("model.2.0.conv.weight")
    if weight is not None:
        return int(weight.shape[1])
    for key, value in encoder_state.items():
        if key.startswith("model.2.") and key.endswith("conv.bias"):
            return int(value.shape[0])
    return None


def infer_feature_size(encoder_state: Mapping[str, torch.Tensor]) -> int | None:
    """SwinUNETR's feature_size, from the patch embedding's output channels."""
    weight = encoder_state.get("swinViT.patch_embed.proj.weight")
    return int(weight.shape[0]) if weight is not None else None


def infer_unet_channels(encoder_state: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """UNet's channels, from the first conv of each down block (and of the bottom block)."""
    channels: list[int] = []
    prefix = "model."
    while True:
        first = _first_conv_weight(encoder_state, prefix + "0.")
        if first is None:
            break
        channels.append(int(first.shape[0]))
        nested = prefix + "1.submodule."
        if _first_conv_weight(encoder_state, nested + "0.") is None:
            bottom = _first_conv_weight(encoder_state, nested)
            if bottom is not None:
                channels.append(int(bottom.shape[0]))
            break
        prefix = nested
    return tuple(channels) if channels else None


def _first_conv_weight(state: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor | None:
    for tail in ("conv.unit0.conv.weight", "conv.weight"):
        value = state.get(prefix + tail)
        if value is not None:
            return value
    return None


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def describe_keys(keys: list[str], limit: int = 3) -> str:
    """A short, readable list of state-dict keys for error messages."""
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return shown + (f" and {more} more" if more > 0 else "")
