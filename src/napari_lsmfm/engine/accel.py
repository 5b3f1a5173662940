"""Inference accelerators shared by every network the tiled engine runs (no Qt).

Measured on the default foundation (a 2.5 M parameter 3D UNet, 64 x 128 x 128 windows,
2 AMD EPYC cores with AVX2, torch 2.13; ``benchmarks/throughput.py``):

- channels-last 3D memory format (``torch.channels_last_3d``): oneDNN's direct
  convolutions and, above all, its transposed convolutions are 1.3-1.6 x faster with
  the channels innermost (the decoder's last transposed convolution alone was two
  thirds of the time in the default layout, half of it a layout copy). Outputs change
  by float rounding only (max 1e-5). On by default on the CPU; elsewhere only when
  asked (not measured on GPUs here).
- ``torch.compile``: optional and off by default (it costs a compilation of tens of
  seconds per window shape, and a C++ compiler on the CPU); ``configure(compile=True)``
  or ``LSMFM_COMPILE=1``.
- reduced precision: bf16 autocast on a CPU without bf16 instructions (AVX2 only) was
  17 x *slower* than float32, so the CPU always runs float32 unless asked
  (``precision="bf16"``); on CUDA the default ("auto") is bf16 where supported, else
  fp16, as :meth:`~napari_lsmfm.model.Foundation.to_device` has always done.
- batching windows helps GPUs only (on 2 CPU cores two windows per call cost what two
  calls cost): :func:`suggest_batch_size`.

Settings are process-wide (:func:`configure`, or the environment variables
``LSMFM_CHANNELS_LAST`` = 0/1, ``LSMFM_COMPILE`` = 0/1, ``LSMFM_PRECISION`` = auto /
fp32 / bf16 / fp16), read when a network is first prepared on a device.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "PRECISIONS",
    "AccelSettings",
    "autocast_context",
    "autocast_dtype",
    "configure",
    "current_settings",
    "for_inference",
    "prepare_module",
    "suggest_batch_size",
    "to_memory_format",
    "use_channels_last",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


@dataclass(frozen=True)
class AccelSettings:
    """How networks run for inference.

    channels_last: None = on the CPU only (where it was measured faster), True / False =
    everywhere / nowhere. compile: wrap networks in ``torch.compile`` (inference only).
    precision: "auto" (bf16 / fp16 autocast on CUDA, float32 elsewhere), "fp32", "bf16"
    or "fp16" (autocast to that dtype on any device that supports it).
    """

    channels_last: bool | None = None
    compile: bool = False
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def _from_environment() -> AccelSettings:
    precision = os.environ.get("LSMFM_PRECISION", "auto").strip().lower() or "auto"
    if precision not in PRECISIONS:
        precision = "auto"
    return AccelSettings(channels_last=_env_flag("LSMFM_CHANNELS_LAST"),
                         compile=bool(_env_flag("LSMFM_COMPILE")), precision=precision)


_SETTINGS = [_from_environment()]


def current_settings() -> AccelSettings:
    """The process-wide settings in force."""
    return _SETTINGS[0]


def configure(**changes: Any) -> AccelSettings:
    """Change the process-wide settings (fields of :class:`AccelSettings`); returns the
    previous ones, so a caller can restore them (``configure(**asdict(old))``). Networks
    already prepared keep their memory format; compilation applies from the next call."""
    unknown = set(changes) - set(AccelSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown accelerator settings {sorted(unknown)}; "
                         f"choose from {sorted(AccelSettings.__dataclass_fields__)}")
    old = _SETTINGS[0]
    _SETTINGS[0] = replace(old, **changes)
    return old


def use_channels_last(device: torch.device | str, choice: bool | None = None) -> bool:
    """Whether 5-D tensors on ``device`` go channels-last: ``choice`` when given, else the
    settings' (None there: on the CPU only)."""
    if choice is None:
        choice = current_settings().channels_last
    if choice is None:
        return torch.device(device).type == "cpu"
    return bool(choice)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` (5-D) in channels-last 3D (or contiguous) layout; other tensors as they are."""
    if x.ndim != 5:
        return x
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


# compiled wrappers by module: never registered as submodules (state-dict keys unchanged)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the layout each prepared module was given (True: channels-last)
_LAYOUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout_holds(net: nn.Module, channels_last: bool) -> bool:
    """Whether the 5-D weights with more than one input channel (a one-channel weight is
    both layouts at once) are still in the layout (loading weights may replace them)."""
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    for p in net.parameters():
        if p.ndim == 5 and p.shape[1] > 1:
            return p.is_contiguous(memory_format=fmt)
    return True


def prepare_module(net: nn.Module, device: torch.device | str, *,
                   channels_last: bool | None = None, compile: bool | None = None
                   ) -> nn.Module | Any:
    """``net`` ready for inference on ``device``: its 5-D weights in channels-last layout
    when :func:`use_channels_last` says so (in place; the weights' values, the state-dict
    keys and saving are unchanged: saved tensors are made contiguous), and wrapped in
    ``torch.compile`` when ``compile`` (default: the settings') is on.

    Returns what to call: ``net`` itself, or its compiled wrapper (kept per module, so
    preparing again does not compile again). Idempotent and cheap to call per window.
    """
    target = torch.device(device)
    want = use_channels_last(target, channels_last)
    if _LAYOUT.get(net) != want or not _layout_holds(net, want):
        # outside inference mode: weights made there could never be trained again
        with torch.inference_mode(False), torch.no_grad():
            net.to(memory_format=torch.channels_last_3d if want else torch.contiguous_format)
        _LAYOUT[net] = want
    if compile is None:
        compile = current_settings().compile
    if not compile:
        return net
    compiled = _COMPILED.get(net)
    if compiled is None:
        compiled = torch.compile(net, dynamic=False)
        _COMPILED[net] = compiled
    return compiled


def autocast_dtype(device: torch.device | str, precision: str | None = None
                   ) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (default: the settings') on ``device``, or None
    for float32. "auto": bf16 (else fp16) on CUDA, float32 elsewhere (bf16 on a CPU
    without bf16 instructions was measured 17 x slower than float32)."""
    from .device import amp_dtype

    target = torch.device(device)
    precision = precision or current_settings().precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return amp_dtype(target)
    if precision == "fp32":
        return None
    if precision == "fp16" and target.type == "cpu":
        raise ValueError("fp16 autocast is for GPUs; on the CPU use 'bf16' or 'fp32'")
    return _DTYPES[precision]


def autocast_context(device: torch.device | str, precision: str | None = None
                     ) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for :func:`autocast_dtype` (a no-op context for float32)."""
    target = torch.device(device)
    dtype = autocast_dtype(target, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(target.type, dtype=dtype)


@contextlib.contextmanager
def for_inference(net: nn.Module, device: torch.device | str):
    """``with for_inference(net, device) as run:`` - inference mode with ``run`` the
    prepared network (:func:`prepare_module`) under the settings' autocast."""
    run = prepare_module(net, device)
    with torch.inference_mode(), autocast_context(device):
        yield run


def suggest_batch_size(device: torch.device | str, window_bytes: float,
                       *, limit: int = 8, share: float = 0.25) -> int:
    """Windows per network call: 1 on the CPU (batching did not pay there); on CUDA as
    many as fit in ``share`` of the free memory (``window_bytes``: one window's peak,
    e.g. :func:`~napari_lsmfm.engine.device.window_bytes`), at most ``limit``. The tiled
    engine halves the batch when a device runs out of memory anyway."""
    target = torch.device(device)
    if target.type != "cuda" or window_bytes <= 0:
        return 1
    try:
        free, _total = torch.cuda.mem_get_info(target)
    except (RuntimeError, AssertionError):
        return 1
    return int(max(1, min(limit, (free * share) // window_bytes)))
