"""The Foundation: a pretrained backbone and what it offers downstream (no Qt).

A volume comes in, is normalised the way the weights expect (1st-99th percentile to
[0, 1]), and the backbone turns it into dense features, multi-scale feature maps and a
pooled image embedding; when the weights have a text tower, prompts are embedded into
the same space as the image embedding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_lsmfm.engine import accel
from napari_lsmfm.engine.device import amp_dtype, resolve_device

from . import backbones
from .describe import no_text_reason, spec_info
from .text import TextTower

VARIANTS = ("image_text", "image_only")
NORMALIZATION = {"low": 1.0, "high": 99.0}
# Percentiles of volumes larger than this are estimated from a strided subsample.
PERCENTILE_SAMPLES = 1 << 22


@dataclass
class FoundationSpec:
    """Everything needed to rebuild a foundation's modules (not its weights).

    architecture: "swinunetr" or "unet"; embed_dim: channels of the dense output.
    SwinUNETR uses feature_size; UNet uses channels, strides, num_res_units, norm.
    variant: "image_text" (an image projection into a joint space of proj_dim) or
    "image_only" (proj_dim None). text: the text tower config ("bert" or "lsmfm") or None.
    """

    architecture: str
    embed_dim: int
    feature_size: int | None = None
    channels: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None
    num_res_units: int | None = None
    norm: str | None = None
    variant: str = "image_only"
    proj_dim: int | None = None
    text: dict | None = field(default=None)

    def __post_init__(self) -> None:
        if self.architecture not in backbones.ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not one of {backbones.ARCHITECTURES}"
            )
        self.embed_dim = _positive_int(self.embed_dim, "embed_dim")
        if self.architecture == "swinunetr":
            self.feature_size = _positive_int(self.feature_size, "feature_size")
            if self.feature_size % 12:
                raise ValueError(
                    f"SwinUNETR feature_size must be a multiple of 12, got {self.feature_size}"
                )
        else:
            if not self.channels or not self.strides:
                raise ValueError("a UNet needs channels and strides")
            self.channels = tuple(_positive_int(c, "channels") for c in self.channels)
            self.strides = tuple(_positive_int(s, "strides") for s in self.strides)
            if len(self.strides) != len(self.channels) - 1:
                raise ValueError(
                    "a UNet needs one stride fewer than channels, got "
                    f"{len(self.channels)} channels and {len(self.strides)} strides"
                )
            self.num_res_units = int(self.num_res_units if self.num_res_units is not None else 2)
            if isinstance(self.norm, list):
                self.norm = tuple(self.norm)
            self.norm = self.norm if self.norm is not None else "INSTANCE"
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {VARIANTS}")
        if self.variant == "image_text":
            self.proj_dim = _positive_int(self.proj_dim, "proj_dim")
        else:
            self.proj_dim = None
            self.text = None
        if self.text is not None:
            if not isinstance(self.text, dict) or self.text.get("kind") not in ("bert", "lsmfm"):
                raise ValueError("text must be a dict with kind 'bert' or 'lsmfm'")
            if int(self.text.get("proj_dim", -1)) != self.proj_dim:
                raise ValueError(
                    f"the text tower projects to {self.text.get('proj_dim')} dimensions but the "
                    f"image projection to {self.proj_dim}"
                )

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key in ("channels", "strides", "norm"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FoundationSpec:
        """Inverse of to_dict; unknown keys are ignored, bad values raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError("the spec must be a mapping")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for required in ("architecture", "embed_dim"):
            if required not in known:
                raise ValueError(f"the spec has no {required!r}")
        return cls(**known)


def _positive_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number <= 0 or number != value:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


# --- normalisation ---------------------------------------------------------------------


def strided_sample(volume: Any, max_samples: int) -> np.ndarray:
    """The volume itself when small, else a regular strided subsample of about max_samples."""
    size = math.prod(volume.shape)
    if size <= max_samples:
        return np.asarray(volume)
    step = max(1, math.ceil((size / max_samples) ** (1.0 / volume.ndim)))
    return np.asarray(volume[tuple(slice(None, None, step) for _ in volume.shape)])


