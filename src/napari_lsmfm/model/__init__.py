"""The foundation model core (no Qt): backbones, checkpoint loading, the Foundation, text.

from napari_lsmfm.model import load_foundation
fm = load_foundation("swinunetr_image_text_best.ckpt", device="auto")
x = torch.from_numpy(fm.normalize(volume))[None, None]
dense = fm(x)               # (1, embed_dim, D, H, W)
levels = fm.features(x)     # multi-scale maps, finest first
emb = fm.embed_image(x)     # (1, proj_dim or embed_dim), L2-normalised
"""

from napari_lsmfm.engine.device import amp_dtype, available_devices, resolve_device

from .checkpoints import (
    DEFAULT_MODEL_DIR,
    CheckpointError,
    LoadReport,
    UnsafeCheckpointError,
    inspect_checkpoint,
    load_encoder_weights,
    load_foundation,
    read_torch_checkpoint,
    save_foundation,
)
from .foundation import (
    NORMALIZATION,
    Foundation,
    FoundationSpec,
    normalize_intensity,
    percentile_range,
)
from .text import TextTower, TextTowerUnavailable, build_lsmfm_text_tower, build_vocab

__all__ = [
    "DEFAULT_MODEL_DIR",
    "NORMALIZATION",
    "CheckpointError",
    "Foundation",
    "FoundationSpec",
    "LoadReport",
    "TextTower",
    "TextTowerUnavailable",
    "UnsafeCheckpointError",
    "amp_dtype",
    "available_devices",
    "build_lsmfm_text_tower",
    "build_vocab",
    "inspect_checkpoint",
    "load_encoder_weights",
    "load_foundation",
    "normalize_intensity",
    "percentile_range",
    "read_torch_checkpoint",
    "resolve_device",
    "save_foundation",
]
