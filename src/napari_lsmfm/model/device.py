"""Device choice for the foundation model: auto / cuda:N / mps / cpu, and mixed precision."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """Names of the devices usable here, for a device picker: "auto", "cpu", "cuda:N"..., "mps"."""
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
    if device.type != "cuda":
        return None
    try:
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    except (RuntimeError, AssertionError):
        return torch.float16
