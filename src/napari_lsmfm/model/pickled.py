"""Reading pickled PyTorch checkpoints safely, and the errors every weights loader raises.

A ``.ckpt`` / ``.pt`` file is read with ``torch.load(weights_only=True)``: tensors and
plain containers only, since a pickle can run code. A file that needs more is refused
(:class:`UnsafeCheckpointError`, naming what it would call) unless the caller trusts it.
Missing, empty, truncated or unrelated files raise :class:`CheckpointError` with what
was expected and what to do.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

EXPECTED_FILES = (
    "expected a published lsm_fm checkpoint ({swinunetr,unet}_{image_text,image_only}_best.ckpt) "
    "or a napari-lsmfm model folder (model.safetensors + config.json)"
)


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


def _safe_globals() -> list:
    """Harmless types allowed on top of torch's weights-only defaults."""
    allowed = []
    with contextlib.suppress(ImportError):
        from monai.data import MetaTensor

        allowed.append(MetaTensor)
    return allowed


def file_kind(path: str | Path) -> str:
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
        raise CheckpointError(f"{path}: no such file; {EXPECTED_FILES}.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; {EXPECTED_FILES}. Download it again.")
    kind = file_kind(path)
    if kind not in ("zip", "pickle"):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (it looks like {_describe_kind(kind)}); "
            f"{EXPECTED_FILES}."
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
                f"{path}: could not be read as weights only ({detail}); {EXPECTED_FILES}. If the "
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
            f"{EXPECTED_FILES}."
        ) from None


def _describe_kind(kind: str) -> str:
    return {
        "safetensors": "a safetensors file, which needs its config.json beside it",
        "text": "a text file",
        "unknown": "some other binary file",
    }.get(kind, kind)


def _truncated(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: the file is truncated or corrupted (its data ends early); {EXPECTED_FILES}. "
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
        f"{text.splitlines()[0] if text else 'no detail'}); {EXPECTED_FILES}."
    )
