"""Foundation weights in and out: published lsm_fm checkpoints, our own format, the default.

- Published lsm_fm Lightning checkpoints (`.ckpt`): read with `torch.load(weights_only=True)`
  (a file that needs more is refused unless trusted); the architecture comes from
  `hyper_parameters["model"]`, the backbone from `student_encoder.*` (every key must fit),
  the projections from `image_proj.*` / `text_proj.*`, the BERT text tower from
  `text_encoder.*` when `transformers` and a vocab.txt are at hand.
- Our format: a folder with `model.safetensors` (keys `backbone.*`, `image_proj.*`,
  `text_tower.*`) and `config.json` (`"format": "napari-lsmfm-foundation"`, the spec,
  the normalisation), plus `vocab.txt` when the text tower is BERT's. No pickle at all.
- The embedded default: the same format in `model/default/`, shipped by a later release.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_lsmfm.engine.device import resolve_device

from . import backbones
from .foundation import NORMALIZATION, Foundation, FoundationSpec
from .text import TextTower, TextTowerUnavailable, bert_config_from_state

FORMAT = "napari-lsmfm-foundation"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")
VOCAB_NAME = "vocab.txt"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
NO_DEFAULT_MESSAGE = (
    "No default foundation model is installed in this napari-lsmfm; name a weights file "
    "(a published lsm_fm .ckpt or a napari-lsmfm .safetensors)"
)
ENCODER_PREFIX = "student_encoder."
# Parts of a pretraining checkpoint that are not the foundation (used only for training).
TRAINING_ONLY = ("teacher_encoder.", "reconstruction_head.", "logit_scale", "ema_decay")
_ARCH_NAME_KEYS = ("name", "arch", "architecture", "backbone", "model_name", "network", "type")
_EXPECTED_CKPT = (
    "expected a published lsm_fm checkpoint ({swinunetr,unet}_{image_text,image_only}_best.ckpt) "
    "or a napari-lsmfm model folder (model.safetensors + config.json)"
)
_DISAGREE = (
    "expected the two to agree, as in an unmodified published checkpoint — the file was edited "
    "or assembled from different runs; use the original file"
)

Progress = Callable[[float, str], Any]


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message names the file, the problem, what
    was expected and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that needs more than tensors and plain values to load."""

    def __init__(self, path: str | Path, refused: list[str]):
        self.path = Path(path)
        self.refused = list(refused)
        names = ", ".join(self.refused) or "objects outside the weights-only allow-list"
        super().__init__(
            f"{self.path}: refused to load — unpickling it would call {names}, which a "
            "weights-only load does not allow because a pickle can run code. If the file comes "
            "from a source you trust, load it with trusted=True (CLI --trust, widget "
            "'Trust this file'); otherwise do not use it."
        )


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


