"""The settings of a deblur model (:class:`DeblurConfig`), saved with it, and the backbone
a new model starts from when no default foundation is installed (:data:`DEBLUR_SPEC`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from napari_lsmfm.engine.grid import as_triple, check_tile
from napari_lsmfm.tasks.base import TaskConfig

__all__ = ["DEBLUR_SPEC", "DEFAULT_DEBLUR_TILE", "DeblurConfig"]

DEFAULT_DEBLUR_TILE = (64, 192, 192)

# Small for CPU speed; batch norm (running statistics at prediction) makes every window
# see the same network, so tiled and whole-volume results agree (instance norm would
# renormalise each window by its own content).
DEBLUR_SPEC = {
    "architecture": "unet",
    "embed_dim": 16,
    "channels": [32, 64, 128],
    "strides": [2, 2],
    "num_res_units": 2,
    "norm": "BATCH",
}


@dataclass
class DeblurConfig(TaskConfig):
    """Settings of a :class:`~.deblurrer.Deblurrer`; saved with the model.

    steps / lr / batch_size / patch_size: training; lr None = 2e-3 for synthetic
        training, 2e-4 for finetuning on a volume (``fit(image, psf)``).
    psf_condition: the network also takes the PSF (Gaussian sigmas in voxels) when it is
        known (non-blind deblurring; blind when it is not); psf_dropout: the share of
        training patches that hide it, so the same network works blind.
    hidden: width of the restoration head; unshuffle: block size folded into channels
        (:class:`~.net.DeblurNet`; 2 = 8 times fewer voxels through the network, 1 = none).
    tile / overlap: prediction windows (z, y, x) in voxels and their overlap fraction.
    loss weights: l1, l2, psnr (the mean over patches of 10 log10 MSE, i.e. minus each
        patch's PSNR: every patch counts the same whatever its noise level, where plain
        MSE is dominated by the noisiest ones), ssim (1 - SSIM), edge (finite
        differences), highpass. The
        published recipe is l1 1, ssim 0.2, edge 0.1, highpass 0.1 and no l2; the mean
        squared error (what PSNR measures) added with weight 10 gained 0.7 dB PSNR at
        equal training time on the benchmark (L1 alone is dominated by the background).
    lateral_sigma: range of lateral PSF sigmas (voxels) for synthetic training;
        axial_ratio: axial sigma / lateral sigma; photons: range (log-uniform).
    eval_every: steps between best-model checks; device: None = the foundation's.
    seed: random seed of sampling and initialisation; block_bytes: tiled memory budget.
    """

    steps: int = 400
    lr: float | None = None
    batch_size: int = 4
    patch_size: tuple[int, int, int] = (32, 64, 64)
    hidden: int = 32
    unshuffle: int = 2
    psf_condition: bool = False
    psf_dropout: float = 0.25
    tile: tuple[int, int, int] = DEFAULT_DEBLUR_TILE
    overlap: float = 0.25
    l1: float = 1.0
    l2: float = 10.0
    psnr: float = 0.0
    ssim: float = 0.2
    edge: float = 0.1
    highpass: float = 0.1
    lateral_sigma: tuple[float, float] = (0.5, 1.6)
    axial_ratio: tuple[float, float] = (1.5, 4.0)
    photons: tuple[float, float] = (30.0, 3000.0)
    eval_every: int = 25
    device: str | None = None
    seed: int = 0
    block_bytes: int = 2**30

    def validate(self) -> None:
        self.patch_size = as_triple(self.patch_size, "patch_size", positive=True)
        self.tile = check_tile(self.tile, "tile", DEFAULT_DEBLUR_TILE)
        self.lateral_sigma = _range(self.lateral_sigma, "lateral_sigma")
        self.axial_ratio = _range(self.axial_ratio, "axial_ratio")
        self.photons = _range(self.photons, "photons")
        for name in ("steps", "batch_size", "hidden", "eval_every", "unshuffle"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")


def _range(value: Any, name: str) -> tuple[float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f"{name} must be a range (low, high) of positive numbers, got {value}")
    return value  # type: ignore[return-value]
