"""Shared fixtures of the scale tests: a tiny foundation and a quick model, saved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lsmfm.model import Foundation, FoundationSpec
from napari_lsmfm.model.saved import save_foundation
from napari_lsmfm.tasks.segment import Segmenter

TILE = (16, 32, 32)


def image_with_nuclei(shape=(40, 90, 100), seed=0, empty_half=False):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 8, shape).astype(np.float32)
    for z, y, x in [(10, 20, 20), (20, 45, 50), (30, 70, 80), (20, 48, 96), (8, 80, 10)]:
        image[max(0, z - 4):z + 4, max(0, y - 6):y + 6, max(0, x - 6):x + 6] += 80
    if empty_half:
        image[:, :, shape[2] // 2:] = 0.0  # air: a constant dark background
    return image


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """A tiny foundation and a quick segmentation model trained on it, both saved."""
    root = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    fm = Foundation(FoundationSpec("unet", embed_dim=8, channels=(8, 16), strides=(2,),
                                   num_res_units=0, variant="image_only"))
    save_foundation(fm, root / "fm")
    image = image_with_nuclei()
    brushes = np.zeros(image.shape, np.uint8)
    brushes[20, 41:49, 46:54] = 2
    brushes[20, :6, :6] = 1
    seg = Segmenter(fm, steps=20, seed=0, tile=TILE, candidate="foundation")
    seg.fit(image, brushes)
    seg.save(root / "seg")
    return root, seg, image




@pytest.fixture
def make_image():
    """The test volume maker: make_image(shape, seed, empty_half)."""
    return image_with_nuclei