def percentile_range(
    volume: Any,
    low: float = NORMALIZATION["low"],
    high: float = NORMALIZATION["high"],
    *,
    max_samples: int = PERCENTILE_SAMPLES,
) -> tuple[float, float]:
    """The (low, high) percentiles of a numpy, dask or zarr volume.

    Large or lazy volumes are estimated from a strided subsample of about `max_samples`
    voxels (computing only that). Raises ValueError for NaN or infinite voxels.
    """
    if math.prod(volume.shape) == 0:
        raise ValueError("The volume is empty (a zero-length axis); nothing to normalise.")
    sample = strided_sample(volume, max_samples).astype(np.float32, copy=False)
    check_finite(sample)
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        # Sparse signal (e.g. a few bright voxels on a flat background): use the full range.
        lo, hi = float(sample.min()), float(sample.max())
    return float(lo), float(hi)


def check_finite(array: np.ndarray) -> None:
    """Raise ValueError, saying what to do, when ``array`` holds NaN or infinite voxels."""
    if not np.isfinite(array).all():
        kind = "NaN" if np.isnan(array).any() else "infinite"
        raise ValueError(
            f"The volume contains {kind} voxels; the foundation model needs finite intensities. "
            "Replace them (e.g. numpy.nan_to_num) or crop them out before running the model."
        )


