"""Our own foundation format: a folder the package writes and reads, with no pickle at all.

``model.safetensors`` holds the tensors (keys ``backbone.*``, ``image_proj.*``,
``text_tower.*``); ``config.json`` says ``"format": "napari-lsmfm-foundation"``, the
version, the spec (architecture, sizes, text tower), the normalisation and anything the
writer adds (e.g. the pretraining record); ``vocab.txt`` sits beside them when the text
tower is BERT's. The embedded default model (``model/default/``) is such a folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from napari_lsmfm.engine.store import atomic_write

from . import backbones
from .describe import describe_weights
from .foundation import NORMALIZATION, Foundation, FoundationSpec
from .pickled import CheckpointError
from .text import TextTower, TextTowerUnavailable
from .weights import (
    LoadReport,
    Progress,
    describe_spec,
    fit_state,
    report_progress,
    strip_prefix,
)

FORMAT = "napari-lsmfm-foundation"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")
VOCAB_NAME = "vocab.txt"
WEIGHTS_MODE = 0o644  # some writers create private temporary files; weights are shared


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


def read_folder(path: Path) -> tuple[Path, Path, dict, FoundationSpec, dict[str, torch.Tensor]]:
    """(config path, weights path, config, spec, tensors) of our format at ``path``: the
    folder, its model.safetensors or its config.json; no network is built. Raises
    CheckpointError naming the file and what is wrong."""
    config_path, weights_path = _our_paths(path)
    config = _read_config(config_path)
    try:
        spec = FoundationSpec.from_dict(config.get("spec"))
    except (ValueError, TypeError) as err:
        raise CheckpointError(
            f"{config_path}: its spec is not usable ({err}); expected the config.json that "
            "save_foundation writes."
        ) from None
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
    if strip_prefix(state, "image_proj.") and spec.variant != "image_text":
        raise CheckpointError(
            f"{weights_path}: has image_proj.* tensors but {config_path.name} describes an "
            "image-only model; the two files do not belong together."
        )
    return config_path, weights_path, config, spec, state


def folder_text_tower(
    spec: FoundationSpec, config: dict, state: dict[str, torch.Tensor], *,
    config_path: Path, weights_path: Path, vocab: str | Path | None, report: LoadReport,
    progress: Progress | None = None,
) -> tuple[TextTower | None, str | None]:
    """The text tower our format describes, built and filled from ``state`` (its tensors
    recorded in ``report``), and why there is none (None when there is one). Raises
    CheckpointError when the config and the tensors do not belong together."""
    tower_state = strip_prefix(state, "text_tower.")
    if spec.text is None:
        if tower_state:
            raise CheckpointError(
                f"{weights_path}: has text_tower.* tensors but {config_path.name} describes no "
                "text tower; the two files do not belong together."
            )
        if spec.variant == "image_text":
            return None, (config.get("text_tower_unavailable")
                          or "This foundation was saved without its text tower.")
        return None, None
    if not tower_state:
        raise CheckpointError(
            f"{weights_path}: {config_path.name} describes a text tower but there are no "
            "text_tower.* tensors; the two files do not belong together."
        )
    local_vocab = config_path.parent / VOCAB_NAME
    if vocab is None and local_vocab.is_file():
        vocab = local_vocab
    report_progress(progress, 0.7, f"building the {spec.text['kind']} text tower")
    try:
        tower = TextTower.from_config(spec.text, vocab=vocab)
    except TextTowerUnavailable as err:
        report.notes.append(str(err))
        report.ignored += ["text_tower." + k for k in tower_state]
        return None, str(err)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{config_path}: the text tower config is not usable ({err}); expected the "
            "config.json that save_foundation writes."
        ) from None
    used, _ = fit_state(
        tower,
        tower_state,
        path=weights_path,
        what="text_tower.*",
        expected=f"the {spec.text['kind']} text tower of {config_path.name}",
    )
    report.used += ["text_tower." + k for k in used]
    return tower, None


def foundation_from_folder(
    path: Path, *, vocab: str | Path | None, progress: Progress | None, source: str
) -> Foundation:
    """The Foundation (on the CPU) saved in our format at ``path``: the folder, its
    model.safetensors or its config.json. ``source`` is recorded on it; the text tower is
    built when its weights are there (else ``text_unavailable_reason`` says why).
    Raises CheckpointError naming the file and what does not fit."""
    report_progress(progress, 0.2, f"reading {Path(path).name}")
    config_path, weights_path, config, spec, state = read_folder(path)
    report = LoadReport(format="napari-lsmfm")
    report_progress(progress, 0.4, f"building {describe_spec(spec)}")
    foundation = Foundation(spec, source=source, build_text=False)
    what = f"{describe_spec(spec)} from {config_path.name}"
    used, _ = fit_state(
        foundation.backbone,
        strip_prefix(state, "backbone."),
        path=weights_path,
        what="backbone.*",
        expected=what,
    )
    report.used += ["backbone." + k for k in used]
    if foundation.image_proj is not None:
        used, _ = fit_state(
            foundation.image_proj,
            strip_prefix(state, "image_proj."),
            path=weights_path,
            what="image_proj.*",
            expected=f"the image projection of {what}",
        )
        report.used += ["image_proj." + k for k in used]
    tower, reason = folder_text_tower(
        spec, config, state, config_path=config_path, weights_path=weights_path, vocab=vocab,
        report=report, progress=progress)
    foundation.text_tower = tower
    if tower is not None or reason is not None:
        foundation.text_unavailable_reason = reason
    if config.get("logit_scale") is not None:
        foundation.logit_scale = float(config["logit_scale"])
    foundation.load_report = report
    return foundation


def describe_folder(path: Path, *, vocab: str | Path | None, source: str) -> dict:
    """What :meth:`Foundation.info` says of the model saved at ``path`` (our format), read
    from its config and tensor shapes without building the network (MONAI is not
    imported); the text tower is built to be checked. Adds ``format`` and ``notes``."""
    config_path, weights_path, config, spec, state = read_folder(path)
    report = LoadReport(format="napari-lsmfm")
    image = {k: v for k, v in state.items() if k.startswith(("backbone.", "image_proj."))}
    if not strip_prefix(state, "backbone."):
        raise CheckpointError(
            f"{weights_path}: has no backbone.* tensors; expected the {WEIGHTS_NAME} that "
            "save_foundation writes."
        )
    if spec.variant == "image_text" and not strip_prefix(state, "image_proj."):
        raise CheckpointError(
            f"{weights_path}: {config_path.name} describes an image projection but there are "
            "no image_proj.* tensors; the two files do not belong together."
        )
    tower, reason = folder_text_tower(
        spec, config, state, config_path=config_path, weights_path=weights_path, vocab=vocab,
        report=report)
    return describe_weights(spec, image, tower, reason, source=source, report=report)


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

    atomic_write(
        folder / WEIGHTS_NAME,
        lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}),
        mode=WEIGHTS_MODE,
    )
    if foundation.text_tower is not None and foundation.text_tower.kind == "bert":
        text = "\n".join(foundation.text_tower.vocabulary) + "\n"
        atomic_write(folder / VOCAB_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                     mode=WEIGHTS_MODE)
    body = json.dumps(config, indent=2)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(body, encoding="utf-8"),
                 mode=WEIGHTS_MODE)
    return folder
