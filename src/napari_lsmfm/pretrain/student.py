"""What pretraining trains: the student Foundation with its heads, and the EMA teacher.

:func:`build_student` makes a fresh student for a config (our own small text tower, or
a local BERT with :func:`external_text_tower`); :func:`student_from_spec` rebuilds one
for a checkpoint and :func:`student_from_init` reads a saved Foundation to start from.
:class:`PretrainModel` is what the optimizer trains and DDP wraps.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from napari_lsmfm.model import Foundation, FoundationSpec, build_lsmfm_text_tower, build_vocab

from .config import TEXT_OBJECTIVES, PretrainConfig
from .objectives import LOGIT_SCALE_INIT, ReconstructionHead, StructureHead


class PretrainModel(nn.Module):
    """What the optimizer trains (and DDP wraps): the student Foundation, the reconstruction
    head, the CLIP temperature and the structure head. ``forward(x, texts, voxels)``
    returns dense features (N, E, D, H, W), the reconstruction at the ``voxels``
    (N, D, H, W bool) as (M, 1) or None, image embeddings (N, P) or None, text embeddings
    (T, P) or None (both L2-normalised) and structure logits (N, 1, D, H, W) or None."""

    def __init__(self, student: Foundation, recon_kernel: int | None, clip: bool,
                 structure: bool = False) -> None:
        super().__init__()
        self.student = student
        self.recon_head = (
            ReconstructionHead(student.spec.embed_dim, 1, recon_kernel)
            if recon_kernel is not None
            else None
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT)) if clip else None
        self.structure_head = StructureHead(student.spec.embed_dim) if structure else None

    def forward(
        self,
        x: torch.Tensor,
        texts: Sequence[str] | None = None,
        voxels: torch.Tensor | None = None,
    ):
        dense = self.student(x)
        recon = None
        if self.recon_head is not None and voxels is not None:
            recon = self.recon_head.forward_voxels(dense, voxels)
        image = text = None
        if texts is not None:
            image = self.student.pool_embedding(dense)  # the embedding embed_image returns
            text = F.normalize(self.student.text_tower(list(texts)).float(), dim=-1)
        structure = self.structure_head(dense) if self.structure_head is not None else None
        return dense, recon, image, text, structure


def build_student(config: PretrainConfig, captions_texts: Sequence[str]) -> Foundation:
    """A randomly initialised Foundation for ``config.spec``; image+text with our own text
    tower (vocabulary from ``captions_texts``) when a text objective is on."""
    spec_dict = {k: v for k, v in dict(config.spec).items() if k not in ("variant", "text")}
    use_text = any(o in config.objectives for o in TEXT_OBJECTIVES)
    if not use_text:
        return Foundation(FoundationSpec.from_dict({**spec_dict, "variant": "image_only"}))
    if config.text_model:
        tower = external_text_tower(config.text_model, config.proj_dim)
    else:
        vocab = build_vocab(captions_texts, tokenizer=config.text_tokenizer)
        heads = 4 if config.text_width % 4 == 0 else 1
        tower = build_lsmfm_text_tower(
            vocab,
            config.proj_dim,
            width=config.text_width,
            layers=config.text_layers,
            heads=heads,
            tokenizer=config.text_tokenizer,
        )
    spec = FoundationSpec.from_dict(
        {**spec_dict, "variant": "image_text", "proj_dim": config.proj_dim, "text": tower.config()}
    )
    return Foundation(spec, text_tower=tower)


def external_text_tower(folder: str | os.PathLike, proj_dim: int):
    """A "bert" TextTower from a local Hugging Face BERT folder (no download): its weights,
    its vocab.txt, and a fresh projection to ``proj_dim``. Raises ValueError when the
    folder is not a BERT or ``transformers`` is missing."""
    from napari_lsmfm.model import TextTower, TextTowerUnavailable
    from napari_lsmfm.model.text import bert_config_from_state

    folder = Path(folder).expanduser()
    if not (folder / "vocab.txt").is_file() or not (folder / "config.json").is_file():
        raise ValueError(
            f"--text-model {folder} must be a local BERT folder with config.json, the weights "
            "and vocab.txt (e.g. what transformers' save_pretrained writes)"
        )
    try:
        from transformers import BertModel

        bert = BertModel.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise ValueError(
            "--text-model needs the optional package transformers: "
            "pip install 'napari-lsmfm[text]'"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--text-model {folder}: not a readable BERT ({exc})") from None
    state = bert.state_dict()
    config = bert_config_from_state(state, proj_dim=proj_dim, name=folder.name)
    try:
        tower = TextTower.from_config(config, vocab=folder / "vocab.txt")
    except TextTowerUnavailable as exc:
        raise ValueError(str(exc)) from None
    missing, _ = tower.encoder.load_state_dict(state, strict=False)
    weights = {k for k, v in tower.encoder.named_parameters()}
    if weights & set(missing):
        raise ValueError(f"--text-model {folder}: weights missing for {sorted(missing)[:3]}")
    return tower


def student_from_spec(spec: FoundationSpec, config: PretrainConfig) -> Foundation:
    """A Foundation for a saved spec (resume), text tower included."""
    from napari_lsmfm.model import TextTower

    tower = None
    if spec.text is not None:
        vocab = Path(config.text_model) / "vocab.txt" if config.text_model else None
        tower = TextTower.from_config(spec.text, vocab=vocab)
    return Foundation(spec, text_tower=tower)


def student_from_init(config: PretrainConfig, objectives: Sequence[str]) -> Foundation:
    """The student for ``config.init``: a saved Foundation, read on the CPU."""
    from napari_lsmfm.model import load_foundation

    try:
        student = load_foundation(config.init, device="cpu")
    except (OSError, ValueError) as exc:
        raise ValueError(f"--init {config.init}: not a readable foundation model ({exc})") from None
    if any(o in objectives for o in TEXT_OBJECTIVES) and student.text_tower is None:
        raise ValueError(
            f"--init {config.init} has no text tower, but align / clip were asked for; "
            "drop them (--objectives recon,distill,...) or start afresh"
        )
    if student.text_tower is not None and student.text_tower.kind == "bert":
        raise ValueError("--init with a BERT text tower is not supported; start afresh")
    return student.train()


def text_encoder_params(student: Foundation, config: PretrainConfig) -> list[nn.Parameter]:
    """Freeze a BERT text encoder except its top layers; returns those trainable parameters
    (they get their own optimizer group). Our own small tower trains whole: []."""
    tower = student.text_tower
    if tower is None or tower.kind != "bert":
        return []
    tower.encoder.requires_grad_(False)
    layers = tower.encoder.encoder.layer
    keep = max(0, min(config.text_trainable_layers, len(layers)))
    for layer in layers[len(layers) - keep :]:
        layer.requires_grad_(True)
    return [p for p in tower.encoder.parameters() if p.requires_grad]


def teacher_of(student: Foundation) -> Foundation:
    """The EMA teacher: a frozen copy of the student's backbone (no text tower, no image
    projection), in eval mode."""
    teacher = copy.deepcopy(student)
    teacher.text_tower = None
    teacher.image_proj = None
    teacher.requires_grad_(False)
    return teacher.eval()
