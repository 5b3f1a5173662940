"""Deblur training on real sharp volumes: the same optics over a real stack
(:class:`RealPairs`), mixed into synthetic training, recorded in the model; the CLI's
``--sharp``."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from test_deblur import FAST, tiny_model

from napari_lsmfm.cli import main as cli_main
from napari_lsmfm.tasks.deblur import DeblurConfig
from napari_lsmfm.tasks.deblur.pairs import RealPairs, synthetic_batches


def stack(seed: int = 0, shape=(20, 40, 44)) -> np.ndarray:
    """A 'real' stack: bright blobs on a dim floor, uint16."""
    rng = np.random.default_rng(seed)
    v = np.full(shape, 200.0)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    for _ in range(12):
        c = rng.uniform(0, 1, 3) * shape
        v += 3000 * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / 8.0)
    return v.astype(np.uint16)


def test_real_pairs_image_the_stack_through_the_optics():
    cfg = DeblurConfig(**FAST)
    real = stack()
    sampler = RealPairs(cfg, 0, [real], pool=2)
    # the pool's volumes are crops of the normalised stack, mirrored to the pool's size
    assert sampler.pool[0].shape == sampler.shape
    assert sampler.pool[0].min() >= 0.0 and sampler.pool[0].max() <= 1.0
    x, y, psf = sampler.sample(3)
    assert x.shape == y.shape == (3, 1, *FAST["patch_size"]) and psf.shape == (3, 3)
    # the input is the target blurred: smoother (smaller neighbour differences) and noisy
    dy = (y[..., 1:] - y[..., :-1]).abs().mean()
    assert float(dy) > 0
    assert float(torch.corrcoef(torch.stack([x.ravel(), y.ravel()]))[0, 1]) > 0.5
    with pytest.raises(ValueError, match="3D"):
        RealPairs(cfg, 0, [real[0]])
    with pytest.raises(ValueError, match="at least one"):
        RealPairs(cfg, 0, [])


def test_mixed_batches_hold_both_kinds():
    cfg = DeblurConfig(**{**FAST, "batch_size": 4})
    sampler, val = synthetic_batches(cfg, 0, [stack()], sharp_share=0.5)
    x, y, psf = sampler.sample(4)
    assert x.shape[0] == 4 and val[0].shape[0] == 4
    only, _ = synthetic_batches(cfg, 0, [stack()], sharp_share=1.0)
    assert isinstance(only, RealPairs)
    with pytest.raises(ValueError, match="sharp_share"):
        synthetic_batches(cfg, 0, [stack()], sharp_share=0.0)


def test_fit_with_sharp_volumes_is_recorded():
    model = tiny_model(lr=1e-3)
    report = model.fit(steps=3, sharp=[stack(1)], sharp_share=0.5)
    assert report["steps_done"] == 3
    assert model.trained_on[-1]["real_volumes"] == [[20, 40, 44]]
    assert model.trained_on[-1]["real_share"] == 0.5


def test_cli_train_deblur_with_sharp(tmp_path, capsys):
    path = tmp_path / "real.tif"
    tifffile.imwrite(path, stack(2))
    missing = tmp_path / "nope.tif"
    assert cli_main(["train-deblur", "--out", str(tmp_path / "m"), "--steps", "1",
                     "--foundation", "small", "--patch-size", "16,32,32", "--batch-size", "2",
                     "--sharp", str(missing)]) != 0
    assert "nope.tif" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # refused before any training
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, stack(3)[0])
    assert cli_main(["train-deblur", "--out", str(tmp_path / "m"), "--steps", "1",
                     "--foundation", "small", "--patch-size", "16,32,32", "--batch-size", "2",
                     "--sharp", str(flat)]) != 0
    assert "3D" in capsys.readouterr().err
