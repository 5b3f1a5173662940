"""The deblur network: a copy of the foundation's backbone whose dense features, with the
normalised intensity, feed a light conv head predicting a residual:
``output = clamp(input + residual, 0, 1)``, as the published model does.

:class:`DeblurNet` can fold f x f x f blocks into channels (:func:`pixel_unshuffle3d`)
and take the PSF as extra constant inputs (:func:`psf_code`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_lsmfm.tasks.heads import DenseHead

__all__ = [
    "PSF_CHANNELS",
    "DeblurNet",
    "backbone_copy",
    "inflate_input",
    "pixel_shuffle3d",
    "pixel_unshuffle3d",
    "psf_code",
    "widen_input",
]

PSF_CHANNELS = 4  # sigma z / 4, sigma y / 2, sigma x / 2 (voxels), and "the PSF is known"


def pixel_unshuffle3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, z, y, x) -> (B, C f^3, z/f, y/f, x/f): every f x f x f block becomes channels
    (lossless; the sizes must be multiples of ``factor``)."""
    b, c, z, y, w = x.shape
    f = int(factor)
    x = x.reshape(b, c, z // f, f, y // f, f, w // f, f)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * f**3, z // f, y // f, w // f)


def pixel_shuffle3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`pixel_unshuffle3d`."""
    b, cf, z, y, w = x.shape
    f = int(factor)
    c = cf // f**3
    x = x.reshape(b, c, f, f, f, z, y, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, z * f, y * f, w * f)


def inflate_input(backbone: nn.Module, channels: int) -> None:
    """Give the backbone's input convolutions (those with one input channel: the first
    convolution and, in residual units, its skip projection) ``channels`` inputs. The
    one-channel weights are repeated and divided by ``channels``, so on a locally constant
    input the inflated backbone computes what the original computes on the block average:
    the pretrained filters are kept, only spread over the sub-voxel channels."""
    found = False
    for sub in list(backbone.modules()):
        for name, conv in list(sub.named_children()):
            if not isinstance(conv, nn.Conv3d) or conv.in_channels != 1:
                continue
            new = nn.Conv3d(channels, conv.out_channels, conv.kernel_size, conv.stride,
                            conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                            device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(conv.weight.repeat(1, channels, 1, 1, 1) / channels)
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            setattr(sub, name, new)
            found = True
    if not found:
        raise ValueError("the backbone has no one-channel 3D convolution to take the "
                         "unshuffled input")


def widen_input(backbone: nn.Module, old: int, new: int) -> None:
    """Give the input convolutions (``old`` input channels) ``new`` inputs; the added
    channels start with zero weights, so the network computes what it did before."""
    for sub in list(backbone.modules()):
        for name, conv in list(sub.named_children()):
            if not isinstance(conv, nn.Conv3d) or conv.in_channels != old:
                continue
            wide = nn.Conv3d(new, conv.out_channels, conv.kernel_size, conv.stride,
                             conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                             device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                wide.weight.zero_()
                wide.weight[:, :old].copy_(conv.weight)
                if conv.bias is not None:
                    wide.bias.copy_(conv.bias)
            setattr(sub, name, wide)


def psf_code(psf_sigma: Any, batch: int, device: Any = None) -> torch.Tensor:
    """The (B, 4) condition of a PSF-conditioned network: Gaussian sigmas (z, y, x) in
    voxels, scaled to about [0, 1], and a 1 saying they are known; None (or a row of
    zeros) = unknown, and the network deblurs blind."""
    if psf_sigma is None:
        return torch.zeros(batch, PSF_CHANNELS, device=device)
    sig = torch.as_tensor(psf_sigma, dtype=torch.float32, device=device)
    if sig.ndim == 1:
        sig = sig.expand(batch, 3)
    known = (sig.abs().sum(1, keepdim=True) > 0).float()
    scale = torch.tensor([0.25, 0.5, 0.5], device=sig.device)
    return torch.cat([sig * scale, known], 1)


class DeblurNet(nn.Module):
    """Backbone + restoration head: (B, 1, z, y, x) in [0, 1] -> clamp(x + residual, 0, 1).

    The head (two 1x1x1 convs, :class:`~napari_lsmfm.tasks.heads.DenseHead`) reads the
    dense features and the intensity; its last layer starts at zero, so an untrained net
    is the identity.

    ``unshuffle`` f > 1 runs backbone and head on f x f x f blocks folded into channels
    (:func:`pixel_unshuffle3d`, as in FFDNet): the same information at 1/f^3 of the
    voxels, so the network costs about f^3 times less; the head predicts the f^3 residuals
    of each block, unfolded back to full resolution. The backbone's first convolution is
    inflated to f^3 inputs (:func:`inflate_input`).
    """

    def __init__(self, foundation: Any, hidden: int = 32, unshuffle: int = 1,
                 psf_condition: bool = False) -> None:
        super().__init__()
        self.foundation = foundation
        self.unshuffle = int(unshuffle)
        self.psf_condition = False
        if self.unshuffle < 1:
            raise ValueError(f"unshuffle must be at least 1, got {unshuffle}")
        sub = self.unshuffle**3
        if sub > 1:
            inflate_input(foundation.backbone, sub)
        if psf_condition:
            self.enable_psf_condition()
        self.head = DenseHead(foundation.spec.embed_dim + sub, sub, hidden)
        last = self.head.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def enable_psf_condition(self) -> None:
        """Add the PSF inputs (:func:`psf_code`, as constant channels beside the image) to
        the backbone, with zero weights: a trained blind network stays what it was and
        then learns to use the PSF when finetuned."""
        if not self.psf_condition:
            widen_input(self.foundation.backbone, self.unshuffle**3,
                        self.unshuffle**3 + PSF_CHANNELS)
            self.psf_condition = True

    def forward(self, x: torch.Tensor, psf: torch.Tensor | None = None) -> torch.Tensor:
        """``psf``: (B, 4) from :func:`psf_code` (or None: unknown) for a PSF-conditioned
        network; ignored otherwise."""
        f = self.unshuffle
        if f == 1 and not self.psf_condition:
            residual = self.head(torch.cat([self.foundation(x), x], 1))
            return torch.clamp(x + residual, 0.0, 1.0)
        size = x.shape[2:]
        pad = [(-s) % f for s in size]
        xp = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate") if any(pad) else x
        folded = pixel_unshuffle3d(xp, f) if f > 1 else xp
        inputs = folded
        if self.psf_condition:
            code = psf if psf is not None else psf_code(None, x.shape[0], x.device)
            code = code.to(folded.device, folded.dtype)
            inputs = torch.cat(
                [folded, code[:, :, None, None, None].expand(-1, -1, *folded.shape[2:])], 1)
        features = self.foundation.run_backbone(inputs.to(self.foundation.device))
        residual = self.head(torch.cat([features, folded], 1))
        residual = pixel_shuffle3d(residual, f) if f > 1 else residual
        residual = residual[:, :, : size[0], : size[1], : size[2]]
        return torch.clamp(x + residual, 0.0, 1.0)


def backbone_copy(foundation: Any) -> Any:
    """A trainable copy of the foundation's backbone (no text tower: deblurring needs none)."""
    from napari_lsmfm.model import Foundation

    copy_ = Foundation(foundation.spec, build_text=False, source=foundation.source)
    copy_.backbone.load_state_dict(foundation.backbone.state_dict())
    return copy_
