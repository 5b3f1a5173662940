"""The deblurring loss: L1, MSE, per-patch PSNR, 3D SSIM, edges and high-pass terms of
(B, 1, z, y, x) tensors in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeblurConfig

__all__ = ["DeblurLoss", "deblur_loss", "ssim3d"]


def _edges(x: torch.Tensor) -> list[torch.Tensor]:
    return [x.diff(dim=d) for d in (2, 3, 4)]


def _highpass(x: torch.Tensor) -> torch.Tensor:
    return x - F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)


def ssim3d(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, win: int = 7,
           sigma: float = 1.5) -> torch.Tensor:
    """Mean 3D SSIM of (B, 1, z, y, x) tensors with a Gaussian window (valid region only).

    The same statistic as MONAI's ``SSIMLoss`` (Gaussian kernel, k1 0.01, k2 0.03), but
    the window is applied separably (3 x ``win`` taps instead of ``win``^3): the
    backward pass through MONAI's full 3D kernel cost twice the network's own.
    """
    r = torch.arange(win, dtype=torch.float32, device=x.device) - (win - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = (g / g.sum()).to(x.dtype)
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)
    for axis in range(3):
        shape = [5, 1, 1, 1, 1]
        shape[2 + axis] = win
        maps = F.conv3d(maps, g.reshape(shape[1:]).expand(shape), groups=5)
    mx, my, xx, yy, xy = maps.unbind(1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim.mean()


class DeblurLoss(nn.Module):
    """w_l1 L1 + w_l2 MSE + w_psnr mean_patches(10 log10 MSE) + w_ssim (1 - SSIM) +
    w_edge |grad difference| + w_hp |high-pass difference|; the published recipe is l1 1,
    ssim 0.2, edge 0.1, highpass 0.1."""

    def __init__(self, l1: float = 1.0, ssim: float = 0.2, edge: float = 0.1,
                 highpass: float = 0.1, l2: float = 0.0, psnr: float = 0.0) -> None:
        super().__init__()
        self.weights = (float(l1), float(ssim), float(edge), float(highpass))
        self.l2 = float(l2)
        self.psnr = float(psnr)

    @classmethod
    def from_config(cls, config: DeblurConfig) -> DeblurLoss:
        """The loss with a config's weights."""
        return cls(config.l1, config.ssim, config.edge, config.highpass, config.l2,
                   config.psnr)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w_l1, w_ssim, w_edge, w_hp = self.weights
        loss = w_l1 * F.l1_loss(pred, target)
        if self.l2:
            loss = loss + self.l2 * F.mse_loss(pred, target)
        if self.psnr:
            mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
            loss = loss + self.psnr * (10.0 * torch.log10(mse + 1e-8)).mean()
        if w_ssim and min(pred.shape[2:]) >= 7:
            loss = loss + w_ssim * (1.0 - ssim3d(pred.float(), target.float()))
        if w_edge:
            loss = loss + w_edge * sum(
                F.l1_loss(a, b) for a, b in zip(_edges(pred), _edges(target), strict=True)
            ) / 3.0
        if w_hp:
            loss = loss + w_hp * F.l1_loss(_highpass(pred), _highpass(target))
        return loss


def deblur_loss(pred: torch.Tensor, target: torch.Tensor, config: DeblurConfig | None = None
                ) -> torch.Tensor:
    """The training loss of (B, 1, z, y, x) tensors in [0, 1] (see :class:`DeblurLoss`)."""
    return DeblurLoss.from_config(config or DeblurConfig())(pred, target)
