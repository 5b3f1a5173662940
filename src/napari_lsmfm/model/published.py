"""Published lsm_fm Lightning checkpoints (``.ckpt``) as a Foundation.

The architecture comes from ``hyper_parameters["model"]`` and must agree with the
weights; the backbone from ``student_encoder.*`` (every key must fit), the projections
from ``image_proj.*`` / ``text_proj.*``, the BERT text tower from ``text_encoder.*``
when ``transformers`` and a vocab.txt are at hand. Everything else (the teacher, the
reconstruction head) is training-only and reported as ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import backbones
from .describe import describe_weights
from .foundation import Foundation, FoundationSpec
from .pickled import EXPECTED_FILES, CheckpointError
from .text import TextTower, TextTowerUnavailable, bert_config_from_state
from .weights import (
    LoadReport,
    Progress,
    describe_spec,
    fit_state,
    report_progress,
    strip_prefix,
)

ENCODER_PREFIX = "student_encoder."
# Parts of a pretraining checkpoint that are not the foundation (used only for training).
TRAINING_ONLY = ("teacher_encoder.", "reconstruction_head.", "logit_scale", "ema_decay")
_ARCH_NAME_KEYS = ("name", "arch", "architecture", "backbone", "model_name", "network", "type")
_DISAGREE = (
    "expected the two to agree, as in an unmodified published checkpoint — the file was edited "
    "or assembled from different runs; use the original file"
)


def _architecture_from_hparams(model_cfg: Mapping[str, Any]) -> str | None:
    for key in _ARCH_NAME_KEYS:
        value = model_cfg.get(key)
        if isinstance(value, str):
            name = value.lower().replace("-", "").replace("_", "")
            if "swin" in name:
                return "swinunetr"
            if "unet" in name:
                return "unet"
    sections = [a for a in backbones.ARCHITECTURES if isinstance(model_cfg.get(a), Mapping)]
    return sections[0] if len(sections) == 1 else None


def _lightning_spec(
    ckpt: Mapping[str, Any], path: Path, notes: list[str]
) -> tuple[FoundationSpec, dict[str, torch.Tensor]]:
    """The spec of a published checkpoint, and its student encoder state (prefix removed)."""
    state = ckpt["state_dict"]
    hparams = ckpt["hyper_parameters"]
    model_cfg = hparams.get("model") if isinstance(hparams, Mapping) else None
    arch_hp = _architecture_from_hparams(model_cfg) if isinstance(model_cfg, Mapping) else None
    if not isinstance(model_cfg, Mapping) or (arch_hp is None and "embed_dim" not in model_cfg):
        raise CheckpointError(
            f"{path}: hyper_parameters has no recognised 'model' section (expected the lsm_fm "
            "training config: model.embed_dim and model.swinunetr or model.unet); this is not a "
            "published lsm_fm pretraining checkpoint."
        )
    encoder = strip_prefix(state, ENCODER_PREFIX)
    if not encoder:
        hint = (
            " (its keys start with 'model.': a finetuned model?)"
            if any(k.startswith("model.") for k in state)
            else ""
        )
        raise CheckpointError(
            f"{path}: the state_dict has no {ENCODER_PREFIX}* weights{hint}; expected an lsm_fm "
            "pretraining checkpoint, whose student encoder is the foundation."
        )
    arch = backbones.infer_architecture(encoder)
    if arch is None:
        raise CheckpointError(
            f"{path}: the {ENCODER_PREFIX}* weights are neither a SwinUNETR (swinViT.*) nor a "
            f"UNet (model.*); {EXPECTED_FILES}."
        )
    if arch_hp is not None and arch_hp != arch:
        raise CheckpointError(
            f"{path}: hyper_parameters describe a {arch_hp} but the {ENCODER_PREFIX}* weights "
            f"are a {arch}; {_DISAGREE}."
        )
    if arch_hp is None:
        notes.append(f"architecture {arch} taken from the weights (not named in hyper_parameters)")

    embed_dim = backbones.infer_embed_dim(encoder, arch)
    embed_hp = model_cfg.get("embed_dim")
    if embed_dim is None:
        embed_dim = embed_hp
    elif embed_hp is not None and int(embed_hp) != embed_dim:
        notes.append(
            f"hyper_parameters say embed_dim {embed_hp} but the output layer has {embed_dim} "
            f"channels; using {embed_dim}"
        )
    if embed_dim is None:
        raise CheckpointError(
            f"{path}: neither hyper_parameters nor the weights give embed_dim; {EXPECTED_FILES}."
        )

    kwargs: dict[str, Any] = {"architecture": arch, "embed_dim": int(embed_dim)}
    if arch == "swinunetr":
        section = model_cfg.get("swinunetr") or {}
        fs = int(section.get("feature_size", backbones.PUBLISHED_SWIN_FEATURE_SIZE))
        fs_weights = backbones.infer_feature_size(encoder)
        if fs_weights is not None and fs_weights != fs:
            raise CheckpointError(
                f"{path}: hyper_parameters give SwinUNETR feature_size {fs} but the "
                f"{ENCODER_PREFIX}* weights have {fs_weights}; {_DISAGREE}."
            )
        kwargs["feature_size"] = fs
    else:
        section = model_cfg.get("unet") or {}
        for key, default in backbones.PUBLISHED_UNET.items():
            kwargs[key] = section.get(key, default)
        kwargs["channels"] = tuple(kwargs["channels"])
        kwargs["strides"] = tuple(kwargs["strides"])
        found = backbones.infer_unet_channels(encoder)
        if found is not None and tuple(int(c) for c in kwargs["channels"]) != found:
            raise CheckpointError(
                f"{path}: hyper_parameters give UNet channels {list(kwargs['channels'])} but the "
                f"{ENCODER_PREFIX}* weights have {list(found)}; {_DISAGREE}."
            )

    image_proj = strip_prefix(state, "image_proj.")
    use_text = bool(model_cfg.get("use_text", True))
    if image_proj:
        if "4.weight" not in image_proj:
            raise CheckpointError(
                f"{path}: image_proj.* has an unknown layout (expected image_proj.2/.4/.5: "
                "Linear, Linear, LayerNorm as in lsm_fm; found "
                f"{backbones.describe_keys(sorted(image_proj))})."
            )
        kwargs["variant"] = "image_text"
        kwargs["proj_dim"] = int(image_proj["4.weight"].shape[0])
    else:
        kwargs["variant"] = "image_only"
        if use_text:
            notes.append(
                "hyper_parameters say use_text but the file has no image_proj.*: loaded image-only"
            )
    try:
        spec = FoundationSpec(**kwargs)
    except ValueError as err:
        raise CheckpointError(
            f"{path}: hyper_parameters give an unusable architecture ({err}); {EXPECTED_FILES}."
        ) from None

    text_encoder = strip_prefix(state, "text_encoder.")
    text_proj = strip_prefix(state, "text_proj.")
    if spec.variant == "image_text" and text_encoder and text_proj:
        if "2.weight" not in text_proj or int(text_proj["2.weight"].shape[0]) != spec.proj_dim:
            raise CheckpointError(
                f"{path}: text_proj.* does not project to the image_proj dimension {spec.proj_dim} "
                "(expected text_proj.0/.2/.3: Linear, Linear, LayerNorm as in lsm_fm)."
            )
        try:
            spec.text = bert_config_from_state(
                text_encoder, proj_dim=spec.proj_dim, name=model_cfg.get("text_model_name")
            )
        except ValueError as err:
            raise CheckpointError(
                f"{path}: {err}; expected BERT weights as in lsm_fm image+text files."
            ) from None
    return spec, encoder


def read_lightning(ckpt: Any, path: Path) -> tuple[FoundationSpec, dict, LoadReport]:
    """The spec of a published checkpoint ``ckpt`` (what
    :func:`~napari_lsmfm.model.pickled.read_torch_checkpoint` returned for ``path``), its
    student encoder tensors (prefix removed) and a LoadReport with its notes; no network
    is built. Raises CheckpointError naming what is wrong."""
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        found = (
            ", ".join(sorted(map(str, ckpt))[:6])
            if isinstance(ckpt, Mapping)
            else type(ckpt).__name__
        )
        raise CheckpointError(
            f"{path}: not a Lightning checkpoint with 'state_dict' and 'hyper_parameters' "
            f"(found {found or 'nothing'}); {EXPECTED_FILES}."
        )
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(
            f"{path}: its state_dict is not a mapping of tensors; {EXPECTED_FILES}."
        )
    report = LoadReport(format="lsm_fm-lightning")
    spec, encoder = _lightning_spec(ckpt, path, report.notes)
    return spec, encoder, report


def lightning_text_tower(
    spec: FoundationSpec, state: Mapping[str, torch.Tensor], path: Path, *,
    vocab: str | Path | None, report: LoadReport, progress: Progress | None = None,
) -> tuple[TextTower | None, str | None]:
    """The published BERT text tower, built and filled from ``state`` (recorded in
    ``report``), and why there is none (None when there is one, or for image-only)."""
    if spec.text is None:
        if spec.variant != "image_text":
            return None, None
        reason = (
            "The checkpoint has an image projection but no text_encoder.* / text_proj.* weights, "
            "so prompts cannot be embedded; use the complete published image+text file."
        )
        report.notes.append(reason)
        return None, reason
    report_progress(progress, 0.75, "building the BERT text tower")
    try:
        tower = TextTower.from_config(spec.text, vocab=vocab)
    except TextTowerUnavailable as err:
        report.notes.append(str(err))
        return None, str(err)
    encoder_state = strip_prefix(state, "text_encoder.")
    tower_state = {"encoder." + k: v for k, v in encoder_state.items()}
    tower_state.update({"proj." + k: v for k, v in strip_prefix(state, "text_proj.").items()})
    # Older transformers saved these index buffers; they are constants.
    for buffer in ("encoder.embeddings.position_ids", "encoder.embeddings.token_type_ids"):
        if buffer in tower_state and buffer not in tower.state_dict():
            del tower_state[buffer]
            report.ignored.append("text_encoder." + buffer[len("encoder.") :])
    used, _ = fit_state(
        tower,
        tower_state,
        path=path,
        what="text_encoder.* / text_proj.*",
        expected=(
            f"a BERT of {spec.text['num_hidden_layers']} layers, "
            f"width {spec.text['hidden_size']}"
        ),
    )
    report.used += [
        ("text_encoder." + k[8:]) if k.startswith("encoder.") else "text_proj." + k[5:]
        for k in used
    ]
    return tower, None


def foundation_from_lightning(
    ckpt: Any, path: Path, *, vocab: str | Path | None, progress: Progress | None
) -> Foundation:
    """The Foundation (on the CPU) in a published checkpoint ``ckpt`` (what
    :func:`~napari_lsmfm.model.pickled.read_torch_checkpoint` returned for ``path``), with
    its ``load_report``. Raises CheckpointError naming what does not fit."""
    spec, encoder, report = read_lightning(ckpt, path)
    state = ckpt["state_dict"]

    report_progress(progress, 0.35, f"building {describe_spec(spec)}")
    foundation = Foundation(spec, source=str(path), build_text=False)
    report_progress(progress, 0.55, "loading the student encoder")
    used, dropped = fit_state(
        foundation.backbone,
        encoder,
        path=path,
        what=f"{ENCODER_PREFIX}*",
        expected=f"{describe_spec(spec)} (from the checkpoint's hyper_parameters)",
        head_prefixes=backbones.HEAD_PREFIXES[spec.architecture],
    )
    report.used += [ENCODER_PREFIX + k for k in used]
    report.dropped += [ENCODER_PREFIX + k for k in dropped]
    if dropped:
        report.notes.append(
            f"dropped the output layer ({len(dropped)} tensors): its shape did not fit"
        )
    if foundation.image_proj is not None:
        used, _ = fit_state(
            foundation.image_proj,
            strip_prefix(state, "image_proj."),
            path=path,
            what="image_proj.*",
            expected=f"the lsm_fm image projection ({spec.embed_dim} -> {spec.proj_dim})",
        )
        report.used += ["image_proj." + k for k in used]
    tower, reason = lightning_text_tower(spec, state, path, vocab=vocab, report=report,
                                         progress=progress)
    foundation.text_tower = tower
    if tower is not None or reason is not None:
        foundation.text_unavailable_reason = reason
    if "logit_scale" in state and state["logit_scale"].numel() == 1:
        foundation.logit_scale = float(state["logit_scale"])
    used_set = set(report.used)
    report.ignored += [k for k in state if k not in used_set and k not in report.ignored]
    foundation.load_report = report
    return foundation


def describe_lightning(ckpt: Any, path: Path, *, vocab: str | Path | None) -> dict:
    """What :meth:`Foundation.info` says of a published checkpoint, read from its
    hyper_parameters and tensor shapes without building the network (MONAI is not
    imported); the BERT tower is built (transformers imported) only with a vocabulary.
    Adds ``format`` and ``notes``."""
    spec, encoder, report = read_lightning(ckpt, path)
    state = ckpt["state_dict"]
    image = dict(encoder)
    if spec.variant == "image_text":
        image.update({"image_proj." + k: v for k, v in strip_prefix(state, "image_proj.").items()})
    tower, reason = lightning_text_tower(spec, state, path, vocab=vocab, report=report)
    return describe_weights(spec, image, tower, reason, source=str(path), report=report)