def normalize_intensity(
    volume: Any,
    *,
    low: float = NORMALIZATION["low"],
    high: float = NORMALIZATION["high"],
    intensity_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Scale a volume's `low`-`high` percentile range to [0, 1] and clip: float32 numpy.

    numpy, dask and zarr inputs (any shape) are accepted; lazy ones are computed. Pass
    `intensity_range` (from `percentile_range(whole_volume)`) to normalise tiles of a large
    volume identically. A constant volume gives zeros; NaN voxels raise ValueError.
    """
    if intensity_range is None:
        lo, hi = percentile_range(volume, low, high)
    else:
        lo, hi = (float(v) for v in intensity_range)
    array = np.asarray(volume, dtype=np.float32)
    check_finite(array)
    if not hi > lo:
        return np.zeros(array.shape, dtype=np.float32)
    out = (array - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def normalize_window(windows: np.ndarray, intensity_range: tuple[float, float],
                     what: str = "running the model") -> np.ndarray:
    """Raw windows (any shape) -> float32 in [0, 1] by ``intensity_range`` (lo, hi): the
    one normalisation of every window a task sends to a network, in training and
    prediction alike. A flat range (hi <= lo) gives zeros. Raises ValueError for NaN or
    infinite voxels (``what``: the task, for the message)."""
    if not np.isfinite(windows).all():
        raise ValueError(
            "the image contains NaN or infinite voxels; replace them (e.g. "
            f"numpy.nan_to_num) before {what}"
        )
    lo, hi = float(intensity_range[0]), float(intensity_range[1])
    scale = 1.0 / (hi - lo) if hi > lo else 0.0  # Python floats: float32 windows stay float32
    return np.clip((windows - lo) * scale, 0.0, 1.0).astype(np.float32, copy=False)


# --- the model ------------------------------------------------------------------------------


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the three spatial axes at their far end up to a multiple (reflect, or replicate
    where an axis is too short to reflect), so feature grids stay aligned with the input."""
    size = x.shape[2:]
    pads = [(-s) % multiple for s in size]
    if all(s + p == multiple for s, p in zip(size, pads, strict=True)):
        # A 1x1x1 bottleneck breaks instance norm (SwinUNETR's decoder): grow the last axis.
        pads[-1] += multiple
    if not any(pads):
        return x
    mode = "reflect" if all(p < s for p, s in zip(pads, size, strict=True)) else "replicate"
    flat = []
    for p in reversed(pads):  # F.pad wants the last axis first
        flat += [0, p]
    return F.pad(x, flat, mode=mode)


def _crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return x[..., : size[0], : size[1], : size[2]]


class Foundation(nn.Module):
    """A pretrained backbone with its projections and optional text tower.

    Attributes: spec (FoundationSpec), source ("default", a path, or "memory"), backbone
    (MONAI SwinUNETR/UNet with out_channels=embed_dim), image_proj (published layout:
    pool, flatten, Linear, ReLU, Linear, LayerNorm; None for image-only), text_tower
    (TextTower or None), text_unavailable_reason (why there is no text tower, or None),
    amp (autocast on CUDA), load_report (what loading used, ignored and noted).
    Built in eval mode with random weights (an "lsmfm" text tower in the spec is built
    too, unless build_text=False); use `load_foundation` to get trained weights.
    """

    def __init__(
        self,
        spec: FoundationSpec,
        *,
        text_tower: TextTower | None = None,
        text_unavailable_reason: str | None = None,
        source: str = "memory",
        build_text: bool = True,
    ):
        super().__init__()
        self.spec = spec
        self.source = source
        self.backbone = backbones.build_backbone(spec)
        self.image_proj: nn.Module | None = None
        if spec.variant == "image_text":
            self.image_proj = nn.Sequential(
                nn.AdaptiveAvgPool3d(1),
                nn.Flatten(),
                nn.Linear(spec.embed_dim, spec.proj_dim),
                nn.ReLU(),
                nn.Linear(spec.proj_dim, spec.proj_dim),
                nn.LayerNorm(spec.proj_dim),
            )
        if text_tower is None and build_text and spec.text and spec.text.get("kind") == "lsmfm":
            text_tower = TextTower.from_config(spec.text)  # ours needs no files: build it
        self.text_tower = text_tower
        if text_tower is not None:
            text_unavailable_reason = None
        elif text_unavailable_reason is None:
            text_unavailable_reason = no_text_reason(spec)
        self.text_unavailable_reason = text_unavailable_reason
        self.logit_scale: float | None = None
        self.load_report: Any = None
        self.amp = False
        self.autocast_dtype: torch.dtype | None = None
        self.eval()

    # --- device ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def to_device(self, device: str | torch.device = "auto") -> Foundation:
        """Move every module to `device` (auto / cpu / cuda:N / mps) in one step; mixed
        precision (bf16, else fp16) is switched on for CUDA and off elsewhere."""
        target = resolve_device(device)
        if target != self.device:
            self.to(target)
        self.autocast_dtype = amp_dtype(target)
        self.amp = self.autocast_dtype is not None
        return self

    def _autocast(self):
        if not self.amp or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype or torch.float16)

    # --- geometry ---------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        """Inputs are padded internally to multiples of this (32 for SwinUNETR)."""
        return backbones.size_multiple(self.spec)

    def voxel_bytes(self, out_channels: int = 0) -> float:
        """Estimated peak memory of one inference pass per (padded) input voxel, in bytes:
        the full-resolution activations (float32, a few layers of the widest of the
        first encoder level and the dense output) and ``out_channels`` float32 outputs.
        A guide for choosing windows that fit (measured about 350 B for the default
        model's quick-mode features; this says 600)."""
        width = max(self.spec.embed_dim, backbones.encoder_channels(self.spec)[0])
        return 4.0 * (5 * width + 2 * int(out_channels))

    @property
    def feature_channels(self) -> list[int]:
        """Channels of `features()` levels: the dense output, then the encoder levels."""
        return [self.spec.embed_dim] + backbones.encoder_channels(self.spec)

    @property
    def feature_strides(self) -> list[int]:
        """Strides of `features()` levels in input voxels: 1, then the encoder levels'."""
        return [1] + backbones.encoder_strides(self.spec)

    # --- normalisation ----------------------------------------------------------------------

    def intensity_range(self, volume: Any) -> tuple[float, float]:
        """The percentile range `normalize` uses, for normalising tiles of a large volume."""
        return percentile_range(volume, NORMALIZATION["low"], NORMALIZATION["high"])

    def normalize(
        self, volume: Any, *, intensity_range: tuple[float, float] | None = None
    ) -> np.ndarray:
        """What the weights expect: 1st-99th percentile -> [0, 1], clipped; float32 numpy.

        Accepts numpy, dask or zarr arrays (lazy inputs are computed; percentiles of large
        ones come from a subsample). A constant volume gives zeros; NaN voxels raise
        ValueError. `intensity_range` fixes (low, high), e.g. for tiles of one volume.
        """
        return normalize_intensity(
            volume,
            low=NORMALIZATION["low"],
            high=NORMALIZATION["high"],
            intensity_range=intensity_range,
        )

    # --- images -------------------------------------------------------------------------------

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != 1:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(
                f"The foundation takes a (B, 1, D, H, W) tensor, got {shape}; add batch and "
                "channel axes, e.g. torch.from_numpy(volume)[None, None]."
            )
        if min(x.shape[2:]) == 0:
            raise ValueError(f"The input has an empty spatial axis: {tuple(x.shape)}.")
        if not x.is_floating_point():
            x = x.float()
        return x.to(self.device, non_blocking=True)

    def _inference_autocast(self):
        if accel.current_settings().precision == "auto":
            return self._autocast()
        return accel.autocast_context(self.device)

    def run_backbone(self, x: torch.Tensor, *, compile: bool | None = None) -> torch.Tensor:
        """The backbone on an already prepared (B, C, D, H, W) tensor on this device: padded
        to ``size_multiple``, under autocast, cropped back; float32 dense features.

        Without autograd (inference) the backbone runs as :func:`~napari_lsmfm.engine.
        accel.prepare_module` prepares it (channels-last on the CPU: about 1.5 x faster,
        equal to float rounding; optionally compiled, ``compile``: None = the settings')
        and under the settings' precision; the features may then come channels-last."""
        size = x.shape[2:]
        x = _pad_to_multiple(x, self.size_multiple)
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            with self._autocast():
                dense = self.backbone(x)
        else:
            device = self.device
            net = accel.prepare_module(self.backbone, device, compile=compile)
            x = accel.to_memory_format(x, accel.use_channels_last(device))
            with self._inference_autocast():
                dense = net(x)
        return _crop(dense, size).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> dense features (B, embed_dim, D, H, W), float32.

        Any size works: the input is padded to `size_multiple` and the output cropped back.
        Gradients flow (use it for finetuning); wrap in torch.no_grad() for inference.
        """
        return self.run_backbone(self._prepare(x))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale feature maps, finest first, float32.

        Level 0 is the dense output (embed_dim, stride 1); then the encoder levels
        (`feature_channels`, `feature_strides`): SwinUNETR's swinViT hidden states, UNet's
        down blocks and bottom block. Level i has spatial size ceil(size / stride_i).
        """
        x = self._prepare(x)
        size = x.shape[2:]
        captured: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            captured.extend(output if isinstance(output, (list, tuple)) else [output])

        hooks = [
            m.register_forward_hook(keep) for m in backbones.encoder_taps(self.backbone, self.spec)
        ]
        try:  # never compiled: the hooks read the encoder levels
            dense = self.run_backbone(x, compile=False)
        finally:
            for hook in hooks:
                hook.remove()
        levels = [dense]
        for tensor, stride in zip(captured, backbones.encoder_strides(self.spec), strict=True):
            levels.append(_crop(tensor, [math.ceil(s / stride) for s in size]).float())
        return levels

    def pool_embedding(self, dense: torch.Tensor) -> torch.Tensor:
        # As in pretraining: L2-normalise the features per voxel, then pool and project.
        feats = F.normalize(dense, dim=1)
        pooled = (
            self.image_proj(feats) if self.image_proj is not None else feats.mean(dim=(2, 3, 4))
        )
        return F.normalize(pooled, dim=-1)

    def embed_image(self, x: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, proj_dim) for image+text weights, else (B, embed_dim);
        L2-normalised. Runs without autograd unless grad=True."""
        with contextlib.nullcontext() if grad else torch.inference_mode():
            return self.pool_embedding(self.forward(x))

    def embed_text(self, prompts: Sequence[str] | str, *, grad: bool = False) -> torch.Tensor:
        """(B,) prompts -> (B, proj_dim), L2-normalised, comparable with `embed_image`.

        Raises RuntimeError(text_unavailable_reason) when there is no text tower.
        """
        if self.text_tower is None:
            raise RuntimeError(self.text_unavailable_reason)
        if isinstance(prompts, str):
            prompts = [prompts]
        with contextlib.nullcontext() if grad else torch.inference_mode():
            return F.normalize(self.text_tower(list(prompts)).float(), dim=-1)

    # --- description ----------------------------------------------------------------------------

    def info(self) -> dict:
        """What `lsmfm info` prints: architecture, feature_size or channels (and strides,
        num_res_units, norm), embed_dim, proj_dim, parameters (all of them), variant,
        text_tower (bool), text_unavailable_reason, source, device."""
        return spec_info(
            self.spec, parameters=backbones.count_parameters(self), text_tower=self.text_tower,
            text_unavailable_reason=self.text_unavailable_reason, source=self.source,
            device=str(self.device))

