"""Quick-mode prediction with the head applied in every window (reduced outputs).

:func:`~.quick.classify_windows` blends the features of overlapping windows and runs
the head on the blended features: exact, but the engine's buffers then hold every
feature channel (tens of floats a voxel), so large regions are cut into small blocks
whose border windows run once per block. Here the head runs inside the window function
and only the class probabilities (a few channels) are blended; with ``blend="crop"``
no accumulator is needed at all and no window runs twice, whatever the region. The
class maps agree with blending the features on all but a few voxels of the overlaps
(measured in tests/tasks/test_segment_windows.py); used by block-wise prediction
(:mod:`napari_lsmfm.scale`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from napari_lsmfm.engine.device import with_smaller_tiles
from napari_lsmfm.engine.tiled import predict_tiled

from .quick import head_probabilities

__all__ = ["classify_each_window"]


def classify_each_window(head: Any, features: Any, config: Any, image: Any,
                         irange: tuple[float, float], region: tuple[slice, ...], write: Any,
                         device: torch.device, ctx: Any = None, *, blend: str = "crop") -> None:
    """The class probabilities of ``region`` of ``image``: features and head window by
    window (a :class:`~.features.QuickFeatures` and a head), the probabilities stitched
    with ``blend`` ("crop" or "gaussian") and given block by block to ``write``."""
    features_of = features.window_fn(irange)

    def fn(windows: np.ndarray) -> np.ndarray:
        feats = features_of(windows)
        feats = feats.cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        return np.stack([head_probabilities(head, f, device) for f in feats])

    with_smaller_tiles(lambda tile: predict_tiled(
        fn, image, out_channels=head.n_out, tile=tile, overlap=config.overlap, blend=blend,
        region=region, sink=write, max_block_bytes=config.block_bytes, ctx=ctx,
        message="segmenting",
    ), config.tile, ctx, device, **features.memory(image.shape))
