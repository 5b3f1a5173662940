"""Foundation weights in and out: the one entry point for every kind of weights file.

- Published lsm_fm Lightning checkpoints (``.ckpt``): read weights-only
  (:mod:`.pickled`), laid out as lsm_fm trains them (:mod:`.published`);
- our format: a folder with ``model.safetensors`` and ``config.json``, no pickle at all
  (:mod:`.saved`, which also writes it: :func:`save_foundation`);
- the embedded default: our format in ``model/default/``, shipped by a later release.

Every loader fits tensors strictly (:mod:`.weights`): a file that does not match raises
:class:`CheckpointError` saying which file, what was expected and what to do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from napari_lsmfm.engine.device import resolve_device

from .foundation import Foundation
from .pickled import (
    EXPECTED_FILES,
    CheckpointError,
    UnsafeCheckpointError,
    file_kind,
    read_torch_checkpoint,
)
from .published import (
    ENCODER_PREFIX,
    TRAINING_ONLY,
    describe_lightning,
    foundation_from_lightning,
)
from .saved import (
    CONFIG_NAMES,
    FORMAT,
    FORMAT_VERSION,
    VOCAB_NAME,
    WEIGHTS_NAME,
    describe_folder,
    foundation_from_folder,
    save_foundation,
)
from .weights import LoadReport, Progress, load_encoder_weights, report_progress

__all__ = [
    "CONFIG_NAMES",
    "DEFAULT_MODEL_DIR",
    "ENCODER_PREFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "NO_DEFAULT_MESSAGE",
    "TRAINING_ONLY",
    "VOCAB_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "LoadReport",
    "UnsafeCheckpointError",
    "inspect_checkpoint",
    "load_encoder_weights",
    "load_foundation",
    "locate_weights",
    "read_torch_checkpoint",
    "save_foundation",
]

# Read at each call (not bound at import), so tests and packagers can point it elsewhere.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
NO_DEFAULT_MESSAGE = (
    "No default foundation model is installed in this napari-lsmfm; name a weights file "
    "(a published lsm_fm .ckpt or a napari-lsmfm .safetensors)"
)


def locate_weights(path: str | Path | None) -> tuple[str, Path, str]:
    """(kind, path, source) of a weights argument: kind "folder" (our format) or
    "lightning" (a pickled checkpoint); None is the embedded default. Raises
    CheckpointError for a missing file or no default."""
    if path is None:
        if not (DEFAULT_MODEL_DIR / WEIGHTS_NAME).is_file():
            raise CheckpointError(NO_DEFAULT_MESSAGE)
        return "folder", DEFAULT_MODEL_DIR, "default"
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; {EXPECTED_FILES}.")
    if path.is_dir() or path.suffix.lower() in (".safetensors", ".json", ".yaml", ".yml"):
        return "folder", path, str(path)
    if file_kind(path) == "safetensors":
        return "folder", path, str(path)
    return "lightning", path, str(path)


def _check_vocab(vocab: str | Path | None) -> None:
    if vocab is not None and not Path(vocab).expanduser().is_file():
        raise CheckpointError(
            f"{vocab}: no such vocabulary file; give BERT's vocab.txt (--vocab, Python: "
            "vocab=...) or leave it out"
        )


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
    _check_vocab(vocab)
    kind, path, source = locate_weights(path)
    report_progress(progress, 0.0, "reading the default foundation model" if source == "default"
                    else f"reading {path.name}")
    if kind == "folder":
        foundation = foundation_from_folder(path, vocab=vocab, progress=progress, source=source)
    else:
        ckpt = read_torch_checkpoint(path, trusted=trusted)
        report_progress(progress, 0.25, "reading hyper_parameters")
        foundation = foundation_from_lightning(ckpt, path, vocab=vocab, progress=progress)
        del ckpt
    report_progress(progress, 0.9, f"moving to {target}")
    foundation.eval()  # modules attached after construction (the text tower) too
    foundation.to_device(target)
    report_progress(progress, 1.0, "loaded")
    return foundation


def inspect_checkpoint(
    path: str | Path | None, *, trusted: bool = False, vocab: str | Path | None = None,
    check: bool = False,
) -> dict:
    """What `lsmfm info` prints: architecture, feature_size or channels, parameters,
    variant, text_tower, source (and embed_dim, proj_dim, format, notes), device "cpu".

    Read from the file's config and tensor shapes without building the network, so
    without importing MONAI (a text tower is built, to check it). ``check=True`` loads
    the weights into the network as :func:`load_foundation` does, which also proves that
    every tensor fits (slower: it imports MONAI).
    """
    if check:
        foundation = load_foundation(path, device="cpu", trusted=trusted, vocab=vocab)
        info = foundation.info()
        report = foundation.load_report
        info["format"] = report.format if report is not None else None
        info["notes"] = list(report.notes) if report is not None else []
        return info
    _check_vocab(vocab)
    kind, path, source = locate_weights(path)
    if kind == "folder":
        return describe_folder(path, vocab=vocab, source=source)
    return describe_lightning(read_torch_checkpoint(path, trusted=trusted), path, vocab=vocab)
