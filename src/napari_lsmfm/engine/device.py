"""Devices: auto / cuda:N / mps / cpu, mixed precision, and running out of memory.

The one place that tells an out-of-memory error (:func:`is_out_of_memory`), frees the
device's cache (:func:`free_device_memory`), turns such an error in a training step
into a clear message (:func:`memory_guard`) and retries tiled work with smaller windows
(:func:`with_smaller_tiles`). torch is imported when a function needs it, not with the
module, so the tiled engine and the command line start without it.
"""

from __future__ import annotations

import contextlib
import math
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

# What PyTorch's and numpy's allocators say when the host runs out of memory.
_CPU_ALLOCATOR_TEXT = ("out of memory", "can't allocate memory", "defaultcpuallocator",
                       "unable to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is a device running out of memory: CUDA or MPS, or the CPU
    (``MemoryError``, numpy's ``_ArrayMemoryError``, PyTorch's "DefaultCPUAllocator:
    can't allocate memory")."""
    if isinstance(exc, MemoryError):  # numpy's _ArrayMemoryError is one too
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(t in text for t in _CPU_ALLOCATOR_TEXT)


def free_device_memory() -> None:
    """Give cached CUDA memory back after an out-of-memory error (no-op elsewhere)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def available_memory() -> int | None:
    """Bytes of host memory this process can still take (Linux: MemAvailable, within a
    container's cgroup limit); None where it cannot be told."""
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes",
                                    "memory/memory.usage_in_bytes")):
        try:
            with open(f"/sys/fs/cgroup/{limit_file}", encoding="ascii") as handle:
                limit = handle.read().strip()
            with open(f"/sys/fs/cgroup/{usage_file}", encoding="ascii") as handle:
                used = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            room = max(0, int(limit) - used)
            free = room if free is None else min(free, room)
        break
    return free


def gib(nbytes: float) -> str:
    """``nbytes`` as "1.5 GiB" (or MiB / TiB), for messages."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes / 2**20:.3g} MiB"


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


def _halved(tile: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """The largest axis halved (not below ``minimum``)."""
    return tuple(max(minimum, t // 2) if t == max(tile) else t for t in tile)


def window_bytes(tile: Sequence[int], voxel_bytes: float, multiple: int = 1) -> float:
    """Estimated peak memory of one window: its voxels, padded to ``multiple``, times
    ``voxel_bytes`` (a network's activations per input voxel)."""
    padded = [-(-int(t) // multiple) * multiple for t in tile]
    return float(voxel_bytes) * math.prod(padded)


def with_smaller_tiles(run: Callable[[tuple[int, ...]], T], tile: Sequence[int], ctx: Any = None,
                       device: Any = None, *, minimum: int = 32,
                       shape: Sequence[int] | None = None, voxel_bytes: float | None = None,
                       multiple: int = 1) -> T:
    """``run(tile)``; when the device (GPU or CPU) runs out of memory, halve the largest
    tile axis (not below ``minimum``) and try again, reporting each retry on ``ctx``.
    Returns what ``run`` does.

    On the CPU, where running out of memory can kill the process instead of raising, a
    ``voxel_bytes`` estimate (peak bytes per window voxel, padded to ``multiple``) is
    checked first: windows (clipped to the volume's ``shape``) that would not fit in the
    memory available start smaller, reported on ``ctx``. Raises DeviceMemoryError, saying
    what to change, when even ``minimum`` windows do not fit.
    """
    tile = tuple(int(t) for t in tile)
    if shape is not None:
        tile = tuple(min(t, int(s)) for t, s in zip(tile, shape, strict=True))
    on_cpu = device is None or str(device).startswith("cpu")
    if voxel_bytes and on_cpu:
        tile = _fit_in_memory(tile, voxel_bytes, multiple, minimum, ctx)
    while True:
        try:
            return run(tile)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
            if not isinstance(exc, DeviceMemoryError) and not is_out_of_memory(exc):
                raise
            free_device_memory()
            smaller = _halved(tile, minimum)
            if smaller == tile:
                if on_cpu:
                    raise DeviceMemoryError(
                        f"out of memory even with {tile} windows on the CPU: close other "
                        "programs, or use a machine with more memory"
                    ) from exc
                raise DeviceMemoryError(
                    f"{exc}. Even {tile} windows do not fit on {device}: choose the CPU"
                ) from exc
            tile = smaller
            if ctx is not None:
                where = "the CPU's" if on_cpu else "device"
                ctx.report(None, f"out of {where} memory: retrying with {tile} windows")


def _fit_in_memory(tile: tuple[int, ...], voxel_bytes: float, multiple: int, minimum: int,
                   ctx: Any) -> tuple[int, ...]:
    free = available_memory()
    if free is None:
        return tile
    need = window_bytes(tile, voxel_bytes, multiple)
    if need <= free:
        return tile
    start = tile
    while window_bytes(tile, voxel_bytes, multiple) > free:
        smaller = _halved(tile, minimum)
        if smaller == tile:
            break
        tile = smaller
    if ctx is not None:
        ctx.report(None, f"{start} windows would need about {gib(need)}, more than the "
                         f"{gib(free)} of memory free: using {tile} windows")
    return tile
