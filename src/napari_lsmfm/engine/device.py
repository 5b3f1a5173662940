"""Devices: auto / cuda:N / mps / cpu, mixed precision, and running out of memory.

The one place that tells an out-of-memory error (:func:`is_out_of_memory`), frees the
device's cache (:func:`free_device_memory`), turns such an error in a training step
into a clear message (:func:`memory_guard`) and retries tiled work with smaller windows
(:func:`with_smaller_tiles`). torch is imported when a function needs it, not with the
module, so the tiled engine and the command line start without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
T = TypeVar("T")


class DeviceMemoryError(RuntimeError):
    """The device ran out of memory even for one window; the message says what to try."""


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """Names of the devices usable here, for a device picker: "auto", "cpu", "cuda:N"..., "mps"."""
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's device choice into a `torch.device`.

    "auto" (or None / "") picks CUDA, then Apple MPS, then CPU. "cuda" means "cuda:0".
    Raises ValueError with what is available when the named device is not present.
    """
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ValueError(
                "Device 'mps' was requested but Apple MPS is not available in this PyTorch; "
                f"choose one of {available_devices()}."
            )
        return torch.device("mps")
    if text.startswith("cuda"):
        index_text = text[4:].lstrip(":") or "0"
        if not index_text.isdigit():
            raise ValueError(f"Device {name!r} is not understood; write 'cuda' or 'cuda:N'.")
        index = int(index_text)
        if not torch.cuda.is_available():
            raise ValueError(
                f"Device {name!r} was requested but this PyTorch sees no CUDA GPU "
                f"(a CPU-only build, or no driver); choose one of {available_devices()}."
            )
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"Device {name!r} does not exist: this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})."
            )
        return torch.device("cuda", index)
    raise ValueError(f"Device {name!r} is not understood; choose auto, cpu, cuda, cuda:N or mps.")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for mixed precision on `device`: bf16 where supported, else fp16 on
    CUDA; None (full precision) on CPU and MPS."""
    import torch

    if device.type != "cuda":
        return None
    try:
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    except (RuntimeError, AssertionError):
        return torch.float16


# --------------------------------------------------------------------- out of memory


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is a device running out of memory (CUDA, MPS or the CPU allocator)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory() -> None:
    """Give cached CUDA memory back after an out-of-memory error (no-op elsewhere)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@contextlib.contextmanager
def memory_guard(what: str, hint: str) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into :class:`DeviceMemoryError`
    ``"out of memory {what}; {hint}"`` (the cache is freed first); other errors pass."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        free_device_memory()
        raise DeviceMemoryError(f"out of memory {what}; {hint}") from exc


def with_smaller_tiles(run: Callable[[tuple[int, ...]], T], tile: Sequence[int], ctx: Any = None,
                       device: Any = None, *, minimum: int = 32) -> T:
    """``run(tile)``; on :class:`DeviceMemoryError` halve the largest tile axis (not below
    ``minimum``) and try again, reporting each retry on ``ctx``. Returns what ``run`` does."""
    tile = tuple(int(t) for t in tile)
    while True:
        try:
            return run(tile)
        except DeviceMemoryError as exc:
            smaller = tuple(max(minimum, t // 2) if t == max(tile) else t for t in tile)
            if smaller == tile:
                where = f" on {device}" if device is not None else ""
                raise DeviceMemoryError(
                    f"{exc}. Even {tile} windows do not fit{where}: choose the CPU"
                ) from exc
            tile = smaller
            if ctx is not None:
                ctx.report(None, f"out of device memory: retrying with {tile} windows")
