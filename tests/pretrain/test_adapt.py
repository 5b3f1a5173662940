"""Adapting a foundation to one volume: a trained copy (the original untouched), the loss
falls, Stop is prompt and keeps the steps done, lazy inputs are read patch by patch, and
``lsmfm segment --adapt`` end to end. Tiny UNet or few steps, CPU, one thread."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from napari_lsmfm.engine.jobs import Cancelled, JobContext
from napari_lsmfm.engine.store import foundation_fingerprint
from napari_lsmfm.model import Foundation, FoundationSpec
from napari_lsmfm.pretrain.adapt import VolumePatches, adapt_foundation
from napari_lsmfm.synth import make_volume

TINY = {"architecture": "unet", "embed_dim": 8, "channels": [8, 16, 32], "strides": [2, 2],
        "num_res_units": 0, "norm": "INSTANCE"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def volume():
    return make_volume("nuclei", shape=(16, 48, 48), seed=3)


def tiny_foundation() -> Foundation:
    torch.manual_seed(0)
    return Foundation(FoundationSpec.from_dict({**TINY, "variant": "image_only"}))


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_copy_is_adapted_and_the_original_untouched(volume):
    fm = tiny_foundation()
    before, fingerprint = weights(fm), foundation_fingerprint(fm)
    adapted, report = adapt_foundation(fm, volume.image, steps=12, patch=16, batch=1)
    assert adapted is not fm and isinstance(adapted, Foundation)
    assert all(torch.equal(before[k], v) for k, v in fm.state_dict().items())
    assert foundation_fingerprint(fm) == fingerprint == report["started_from"]
    # other weights, another fingerprint: feature caches keyed by it cannot mix
    assert report["fingerprint"] == foundation_fingerprint(adapted) != fingerprint
    changed = [k for k, v in adapted.backbone.state_dict().items()
               if not torch.equal(v, fm.backbone.state_dict()[k])]
    assert changed
    assert not adapted.training and "adapted" in adapted.source
    assert report["steps_done"] == report["steps"] == 12 and not report["stopped"]
    assert len(report["history"]) == 12 and report["seconds"] > 0
    assert set(report["objectives"]) == {"recon", "distill"}
    assert all(np.isfinite(report[k]) for k in ("loss", "first_loss", "recon", "distill"))


def test_the_loss_falls_on_a_structured_volume(volume):
    _, report = adapt_foundation(tiny_foundation(), volume.image, steps=60, patch=16, batch=2,
                                 lr=1e-3, seed=1)
    history = report["history"]
    first, last = np.mean(history[:10]), np.mean(history[-10:])
    assert last < 0.8 * first, (first, last)


def test_stop_mid_way_is_prompt_and_keeps_the_steps_done(volume):
    fm = tiny_foundation()
    seen = []

    def on_update(update):
        seen.append(update.values["step"])
        if update.values["step"] == 5:
            ctx.cancel()

    ctx = JobContext(on_update)
    t0 = time.perf_counter()
    adapted, report = adapt_foundation(fm, volume.image, steps=1000, patch=16, batch=1,
                                       ctx=ctx)
    assert time.perf_counter() - t0 < 10
    assert report["stopped"] and report["steps_done"] == 5 and seen == [1, 2, 3, 4, 5]
    assert ctx.last.fraction == pytest.approx(5 / 1000)
    assert foundation_fingerprint(adapted) == report["fingerprint"]
    # stopped before the first step: nothing to keep, Cancelled
    ctx = JobContext()
    ctx.cancel()
    with pytest.raises(Cancelled):
        adapt_foundation(fm, volume.image, steps=10, patch=16, batch=1, ctx=ctx)


class Recorder:
    """A lazy-looking volume that records every region read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads: list[int] = []

    def __getitem__(self, box):
        out = self.array[box]
        self.reads.append(int(np.prod(out.shape)))
        return out


def test_dask_and_zarr_inputs_give_the_numpy_weights_read_patch_by_patch(volume):
    import dask.array as da
    import zarr

    image = volume.image
    store = zarr.create_array(store={}, shape=image.shape, chunks=(8, 16, 16),
                              dtype=image.dtype)
    store[:] = image
    irange = tiny_foundation().intensity_range(image)
    run = dict(steps=3, patch=16, batch=2, seed=4, intensity_range=irange)
    prints = {name: adapt_foundation(tiny_foundation(), array, **run)[1]["fingerprint"]
              for name, array in [("numpy", image), ("dask", da.from_array(image, (8, 16, 16))),
                                  ("zarr", store)]}
    assert len(set(prints.values())) == 1, prints
    lazy = Recorder(image)
    adapt_foundation(tiny_foundation(), lazy, **run)
    assert lazy.reads and max(lazy.reads) <= 16**3 < image.size
    # zoom: a larger region is read and resampled to the patch the network sees
    source = VolumePatches(Recorder(image), 16, irange, zoom=0.5)
    patch = source.sample(np.random.default_rng(0))
    assert patch.image.shape == (1, 16, 16, 16) and source.region == (32, 32, 32)
    assert 0.0 <= patch.image.min() and patch.image.max() <= 1.0


def test_segment_cli_adapt_end_to_end(tmp_path, capsys, volume):
    from napari_lsmfm.cli import main
    from napari_lsmfm.io import open_volume, write_volume

    vol = volume
    write_volume(tmp_path / "img.tif", vol.image, voxel_size=vol.voxel_size)
    brushes = np.zeros(vol.labels.shape, np.uint8)
    z = int(np.argmax((vol.labels > 0).sum(axis=(1, 2))))
    brushes[z][vol.labels[z] == 0] = 1
    brushes[z][vol.labels[z] > 0] = 2
    write_volume(tmp_path / "b.tif", brushes, kind="labels")
    common = ["--device", "cpu", "--quiet", "--candidate", "foundation", "--steps", "20"]
    argv = ["segment", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "b.tif")]
    assert main([*argv, "--out", str(tmp_path / "a.tif"), "--adapt", "4",
                 "--save-model", str(tmp_path / "m"), *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    adapt = summary["adapt"]
    assert adapt["steps"] == adapt["steps_done"] == 4 and not adapt["stopped"]
    assert adapt["seconds"] > 0 and np.isfinite(adapt["loss"])
    assert (tmp_path / "m" / "adapted_foundation" / "model.safetensors").is_file()
    # the saved model loads the adapted foundation it was trained on, by itself
    assert main(["segment", str(tmp_path / "img.tif"), "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "again.tif"), "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    a = np.asarray(open_volume(tmp_path / "a.tif").data)
    assert np.array_equal(a, np.asarray(open_volume(tmp_path / "again.tif").data))
    # off (the default): no adaptation in the summary
    assert main([*argv, "--out", str(tmp_path / "b0.tif"), *common]) == 0
    assert "adapt" not in json.loads(capsys.readouterr().out)
    assert main(["segment", str(tmp_path / "img.tif"), "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "c.tif"), "--adapt", "3", "--quiet"]) == 2
    assert "--adapt belong to training" in capsys.readouterr().err
