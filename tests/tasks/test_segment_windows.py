"""Quick mode with the head in every window: the same class map as blending features,
but no feature accumulator and no window computed twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lsmfm.model import Foundation, FoundationSpec
from napari_lsmfm.tasks.segment import Segmenter


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    fm = Foundation(FoundationSpec("unet", embed_dim=8, channels=(8, 16), strides=(2,),
                                   num_res_units=0, variant="image_only"))
    rng = np.random.default_rng(1)
    image = rng.normal(100, 8, (24, 64, 64)).astype(np.float32)
    image[6:14, 10:22, 10:22] += 80
    image[12:20, 40:52, 36:50] += 80
    brushes = np.zeros(image.shape, np.uint8)
    brushes[10, 12:20, 12:20] = 2
    brushes[10, :5, :5] = 1
    seg = Segmenter(fm, steps=15, seed=0, tile=(12, 32, 32), candidate="foundation")
    seg.fit(image, brushes)
    return seg, image


@pytest.mark.parametrize("blend", ["crop", "gaussian"])
def test_head_in_every_window_agrees_with_blended_features(trained, blend):
    seg, image = trained
    exact = seg.predict(image, probabilities=True)
    each = seg.predict(image, probabilities=True, blend=blend)
    assert (each.classes == exact.classes).mean() > 0.995
    assert np.abs(each.probabilities - exact.probabilities).mean() < 0.01
    # a region equals the same part of the whole volume (one global window grid)
    part = seg.predict(image, region=(slice(4, 20), slice(8, 60), slice(0, 40)), blend=blend)
    np.testing.assert_allclose(part.probabilities,
                               each.probabilities[:, 4:20, 8:60, 0:40], atol=1e-5)


def test_crop_runs_every_window_once(trained):
    seg, image = trained
    calls = []
    fn = seg.quick_features.window_fn

    def counting(irange):
        inner = fn(irange)

        def wrapped(windows):
            calls.append(len(windows))
            return inner(windows)

        return wrapped

    seg.quick_features.window_fn = counting
    seg.config.block_bytes = 2**16  # tiny blocks: crop still runs each window once
    try:
        seg.predict(image, blend="crop")
    finally:
        del seg.quick_features.window_fn
        seg.config.block_bytes = 2**30
    from napari_lsmfm.engine.grid import TileGrid

    grid = TileGrid.build(image.shape, seg.config.tile, seg.config.overlap)
    assert sum(calls) == grid.n_windows
