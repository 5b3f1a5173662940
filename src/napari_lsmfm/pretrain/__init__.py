"""Pretraining a Foundation on unlabelled volumes (no Qt).

>>> from napari_lsmfm.pretrain import PretrainConfig, pretrain
>>> pretrain(PretrainConfig(steps=3000), "synthetic://", "my_model/")   # or a folder of TIFF/Zarr
{'step': 3000, 'loss': ..., 'recon': ..., 'distill': ..., 'align': ..., 'clip': ..., ...}

``config`` holds the settings and the names the command line offers (no torch);
``masking`` draws cube masks (uniform, intensity-based, channel-separated),
``objectives`` holds the losses, ``data`` the patch sources (a folder of volumes, the
synthetic corpus), ``captions`` the label -> description tables, ``student`` the
trained model (student, heads, teacher), ``step`` one optimizer step, ``world`` the
DDP process group, ``checkpointing`` the resumable checkpoints and ``loop`` the run.

Names are imported on first use (PEP 562), so ``import napari_lsmfm.pretrain.config``
imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "captions": ("SYNTHETIC_CAPTIONS", "CaptionTable", "load_captions"),
    "checkpointing": ("latest_checkpoint", "load_checkpoint", "weights_digest"),
    "config": ("ARCH_PRESETS", "DEFAULT_LOSS_WEIGHTS", "DEFAULT_SPEC", "OBJECTIVES",
               "PretrainConfig"),
    "data": ("BatchStream", "Patch", "PatchDataset", "PatchSource", "SyntheticCorpus",
             "find_volumes", "open_source"),
    "loop": ("pretrain",),
    "masking": ("apply_mask", "cube_mask", "mask_ratio_at"),
    "objectives": ("ReconstructionHead", "StructureHead", "alignment_loss", "clip_loss",
                   "distillation_loss", "ema_update", "masked_l1", "structure_loss"),
    "student": ("PretrainModel", "build_student", "external_text_tower"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


__all__ = [
    "ARCH_PRESETS",
    "DEFAULT_LOSS_WEIGHTS",
    "DEFAULT_SPEC",
    "OBJECTIVES",
    "SYNTHETIC_CAPTIONS",
    "BatchStream",
    "CaptionTable",
    "Patch",
    "PatchDataset",
    "PatchSource",
    "PretrainConfig",
    "PretrainModel",
    "ReconstructionHead",
    "StructureHead",
    "SyntheticCorpus",
    "alignment_loss",
    "apply_mask",
    "build_student",
    "clip_loss",
    "cube_mask",
    "distillation_loss",
    "ema_update",
    "external_text_tower",
    "find_volumes",
    "latest_checkpoint",
    "load_captions",
    "load_checkpoint",
    "mask_ratio_at",
    "masked_l1",
    "open_source",
    "pretrain",
    "structure_loss",
    "weights_digest",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
