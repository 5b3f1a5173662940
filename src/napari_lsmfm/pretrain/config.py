"""What shapes a pretraining run, with no torch: the settings, the objectives, the presets.

The command line builds its ``lsmfm pretrain`` parser from these names (choices and
defaults), so ``lsmfm --help`` starts without importing torch or MONAI; the loop and
its parts (:mod:`.loop`) read the same :class:`PretrainConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

OBJECTIVES = ("recon", "distill", "align", "clip", "structure")
# The published recipe's objectives (the default); "structure" needs data with masks.
PUBLISHED_OBJECTIVES = ("recon", "distill", "align", "clip")
TEXT_OBJECTIVES = ("align", "clip")
# The published recipe's loss weights, plus ours for "structure".
DEFAULT_LOSS_WEIGHTS = {"distill": 0.5, "recon": 0.3, "align": 0.05, "clip": 0.3,
                        "structure": 0.5}
# The embedded default backbone: small enough to finetune on a laptop CPU (see README).
DEFAULT_SPEC = {
    "architecture": "unet",
    "embed_dim": 16,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 0,
    "norm": "INSTANCE",
}
# Named backbones for --arch: the default, and the published sizes (GPU territory).
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT_SPEC,
    "unet-published": {
        "architecture": "unet",
        "embed_dim": 128,
        "channels": [32, 64, 128, 256, 512],
        "strides": [2, 2, 2, 1],
        "num_res_units": 2,
        "norm": "BATCH",
    },
    "swinunetr-published": {"architecture": "swinunetr", "embed_dim": 512, "feature_size": 36},
    "swinunetr-small": {"architecture": "swinunetr", "embed_dim": 48, "feature_size": 12},
}
MASKING_MODES = ("cube", "intensity")  # where cubes are masked: see .masking.cube_mask
AMP_MODES = ("auto", "bf16", "fp16", "off")  # mixed precision: see .step.amp_mode_dtype


def as_patch_size(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    """An int or (D, H, W) as a (D, H, W) tuple of positive voxel counts."""
    size = (patch_size,) * 3 if isinstance(patch_size, (int, np.integer)) else tuple(patch_size)
    if len(size) != 3 or min(int(s) for s in size) < 1:
        raise ValueError(f"patch size must be a positive int or (D, H, W), got {patch_size!r}")
    return tuple(int(s) for s in size)


@dataclass
class PretrainConfig:
    """Everything that shapes a pretraining run (all JSON-ready; ``to_dict``/``from_dict``).

    steps: optimizer steps in total. patch_size: voxels (int or (D, H, W)). batch_size:
    patches per step and rank (a C-channel patch gives C single-channel items).
    lr, weight_decay: AdamW; the learning rate warms up linearly over ``warmup_steps`` and
    then follows a cosine down to ``min_lr_ratio * lr``.
    mask_ratio: fraction of cubes masked; ``warmup_mask_ratio`` during the first
    ``warmup_steps``. cube_sizes: cube edges in voxels, one drawn per patch.
    masking: "cube" (uniform) or "intensity" (where the signal is). channel_separated: a
    different mask per channel of multichannel data.
    objectives: any of "recon", "distill", "align", "clip" (the published recipe, the
    default) and "structure" (needs a source with structure masks: the synthetic corpus).
    loss_weights: per objective.
    ema_decay: teacher momentum. teacher_temp, student_temp: distillation temperatures.
    recon_kernel: kernel of the reconstruction head's first two convolutions (1 or 3).
    grad_clip: max gradient norm (None: off). checkpoint_every: steps between checkpoints
    (0: only at the end); keep_checkpoints: how many to keep (0: all).
    seed: of weights, data and masks. device: auto / cpu / cuda[:N] / mps (under torchrun
    each rank uses cuda:LOCAL_RANK). amp: "auto" (bf16 on CUDA, fp16 where bf16 is missing,
    off elsewhere), "bf16", "fp16" or "off". num_workers: data-loading processes.
    spec: the backbone (FoundationSpec fields without text; see ``DEFAULT_SPEC``).
    proj_dim, text_width, text_layers, text_tokenizer: the image-text space and our own
    text tower, whose vocabulary is built from the captions and stored in the weights.
    clip_all_labels: besides the batch's captions, CLIP contrasts each image with one
    description of every other label (captions through labels), so batches of two work.
    text_model: optional local folder of a Hugging Face BERT (config.json, weights,
    vocab.txt; needs ``transformers``) used as the text tower instead of ours, as in the
    published model: frozen during the warm-up, then its top ``text_trainable_layers``
    layers train at ``text_lr_scale * lr``.
    init: a saved Foundation folder (or model.safetensors) the student starts from instead
    of random weights (its architecture and text tower replace ``spec``); the optimizer
    and the teacher start afresh. For continuing a finished model with other objectives;
    an interrupted run continues with ``resume`` instead.
    """

    steps: int = 3000
    patch_size: int | tuple[int, int, int] = 64
    batch_size: int = 2
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    mask_ratio: float = 0.3
    warmup_mask_ratio: float = 0.05
    cube_sizes: tuple[int, ...] = (8, 16)
    masking: str = "cube"
    channel_separated: bool = False
    objectives: tuple[str, ...] = PUBLISHED_OBJECTIVES
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    ema_decay: float = 0.994
    teacher_temp: float = 0.025
    student_temp: float = 0.1
    recon_kernel: int = 1
    grad_clip: float | None = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    num_workers: int = 0
    spec: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SPEC))
    proj_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_tokenizer: str = "trigram"
    clip_all_labels: bool = True
    text_model: str | None = None
    text_trainable_layers: int = 4
    text_lr_scale: float = 0.1
    init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.objectives, str):
            self.objectives = tuple(o for o in self.objectives.split(",") if o.strip())
        wanted = {str(o).strip() for o in self.objectives}
        unknown = sorted(wanted - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"unknown objectives {unknown}: choose from {', '.join(OBJECTIVES)}")
        if not wanted:
            raise ValueError(f"at least one objective is needed: {', '.join(OBJECTIVES)}")
        self.objectives = tuple(o for o in OBJECTIVES if o in wanted)
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **dict(self.loss_weights)}
        self.patch_size = as_patch_size(self.patch_size)
        self.cube_sizes = tuple(int(c) for c in self.cube_sizes)
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {MASKING_MODES}, got {self.masking!r}")
        for name in ("mask_ratio", "warmup_mask_ratio", "ema_decay"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.cube_sizes or min(self.cube_sizes) < 1:
            raise ValueError(f"cube sizes must be positive, got {self.cube_sizes}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if dict(self.spec) != DEFAULT_SPEC:  # the default is valid: no torch for `--help`
            from napari_lsmfm.model.foundation import FoundationSpec

            FoundationSpec.from_dict(dict(self.spec))  # fail early on a bad architecture

    def to_dict(self) -> dict:
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        out["cube_sizes"] = list(self.cube_sizes)
        out["objectives"] = list(self.objectives)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(data).items() if k in known})
