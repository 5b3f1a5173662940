"""Task heads on top of the foundation (the saved-model format is in
:mod:`napari_lsmfm.engine.store`).

Heads:
- :class:`VoxelHead`: a per-voxel MLP on feature vectors (segmentation: on the cached
  features in quick mode, on the finetuned backbone's in full mode); input
  standardisation is part of the module, so the saved weights are self-contained.
- :class:`DenseHead`: a small conv head on the foundation's dense output (the
  deblurring network's, trained end to end with the backbone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["DenseHead", "VoxelHead"]


class VoxelHead(nn.Module):
    """Per-voxel classifier: standardise, then an MLP; (N, C_in) -> (N, n_out) logits."""

    def __init__(
        self, in_channels: int, n_out: int, hidden: int = 32, depth: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.n_out = int(n_out)
        self.hidden = int(hidden)
        self.depth = int(depth)
        self.dropout = float(dropout)
        self.register_buffer("mean", torch.zeros(self.in_channels))
        self.register_buffer("std", torch.ones(self.in_channels))
        # dropout on the inputs: no single (possibly uninformative) feature is relied upon
        layers: list[nn.Module] = [nn.Dropout(self.dropout)] if self.dropout > 0 else []
        width = self.in_channels
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            width = self.hidden
        layers.append(nn.Linear(width, self.n_out))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def from_saved(cls, settings: Mapping[str, Any], state: Mapping[str, Any]) -> VoxelHead:
        """A head from its saved :meth:`settings` and state dict."""
        head = cls(settings["in_channels"], settings["n_out"], settings["hidden"],
                   settings.get("depth", 2), settings.get("dropout", 0.0))
        head.load_state_dict(state)
        return head

    def set_standardization(self, samples: torch.Tensor) -> None:
        """Per-channel mean and std from training vectors (N, C_in)."""
        with torch.no_grad():
            self.mean.copy_(samples.mean(0))
            self.std.copy_(samples.std(0).clamp_min(1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std)

    def settings(self) -> dict:
        return {"in_channels": self.in_channels, "n_out": self.n_out, "hidden": self.hidden,
                "depth": self.depth, "dropout": self.dropout}


class DenseHead(nn.Module):
    """Conv head: (B, C_in, z, y, x) -> (B, n_out, z, y, x) logits; two 1x1x1 convs (the
    backbone supplies the spatial context; a 3x3x3 conv here would cost more than it)."""

    def __init__(self, in_channels: int, n_out: int, hidden: int = 32) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.n_out = int(n_out)
        self.hidden = int(hidden)
        self.net = nn.Sequential(
            nn.Conv3d(self.in_channels, self.hidden, 1),
            nn.ReLU(),
            nn.Conv3d(self.hidden, self.n_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def settings(self) -> dict:
        return {"in_channels": self.in_channels, "n_out": self.n_out, "hidden": self.hidden}


