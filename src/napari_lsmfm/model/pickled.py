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
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .monai_import import import_monai as _import_monai

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
            "weights-only load does not allow because a pickle can run code. Only if the file "
            "comes from a source you trust, load it with trusted=True (CLI --trust, widget "
            "'Trust this file'), which runs that code; otherwise do not use it."
        )


METATENSOR = "monai.data.meta_tensor.MetaTensor"


def _safe_globals(import_monai: bool = True) -> list:
    """Harmless types allowed on top of torch's weights-only defaults: MONAI's MetaTensor
    (imported only when ``import_monai`` or MONAI is loaded already: importing MONAI
    takes seconds, and most checkpoints hold plain tensors)."""
    allowed = []
    if import_monai or "monai" in sys.modules:
        with contextlib.suppress(ImportError):
            _import_monai()  # without transformers (.monai_import)
            from monai.data import MetaTensor

            allowed.append(MetaTensor)
    return allowed


def _weights_only_load(path: Path, kind: str) -> Any:
    """torch.load weights only; MONAI is imported (for its MetaTensor) only when the
    first try names a MONAI class."""
    allow = getattr(torch.serialization, "safe_globals", None)
    for import_monai in (False, True):
        try:
            with allow(_safe_globals(import_monai)) if allow else contextlib.nullcontext():
                with warnings.catch_warnings():  # torch's own advice would contradict ours
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.load(path, map_location="cpu", weights_only=True,
                                      mmap=kind == "zip")
        except pickle.UnpicklingError as err:
            if import_monai or "monai" not in str(err) or "monai" in sys.modules:
                raise
    raise AssertionError("unreachable")


# First bytes of files people mistake for weights (images above all).
_MAGIC = (
    ((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), "tiff"),
    ((b"\x89HDF\r\n\x1a\n",), "hdf5"),
    ((b"\x93NUMPY",), "npy"),
    ((b"\x89PNG", b"\xff\xd8\xff"), "picture"),
)


def file_kind(path: str | Path) -> str:
    """The kind of file from its first bytes: zip (torch >= 1.6), pickle (older torch),
    safetensors, tiff, hdf5, npy, picture (PNG / JPEG), text or unknown."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    for magics, kind in _MAGIC:
        if head.startswith(magics):
            return kind
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 28):
        return "safetensors"
    if head.isascii():
        return "text"
    return "unknown"


# Globals a weights-only load allows anyway: they are not what a refusal is about.
_HARMLESS_GLOBALS = ("collections.OrderedDict", "builtins.set", "builtins.frozenset",
                     "builtins.bytearray", "builtins.complex", "builtins.slice")


def pickle_globals(path: str | Path, max_bytes: int = 1 << 26) -> list[str]:
    """The ``module.name`` globals a plain (non-zip) pickle file would import, read from
    its opcodes without unpickling anything (a legacy torch file holds several pickles in
    a row; the scan stops at the first thing that is not one). Torch's own rebuild
    functions and plain containers are left out."""
    import io
    import pickletools

    with open(path, "rb") as handle:
        data = handle.read(max_bytes)
    stream = io.BytesIO(data)
    found: list[str] = []
    while stream.tell() < len(data):
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in op.name
                                               or op.name.endswith("STRING")):
                    strings.append(str(arg))
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                    strings.append(memo[int(arg)])
        except Exception:  # noqa: BLE001 - the end of the pickles (tensor bytes follow)
            break
    return [n for n in dict.fromkeys(found)
            if not n.startswith("torch.") and n not in _HARMLESS_GLOBALS]


def _refused_globals(path: Path, err: Exception) -> list[str]:
    allowed = {METATENSOR}
    names: list[str] = []
    getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if getter is not None:
        with contextlib.suppress(Exception):
            names = [n for n in getter(str(path)) if n not in allowed]
    if not names:
        names = re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))
    if not names and file_kind(path) == "pickle":
        with contextlib.suppress(Exception):
            names = [n for n in pickle_globals(path) if n not in allowed]
    return sorted(dict.fromkeys(names))


def _weights_only_detail(err: Exception) -> str:
    """What the weights-only unpickler objected to, without PyTorch's advice around it
    (which suggests weights_only=False)."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|$)", text, re.DOTALL)
    if match:
        return " ".join(match.group(1).split())
    first = text.splitlines()[0] if text else type(err).__name__
    return "the weights-only unpickler refused it" if "weights_only" in first else first.strip()


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
    try:
        return _weights_only_load(path, kind)
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
        "tiff": "a TIFF image, not model weights: images go to lsmfm segment / deblur or "
                "napari",
        "hdf5": "an HDF5 file",
        "npy": "a numpy array file",
        "picture": "a PNG / JPEG picture",
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
