"""The shipped sample volumes and the napari sample-data functions (no viewer)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from napari_lsmfm import _sample_data
from napari_lsmfm.synth import KINDS, load_sample, write_samples
from napari_lsmfm.synth.samples import (
    PARAMS_FILE,
    SAMPLE_DIR,
    SAMPLE_SHAPE,
    SAMPLE_VOXEL_SIZE,
    read_voxel_size,
    sample_paths,
)


def test_shipped_files_exist_and_are_small():
    files = [p for kind in KINDS for p in sample_paths(SAMPLE_DIR, kind)]
    files.append(SAMPLE_DIR / PARAMS_FILE)
    for path in files:
        assert path.is_file(), f"missing shipped sample {path}"
    total = sum(p.stat().st_size for p in files)
    assert total < 6 * 2**20, f"shipped samples take {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("kind", KINDS)
def test_load_sample(kind):
    image, labels, voxel_size = load_sample(kind)
    assert image.shape == labels.shape == SAMPLE_SHAPE
    assert image.dtype == np.uint16 and labels.dtype == np.uint16
    assert voxel_size == SAMPLE_VOXEL_SIZE
    assert labels.max() >= 1
    if kind == "vessels":
        assert labels.max() == 1


def test_shipped_record_matches_defaults():
    record = json.loads((SAMPLE_DIR / PARAMS_FILE).read_text())
    assert sorted(record) == sorted(KINDS)
    for kind, params in record.items():
        assert params["kind"] == kind
        assert tuple(params["shape"]) == SAMPLE_SHAPE
        assert tuple(params["voxel_size"]) == SAMPLE_VOXEL_SIZE


def test_write_samples_regenerates_shipped_files(tmp_path):
    paths = write_samples(tmp_path)
    assert {p.name for p in paths} == {
        *(f"{k}.tif" for k in KINDS),
        *(f"{k}_labels.tif" for k in KINDS),
        PARAMS_FILE,
    }
    for kind in KINDS:
        shipped_image, shipped_labels, shipped_voxel = load_sample(kind)
        image, labels, voxel = load_sample(kind, sample_dir=tmp_path)
        msg = (
            f"{kind}: regenerated sample differs from the shipped one; if the generator "
            "changed on purpose, run `lsmfm sample sample_data --overwrite`"
        )
        np.testing.assert_array_equal(labels, shipped_labels, err_msg=msg)
        np.testing.assert_array_equal(image, shipped_image, err_msg=msg)
        assert voxel == shipped_voxel
    assert json.loads((tmp_path / PARAMS_FILE).read_text()) == json.loads(
        (SAMPLE_DIR / PARAMS_FILE).read_text()
    )


def test_write_samples_refuses_to_overwrite(tmp_path):
    existing = tmp_path / "vessels_labels.tif"
    existing.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--overwrite") as err:
        write_samples(tmp_path, shape=(8, 32, 32))
    assert "vessels_labels.tif" in str(err.value)
    assert existing.read_bytes() == b"precious"
    assert not (tmp_path / "nuclei.tif").exists()  # nothing written at all
    write_samples(tmp_path, shape=(8, 32, 32), overwrite=True)
    image, labels, voxel = load_sample("vessels", sample_dir=tmp_path)
    assert image.shape == labels.shape == (8, 32, 32)
    assert read_voxel_size(tmp_path / "vessels.tif") == SAMPLE_VOXEL_SIZE


def test_load_sample_errors(tmp_path):
    with pytest.raises(ValueError, match="nuclei, vessels, plaques"):
        load_sample("cells")
    with pytest.raises(FileNotFoundError, match="lsmfm sample"):
        load_sample("nuclei", sample_dir=tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_napari_sample_functions(kind):
    layers = getattr(_sample_data, kind)()
    assert [layer_type for _, _, layer_type in layers] == ["image", "labels"]
    (image, image_kw, _), (labels, labels_kw, _) = layers
    assert image.dtype == np.uint16 and labels.dtype == np.uint16
    assert image_kw["name"] == kind
    assert labels_kw["name"] == f"{kind} ground truth"
    assert tuple(image_kw["scale"]) == tuple(labels_kw["scale"]) == SAMPLE_VOXEL_SIZE
    assert image_kw["metadata"]["kind"] == kind


def test_sample_module_does_not_import_qt_or_napari():
    assert "napari_lsmfm._sample_data" in sys.modules
    source = (SAMPLE_DIR.parent / "_sample_data.py").read_text()
    assert "import napari" not in source and "qtpy" not in source