def _report(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(float(fraction), message)


# --- reading pickled checkpoints safely ---------------------------------------------------------


def _safe_globals() -> list:
    """Harmless types allowed on top of torch's weights-only defaults."""
    allowed = []
    with contextlib.suppress(ImportError):
        from monai.data import MetaTensor

        allowed.append(MetaTensor)
    return allowed


def _sniff(path: Path) -> str:
    """The kind of file from its first bytes: zip (torch >= 1.6), pickle (older torch),
    safetensors, text or unknown."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 28):
        return "safetensors"
    if head.isascii():
        return "text"
    return "unknown"


def _refused_globals(path: Path, err: Exception) -> list[str]:
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()}
    names: list[str] = []
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is not None:
        with contextlib.suppress(Exception):
            names = [n for n in getter(str(path)) if n not in allowed]
    if not names:
        names = re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))
    return sorted(dict.fromkeys(names))


def _weights_only_detail(err: Exception) -> str:
    text = str(err)
    match = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return (
        match.group(1) if match else text.splitlines()[0] if text else type(err).__name__
    ).strip()


def read_torch_checkpoint(path: str | Path, *, trusted: bool = False) -> Any:
    """`torch.load` a pickled checkpoint on the CPU, weights only unless `trusted`.

    Raises UnsafeCheckpointError (naming the refused globals) for a file that needs more
    than tensors and plain values, and CheckpointError for a missing, truncated or
    unrelated file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {_EXPECTED_CKPT}.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; {_EXPECTED_CKPT}. Download it again.")
    kind = _sniff(path)
    if kind not in ("zip", "pickle"):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (it looks like {_describe_kind(kind)}); "
            f"{_EXPECTED_CKPT}."
        )
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow(_safe_globals()) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        detail = _weights_only_detail(err)
        if "truncated" in detail or "EOF" in detail:
            raise _truncated(path) from None
        refused = _refused_globals(path, err)
        if not trusted:
            if refused:
                raise UnsafeCheckpointError(path, refused) from None
            raise CheckpointError(
                f"{path}: could not be read as weights only ({detail}); {_EXPECTED_CKPT}. If the "
                "file comes from a source you trust, load it with trusted=True (CLI --trust)."
            ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise _read_error(path, err) from None
    # Explicitly trusted: a full unpickle, which may run code from the file.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure of a trusted unpickle is reported
        raise CheckpointError(
            f"{path}: loading the trusted file failed ({type(err).__name__}: {err}); "
            f"{_EXPECTED_CKPT}."
        ) from None


def _describe_kind(kind: str) -> str:
    return {
        "safetensors": "a safetensors file, which needs its config.json beside it",
        "text": "a text file",
        "unknown": "some other binary file",
    }.get(kind, kind)


def _truncated(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: the file is truncated or corrupted (its data ends early); {_EXPECTED_CKPT}. "
        "Download or copy it again."
    )


def _read_error(path: Path, err: Exception) -> CheckpointError:
    text = str(err)
    if isinstance(err, EOFError) or any(
        s in text for s in ("central directory", "zip archive", "truncated", "unexpected EOF")
    ):
        return _truncated(path)
    return CheckpointError(
        f"{path}: could not be read as a PyTorch checkpoint ({type(err).__name__}: "
        f"{text.splitlines()[0] if text else 'no detail'}); {_EXPECTED_CKPT}."
    )


# --- fitting weights into modules ----------------------------------------------------------------


def _fit(
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
    used, dropped = _fit(
        network,
        state,
        path="backbone",
        what="encoder",
        expected=f"{architecture} network",
        head_prefixes=backbones.HEAD_PREFIXES[architecture],
    )
    notes = [f"kept the network's own final layer ({len(dropped)} tensors)"] if dropped else []
    return LoadReport(format="state_dict", used=used, dropped=dropped, notes=notes)


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _describe_spec(spec: FoundationSpec) -> str:
    if spec.architecture == "swinunetr":
        return f"SwinUNETR(feature_size={spec.feature_size}, embed_dim={spec.embed_dim})"
    return (
        f"UNet(channels={list(spec.channels)}, strides={list(spec.strides)}, "
        f"num_res_units={spec.num_res_units}, norm={spec.norm}, embed_dim={spec.embed_dim})"
    )


# --- published lsm_fm checkpoints -----------------------------------------------------------------


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
    encoder = _strip(state, ENCODER_PREFIX)
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
            f"UNet (model.*); {_EXPECTED_CKPT}."
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
            f"{path}: neither hyper_parameters nor the weights give embed_dim; {_EXPECTED_CKPT}."
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

    image_proj = _strip(state, "image_proj.")
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
            f"{path}: hyper_parameters give an unusable architecture ({err}); {_EXPECTED_CKPT}."
        ) from None

    text_encoder = _strip(state, "text_encoder.")
    text_proj = _strip(state, "text_proj.")
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


def _foundation_from_lightning(
    ckpt: Any, path: Path, *, vocab: str | Path | None, progress: Progress | None
) -> Foundation:
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        found = (
            ", ".join(sorted(map(str, ckpt))[:6])
            if isinstance(ckpt, Mapping)
            else type(ckpt).__name__
        )
        raise CheckpointError(
            f"{path}: not a Lightning checkpoint with 'state_dict' and 'hyper_parameters' "
            f"(found {found or 'nothing'}); {_EXPECTED_CKPT}."
        )
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(
            f"{path}: its state_dict is not a mapping of tensors; {_EXPECTED_CKPT}."
        )
    report = LoadReport(format="lsm_fm-lightning")
    spec, encoder = _lightning_spec(ckpt, path, report.notes)

    _report(progress, 0.35, f"building {_describe_spec(spec)}")
    foundation = Foundation(spec, source=str(path), build_text=False)
    _report(progress, 0.55, "loading the student encoder")
    used, dropped = _fit(
        foundation.backbone,
        encoder,
        path=path,
        what=f"{ENCODER_PREFIX}*",
        expected=f"{_describe_spec(spec)} (from the checkpoint's hyper_parameters)",
        head_prefixes=backbones.HEAD_PREFIXES[spec.architecture],
    )
    report.used += [ENCODER_PREFIX + k for k in used]
    report.dropped += [ENCODER_PREFIX + k for k in dropped]
    if dropped:
        report.notes.append(
            f"dropped the output layer ({len(dropped)} tensors): its shape did not fit"
        )
    if foundation.image_proj is not None:
        used, _ = _fit(
            foundation.image_proj,
            _strip(state, "image_proj."),
            path=path,
            what="image_proj.*",
            expected=f"the lsm_fm image projection ({spec.embed_dim} -> {spec.proj_dim})",
        )
        report.used += ["image_proj." + k for k in used]

    if spec.text is not None:
        _report(progress, 0.75, "building the BERT text tower")
        try:
            tower = TextTower.from_config(spec.text, vocab=vocab)
        except TextTowerUnavailable as err:
            foundation.text_unavailable_reason = str(err)
            report.notes.append(str(err))
        else:
            tower_state = {"encoder." + k: v for k, v in _strip(state, "text_encoder.").items()}
            tower_state.update({"proj." + k: v for k, v in _strip(state, "text_proj.").items()})
            # Older transformers saved these index buffers; they are constants.
            for buffer in ("encoder.embeddings.position_ids", "encoder.embeddings.token_type_ids"):
                if buffer in tower_state and buffer not in tower.state_dict():
                    del tower_state[buffer]
                    report.ignored.append("text_encoder." + buffer[len("encoder.") :])
            used, _ = _fit(
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
            foundation.text_tower = tower
            foundation.text_unavailable_reason = None
    elif spec.variant == "image_text":
        foundation.text_unavailable_reason = (
            "The checkpoint has an image projection but no text_encoder.* / text_proj.* weights, "
            "so prompts cannot be embedded; use the complete published image+text file."
        )
        report.notes.append(foundation.text_unavailable_reason)

    if "logit_scale" in state and state["logit_scale"].numel() == 1:
        foundation.logit_scale = float(state["logit_scale"])
    used_set = set(report.used)
    report.ignored += [k for k in state if k not in used_set and k not in report.ignored]
    foundation.load_report = report
    return foundation


# --- our own format ----------------------------------------------------------------------------


def _our_paths(path: Path) -> tuple[Path, Path]:
    """(config, weights) of our format from a folder, a .safetensors file or a config file."""
    if path.is_dir():
        folder, weights = path, path / WEIGHTS_NAME
        configs = [folder / n for n in CONFIG_NAMES if (folder / n).is_file()]
    elif path.suffix.lower() in (".json", ".yaml", ".yml"):
        folder, weights = path.parent, path.parent / WEIGHTS_NAME
        configs = [path]
    else:
        folder, weights = path.parent, path
        configs = [
            folder / n for n in CONFIG_NAMES + (path.stem + ".json",) if (folder / n).is_file()
        ]
    if not weights.is_file() or not configs:
        lacking = " and ".join(
            n
            for n, ok in (
                (WEIGHTS_NAME if path.is_dir() else weights.name, weights.is_file()),
                ("config.json", bool(configs)),
            )
            if not ok
        )
        raise CheckpointError(
            f"{path}: no {lacking} found in {folder}; expected a napari-lsmfm model folder holding "
            f"{WEIGHTS_NAME} and config.json (what save_foundation writes)."
        )
    return configs[0], weights


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad config
        raise CheckpointError(
            f"{path}: the config could not be read ({type(err).__name__}: {err}); expected the "
            f"config.json that save_foundation writes."
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise CheckpointError(
            f"{path}: not a napari-lsmfm foundation config (format {found!r}, expected "
            f"'{FORMAT}'); name a foundation model folder, not another file."
        )
    version = config.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r} is not supported (this napari-lsmfm reads up to "
            f"{FORMAT_VERSION}); update napari-lsmfm."
        )
    return config


def _foundation_from_ours(
    path: Path, *, vocab: str | Path | None, progress: Progress | None, source: str
) -> Foundation:
    config_path, weights_path = _our_paths(path)
    config = _read_config(config_path)
    try:
        spec = FoundationSpec.from_dict(config.get("spec"))
    except (ValueError, TypeError) as err:
        raise CheckpointError(
            f"{config_path}: its spec is not usable ({err}); expected the config.json that "
            "save_foundation writes."
        ) from None
    _report(progress, 0.2, f"reading {weights_path.name}")
    try:
        from safetensors.torch import load_file

        state = load_file(str(weights_path), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"{weights_path}: not a complete safetensors file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); expected the "
            f"{WEIGHTS_NAME} that save_foundation writes — copy it again."
        ) from None
    parts = ("backbone.", "image_proj.", "text_tower.")
    stray = [k for k in state if not k.startswith(parts)]
    if stray:
        raise CheckpointError(
            f"{weights_path}: unexpected tensors {backbones.describe_keys(stray)}; expected only "
            "backbone.*, image_proj.* and text_tower.* keys."
        )
    report = LoadReport(format="napari-lsmfm")
    _report(progress, 0.4, f"building {_describe_spec(spec)}")
    foundation = Foundation(spec, source=source, build_text=False)
    what = f"{_describe_spec(spec)} from {config_path.name}"
    used, _ = _fit(
        foundation.backbone,
        _strip(state, "backbone."),
        path=weights_path,
        what="backbone.*",
        expected=what,
    )
    report.used += ["backbone." + k for k in used]
    if foundation.image_proj is not None or _strip(state, "image_proj."):
        if foundation.image_proj is None:
            raise CheckpointError(
                f"{weights_path}: has image_proj.* tensors but {config_path.name} describes an "
                "image-only model; the two files do not belong together."
            )
        used, _ = _fit(
            foundation.image_proj,
            _strip(state, "image_proj."),
            path=weights_path,
            what="image_proj.*",
            expected=f"the image projection of {what}",
        )
        report.used += ["image_proj." + k for k in used]

    tower_state = _strip(state, "text_tower.")
    if spec.text is not None:
        if not tower_state:
            raise CheckpointError(
                f"{weights_path}: {config_path.name} describes a text tower but there are no "
                "text_tower.* tensors; the two files do not belong together."
            )
        local_vocab = config_path.parent / VOCAB_NAME
        if vocab is None and local_vocab.is_file():
            vocab = local_vocab
        _report(progress, 0.7, f"building the {spec.text['kind']} text tower")
        try:
            tower = TextTower.from_config(spec.text, vocab=vocab)
        except TextTowerUnavailable as err:
            foundation.text_unavailable_reason = str(err)
            report.notes.append(str(err))
            report.ignored += ["text_tower." + k for k in tower_state]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{config_path}: the text tower config is not usable ({err}); expected the "
                "config.json that save_foundation writes."
            ) from None
        else:
            used, _ = _fit(
                tower,
                tower_state,
                path=weights_path,
                what="text_tower.*",
                expected=f"the {spec.text['kind']} text tower of {config_path.name}",
            )
            report.used += ["text_tower." + k for k in used]
            foundation.text_tower = tower
            foundation.text_unavailable_reason = None
    elif tower_state:
        raise CheckpointError(
            f"{weights_path}: has text_tower.* tensors but {config_path.name} describes no text "
            "tower; the two files do not belong together."
        )
    elif spec.variant == "image_text":
        foundation.text_unavailable_reason = (
            config.get("text_tower_unavailable")
            or "This foundation was saved without its text tower."
        )
    if config.get("logit_scale") is not None:
        foundation.logit_scale = float(config["logit_scale"])
    foundation.load_report = report
    return foundation


# --- the public API ------------------------------------------------------------------------------


def load_foundation(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    trusted: bool = False,
    vocab: str | Path | None = None,
    progress: Progress | None = None,
) -> Foundation:
    """Load foundation weights from a local file and move them to `device` once.

    path: a published lsm_fm Lightning checkpoint (.ckpt/.pt/.pth); a napari-lsmfm model
    folder, its model.safetensors or its config.json; or None for the embedded default.
    device: auto / cpu / cuda[:N] / mps. trusted: allow a full unpickle of a file that
    a weights-only load refuses (only for files from a trusted source). vocab: BERT's
    vocab.txt for the published text tower. progress: optional callable(fraction, message).
    Returns a Foundation in eval mode. Raises CheckpointError (UnsafeCheckpointError for
    refused pickles) with a one-line message, ValueError for an unknown device.
    """
    target = resolve_device(device)  # a wrong device fails before any slow work
    if path is None:
        if not (DEFAULT_MODEL_DIR / WEIGHTS_NAME).is_file():
            raise CheckpointError(NO_DEFAULT_MESSAGE)
        _report(progress, 0.0, "reading the default foundation model")
        foundation = _foundation_from_ours(
            DEFAULT_MODEL_DIR, vocab=vocab, progress=progress, source="default"
        )
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder; {_EXPECTED_CKPT}.")
        _report(progress, 0.0, f"reading {path.name}")
        if path.is_dir() or path.suffix.lower() in (".safetensors", ".json", ".yaml", ".yml"):
            foundation = _foundation_from_ours(
                path, vocab=vocab, progress=progress, source=str(path)
            )
        elif _sniff(path) == "safetensors":
            foundation = _foundation_from_ours(
                path, vocab=vocab, progress=progress, source=str(path)
            )
        else:
            ckpt = read_torch_checkpoint(path, trusted=trusted)
            _report(progress, 0.25, "reading hyper_parameters")
            foundation = _foundation_from_lightning(ckpt, path, vocab=vocab, progress=progress)
            del ckpt
    _report(progress, 0.9, f"moving to {target}")
    foundation.eval()  # modules attached after construction (the text tower) too
    foundation.to_device(target)
    _report(progress, 1.0, "loaded")
    return foundation


def save_foundation(
    foundation: Foundation, folder: str | Path, extra_config: dict | None = None
) -> Path:
    """Write `foundation` in our format: folder/model.safetensors (backbone.*, image_proj.*,
    text_tower.*), folder/config.json (format, version, spec, normalization, extra_config
    merged in), and folder/vocab.txt for a BERT text tower. Returns the folder."""
    folder = Path(folder).expanduser()
    extra = dict(extra_config or {})
    reserved = {"format", "version", "spec"} & set(extra)
    if reserved:
        raise ValueError(f"extra_config may not set {sorted(reserved)}")
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    modules = {
        "backbone": foundation.backbone,
        "image_proj": foundation.image_proj,
        "text_tower": foundation.text_tower,
    }
    for prefix, module in modules.items():
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.data_ptr() in seen and tensor.numel():  # safetensors refuses shared memory
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            state[f"{prefix}.{key}"] = tensor
    spec = foundation.spec.to_dict()
    config: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
    if foundation.text_tower is None and spec["text"] is not None:
        spec["text"] = None  # its weights were not loaded, so they cannot be saved
        config["text_tower_unavailable"] = foundation.text_unavailable_reason
    config["spec"] = spec
    config["normalization"] = {"low": NORMALIZATION["low"], "high": NORMALIZATION["high"]}
    if foundation.logit_scale is not None:
        config["logit_scale"] = foundation.logit_scale
    config.update(extra)

    from safetensors.torch import save_file

    _atomic_write(
        folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT})
    )
    if foundation.text_tower is not None and foundation.text_tower.kind == "bert":
        text = "\n".join(foundation.text_tower.vocabulary) + "\n"
        _atomic_write(folder / VOCAB_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    body = json.dumps(config, indent=2)
    _atomic_write(folder / "config.json", lambda tmp: tmp.write_text(body, encoding="utf-8"))
    return folder


def _atomic_write(target: Path, write: Callable[[Path], Any]) -> None:
    """Write next to `target`, then rename, so a crash never leaves half a file."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # some writers create private temp files; weights are shared
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def inspect_checkpoint(
    path: str | Path | None, *, trusted: bool = False, vocab: str | Path | None = None
) -> dict:
    """What `lsmfm info` prints, loading on the CPU: architecture, feature_size or channels,
    parameters, variant, text_tower, source (and embed_dim, proj_dim, format, notes)."""
    foundation = load_foundation(path, device="cpu", trusted=trusted, vocab=vocab)
    info = foundation.info()
    report = foundation.load_report
    info["format"] = report.format if report is not None else None
    info["notes"] = list(report.notes) if report is not None else []
    return info
