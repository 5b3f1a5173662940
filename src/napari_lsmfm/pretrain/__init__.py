"""Pretraining a Foundation on unlabelled volumes (no Qt).

>>> from napari_lsmfm.pretrain import PretrainConfig, pretrain
>>> pretrain(PretrainConfig(steps=3000), "synthetic://", "my_model/")   # or a folder of TIFF/Zarr
{'step': 3000, 'loss': ..., 'recon': ..., 'distill': ..., 'align': ..., 'clip': ..., ...}

``masking`` draws cube masks (uniform, intensity-based, channel-separated), ``objectives``
holds the losses, ``data`` the patch sources (a folder of volumes, the synthetic corpus),
``captions`` the label -> description tables, ``loop`` the single-process / DDP loop and
its checkpoints; ``cli`` is the ``lsmfm pretrain`` subcommand.
"""

from .captions import SYNTHETIC_CAPTIONS, CaptionTable, load_captions
from .data import (
    BatchStream,
    Patch,
    PatchDataset,
    PatchSource,
    SyntheticCorpus,
    find_volumes,
    open_source,
)
from .loop import (
    ARCH_PRESETS,
    DEFAULT_LOSS_WEIGHTS,
    DEFAULT_SPEC,
    OBJECTIVES,
    PretrainConfig,
    PretrainModel,
    build_student,
    external_text_tower,
    latest_checkpoint,
    load_checkpoint,
    pretrain,
    weights_digest,
)
from .masking import apply_mask, cube_mask, mask_ratio_at
from .objectives import (
    ReconstructionHead,
    StructureHead,
    alignment_loss,
    clip_loss,
    distillation_loss,
    ema_update,
    masked_l1,
    structure_loss,
)

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
