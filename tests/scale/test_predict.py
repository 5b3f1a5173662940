"""predict_volume: block-wise prediction equals the whole-volume one, resumes after an
interruption, skips empty blocks, runs on a two-worker dask.distributed cluster, and
writes OME-Zarr outputs with a pyramid."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_lsmfm.engine.jobs import Cancelled, JobContext
from napari_lsmfm.io import open_volume
from napari_lsmfm.io.output import partial_info
from napari_lsmfm.scale import predict_volume
from napari_lsmfm.scale.run import choose_plan
from napari_lsmfm.scale.tasks import windows_of


def _run(saved, out, **kw):
    root, _, image = saved
    kw.setdefault("skip_empty", False)
    return predict_volume(root / "seg", kw.pop("image", image), out,
                          weights=str(root / "fm"), block=(16, 32, 32), **kw)


def test_blocks_are_whole_window_steps_and_chunks_divide_them():
    step, halo = windows_of((64, 128, 128), 0.25, (1000, 4000, 4000))
    assert step == (48, 96, 96) and halo == (8, 16, 16)
    plan, chunks = choose_plan((1000, 4000, 4000), step)
    assert plan.block == (192, 288, 288)  # four steps, three in y and x (17 M voxels)
    assert all(b % c == 0 for b, c in zip(plan.block, chunks, strict=True))
    plan, _ = choose_plan((1000, 4000, 4000), step, block=(100, 100, 100))
    assert plan.block == (144, 192, 192)  # rounded up to whole steps


def test_block_wise_equals_whole_volume(saved, tmp_path):
    _, seg, image = saved
    whole = seg.predict(image, probabilities="uint8")
    summary = _run(saved, tmp_path / "c.zarr", probabilities=tmp_path / "p.zarr")
    assert summary["blocks"] > 4 and summary["predicted"] == summary["blocks"]
    classes = zarr.open_array(str(tmp_path / "c.zarr" / "0"))[:]
    probs = zarr.open_array(str(tmp_path / "p.zarr" / "0"))[:].astype(int)
    # windows differ from the whole volume's only near block borders (blending)
    assert (classes == whole.classes).mean() > 0.999
    assert np.abs(probs - whole.probabilities.astype(int)).mean() < 1.0
    vol = open_volume(tmp_path / "c.zarr")
    assert vol.metadata.get("kind") == "labels" and vol.shape == image.shape
    assert partial_info(tmp_path / "c.zarr") is None


def test_a_loaded_model_keeps_its_settings(saved, tmp_path):
    root, seg, image = saved
    tile, budget = seg.config.tile, seg.config.block_bytes
    predict_volume(seg, image, tmp_path / "c.zarr", tile=(12, 24, 24), skip_empty=False)
    assert seg.config.tile == tile and seg.config.block_bytes == budget


def test_an_interrupted_run_resumes_and_ends_equal(saved, tmp_path):
    _run(saved, tmp_path / "full.zarr")
    seen = []

    def stop_after_three(update):
        if update.values.get("block", 0) >= 3:
            seen.append(update.values["block"])
            ctx.cancel()

    ctx = JobContext(stop_after_three)
    with pytest.raises(Cancelled):
        _run(saved, tmp_path / "cut.zarr", ctx=ctx)
    assert partial_info(tmp_path / "cut.zarr")["partial"]
    with pytest.raises(ValueError, match="--resume"):
        _run(saved, tmp_path / "cut.zarr")
    summary = _run(saved, tmp_path / "cut.zarr", resume=True)
    assert summary["resumed"] == 3 and summary["predicted"] == summary["blocks"]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "cut.zarr" / "0"))[:],
                                  zarr.open_array(str(tmp_path / "full.zarr" / "0"))[:])
    assert partial_info(tmp_path / "cut.zarr") is None


def test_empty_blocks_skip_the_network(saved, tmp_path, make_image):
    image = make_image(empty_half=True)
    every = _run(saved, tmp_path / "all.zarr", image=image)
    some = _run(saved, tmp_path / "skip.zarr", image=image, skip_empty=True)
    assert some["skipped"] >= some["blocks"] // 3 and every["skipped"] == 0
    a = zarr.open_array(str(tmp_path / "all.zarr" / "0"))[:]
    b = zarr.open_array(str(tmp_path / "skip.zarr" / "0"))[:]
    assert (a == b).mean() > 0.99
    assert (b[:, :, 60:] == 0).all()  # the air is background


def test_refuses_what_it_cannot_do(saved, tmp_path):
    root, seg, image = saved
    _run(saved, tmp_path / "c.zarr")
    with pytest.raises(FileExistsError):
        _run(saved, tmp_path / "c.zarr")
    with pytest.raises(ValueError, match="path"):
        predict_volume(root / "seg", image, tmp_path / "d.zarr", workers=2)
    with pytest.raises(ValueError, match="segmentation"):
        predict_volume("src/napari_lsmfm/model/default_deblur", image, tmp_path / "e.zarr",
                       probabilities=tmp_path / "p.zarr")


def test_two_dask_workers_give_the_same_result(saved, tmp_path):
    pytest.importorskip("distributed")
    import tifffile

    root, _, image = saved
    tifffile.imwrite(tmp_path / "img.tif", image)
    one = predict_volume(root / "seg", tmp_path / "img.tif", tmp_path / "one.zarr",
                         weights=str(root / "fm"), block=(16, 32, 32), skip_empty=False,
                         instances=tmp_path / "i1.zarr")
    two = predict_volume(root / "seg", tmp_path / "img.tif", tmp_path / "two.zarr",
                         weights=str(root / "fm"), block=(16, 32, 32), skip_empty=False,
                         instances=tmp_path / "i2.zarr", workers=2)
    assert one["blocks"] == two["blocks"]
    for a, b in (("one.zarr", "two.zarr"), ("i1.zarr", "i2.zarr")):
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / a / "0"))[:],
                                      zarr.open_array(str(tmp_path / b / "0"))[:])
