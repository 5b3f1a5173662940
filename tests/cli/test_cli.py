"""The `lsmfm` command: sample and info."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_lsmfm.cli import main
from napari_lsmfm.io import open_volume


def test_sample_writes_volumes_and_ground_truth(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "out")]) == 0
    written = capsys.readouterr().out.split()
    for kind in ("nuclei", "vessels", "plaques"):
        image = open_volume(tmp_path / "out" / f"{kind}.tif")
        labels = open_volume(tmp_path / "out" / f"{kind}_labels.tif")
        assert image.data.dtype == np.uint16 and image.data.ndim == 3
        assert labels.data.shape == image.data.shape
        assert image.voxel_size == pytest.approx((2.0, 1.0, 1.0))
        assert str(tmp_path / "out" / f"{kind}.tif") in written


def test_sample_refuses_to_overwrite(tmp_path, capsys):
    assert main(["sample", str(tmp_path)]) == 0
    before = (tmp_path / "nuclei.tif").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sample", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--overwrite" in err
    assert (tmp_path / "nuclei.tif").stat().st_mtime_ns == before
    assert main(["sample", str(tmp_path), "--overwrite"]) == 0


@pytest.mark.parametrize("arch", ["swinunetr", "unet"])
@pytest.mark.parametrize("use_text", [True, False])
def test_info_on_published_layouts(tmp_path, capsys, arch, use_text):
    from _checkpoints import make_lightning_checkpoint

    variant = "image_text" if use_text else "image_only"
    path = tmp_path / f"{arch}_{variant}_best.ckpt"
    make_lightning_checkpoint(path, arch=arch, use_text=use_text)
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == arch
    assert info["variant"] == variant
    assert info["text_tower"] is False  # no vocab.txt given: the image side only
    assert info["source"] == str(path)
    assert info["parameters"] > 1000
    assert ("feature_size" if arch == "swinunetr" else "channels") in info


def test_info_bad_file_one_line_no_traceback(tmp_path):
    bad = tmp_path / "weights.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    exe = shutil.which("lsmfm", path=str(Path(sys.executable).parent))
    result = subprocess.run([exe, "info", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "weights.ckpt" in lines[0]
    assert "Traceback" not in result.stderr


def test_info_without_default_says_so(capsys, monkeypatch, tmp_path):
    from napari_lsmfm.model import checkpoints

    monkeypatch.setattr(checkpoints, "DEFAULT_MODEL_DIR", tmp_path / "none")
    status = main(["info"])
    err = capsys.readouterr().err
    assert status == 2 and "No default foundation model is installed" in err
