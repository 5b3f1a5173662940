"""lsmfm predict's other outputs and its command line: deblurring block by block, the
pyramid opening in napari as a multiscale layer, and the errors a user can meet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr

from napari_lsmfm.cli import main
from napari_lsmfm.io import open_volume
from napari_lsmfm.io._napari import read_volume_layers
from napari_lsmfm.scale import predict_volume
from napari_lsmfm.scale.pyramid import level_factors, write_pyramid
from napari_lsmfm.tasks.deblur.api import DEFAULT_DEBLUR_DIR, load_default_deblur


def _nuclei(shape):
    sample = tifffile.imread(DEFAULT_DEBLUR_DIR.parents[1] / "sample_data" / "nuclei.tif")
    reps = [-(-s // n) for s, n in zip(shape, sample.shape, strict=True)]
    return np.tile(sample, reps)[tuple(slice(0, s) for s in shape)]


def test_deblur_block_by_block_matches_one_prediction(tmp_path):
    image = _nuclei((60, 200, 200))
    whole = load_default_deblur("cpu").predict(image).data.astype(np.float64)
    summary = predict_volume(DEFAULT_DEBLUR_DIR, image, tmp_path / "d.zarr",
                             block=(48, 144, 144), skip_empty=False, device="cpu")
    assert summary["blocks"] >= 4 and summary["task"] == "deblur"
    blocks = zarr.open_array(str(tmp_path / "d.zarr" / "0"))[:].astype(np.float64)
    span = whole.max() - whole.min()
    psnr = 10 * np.log10(span**2 / np.mean((blocks - whole) ** 2))
    assert psnr > 40.0  # blending differs from one prediction only near block borders


def test_pyramid_levels_and_metadata(tmp_path):
    assert level_factors((40, 2000, 2000), (2.0, 0.5, 0.5)) == [(1, 2, 2), (1, 4, 4),
                                                                (2, 8, 8)]
    assert level_factors((40, 200, 200), None) == []
    from napari_lsmfm.io.write import create_zarr

    labels = create_zarr(tmp_path / "l.zarr", (8, 600, 520), np.uint16, kind="labels",
                         voxel_size=(2.0, 0.5, 0.5), chunks=(8, 128, 128))
    data = np.zeros(labels.shape, np.uint16)
    data[:, 100:300, 100:300] = 7
    labels[...] = data
    assert write_pyramid(tmp_path / "l.zarr", kind="labels", voxel_size=(2.0, 0.5, 0.5)) == 3
    vol = open_volume(tmp_path / "l.zarr")
    levels = vol.metadata["multiscale_levels"]
    assert [lv.shape for lv in levels] == [(8, 600, 520), (8, 300, 260), (8, 150, 130)]
    assert set(np.unique(levels[2].compute())) == {0, 7}  # ids stay ids
    attrs = json.loads((tmp_path / "l.zarr" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["datasets"][1]["coordinateTransformations"][0][
        "scale"] == [2.0, 1.0, 1.0]
    assert "image-label" in attrs


def test_predicted_pyramid_opens_as_a_multiscale_layer(saved, tmp_path, make_napari_viewer):
    root, _, _ = saved
    image = np.zeros((16, 600, 600), np.float32)  # mostly air: skipped blocks are fast
    image[4:12, 40:60, 40:60] = 200.0
    image += np.random.default_rng(0).normal(0, 1, image.shape).astype(np.float32)
    summary = predict_volume(root / "seg", image, tmp_path / "c.zarr", weights=str(root / "fm"),
                             block=(16, 96, 96))
    assert summary["skipped"] > summary["blocks"] // 2 and summary["levels"]["classes"] >= 2
    (data, meta, kind), = read_volume_layers(str(tmp_path / "c.zarr"))
    assert kind == "labels" and meta["multiscale"] and len(data) >= 2
    viewer = make_napari_viewer()
    layer, = viewer.open(str(tmp_path / "c.zarr"), plugin="napari-lsmfm")
    assert layer.multiscale and layer.data[0].shape == image.shape


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_predicts_and_says_what_is_wrong(saved, tmp_path, capsys):
    root, _, image = saved
    tifffile.imwrite(tmp_path / "img.tif", image)
    img = str(tmp_path / "img.tif")
    base = ["predict", str(root / "seg"), img, "--weights", str(root / "fm"), "--quiet"]
    code, out, _ = _cli(capsys, *base, "--out", str(tmp_path / "c.zarr"), "--block", "16,32,32",
                        "--instances", str(tmp_path / "i.zarr"))
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["predicted"] + summary["skipped"] == summary["blocks"]
    assert open_volume(tmp_path / "i.zarr").metadata.get("kind") == "labels"
    for args, message in [
        (["--out", str(tmp_path / "c.zarr")], "--overwrite"),
        (["--out", str(tmp_path / "x.tif")], "OME-Zarr"),
        (["--out", str(tmp_path / "y.zarr"), "--workers", "2", "--scheduler", "tcp://x:1"],
         "not both"),
        (["--out", str(tmp_path / "y.zarr"), "--resume", "--overwrite"], "one of them"),
        (["--out", img], "OME-Zarr"),
    ]:
        code, _, err = _cli(capsys, *base, *args)
        assert code != 0 and message in err, (args, err)
    code, _, err = _cli(capsys, "predict", str(tmp_path), img, "--out", str(tmp_path / "z.zarr"))
    assert code != 0 and "not a saved napari-lsmfm model" in err
    assert not (tmp_path / "y.zarr").exists() and not (tmp_path / "z.zarr").exists()


def test_cli_resumes_a_partial_output(saved, tmp_path, capsys):
    from napari_lsmfm.engine.jobs import Cancelled, JobContext

    root, _, image = saved
    tifffile.imwrite(tmp_path / "img.tif", image)
    base = ["predict", str(root / "seg"), str(tmp_path / "img.tif"), "--weights",
            str(root / "fm"), "--quiet", "--block", "16,32,32", "--out", str(tmp_path / "c.zarr")]

    def stop(update):
        if update.values.get("block", 0) >= 2:
            ctx.cancel()

    ctx = JobContext(stop)
    with pytest.raises(Cancelled):  # as a killed run leaves it: partial, two blocks done
        predict_volume(root / "seg", tmp_path / "img.tif", tmp_path / "c.zarr",
                       weights=str(root / "fm"), block=(16, 32, 32), ctx=ctx)
    code, _, err = _cli(capsys, *base)
    assert code != 0 and "--resume" in err
    code, out, _ = _cli(capsys, *base, "--resume")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["resumed"] == 2
    assert open_volume(tmp_path / "c.zarr").shape == image.shape  # complete: opens
