"""The one input checker and the one output allocator."""

from __future__ import annotations

import numpy as np
import pytest

from napari_lsmfm.io.check import check_volume
from napari_lsmfm.io.output import check_output_path, remove_scratch, scratch_output


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((16, 16)), "is 2D"),
        (np.zeros((64, 64, 3)), "RGB"),
        (np.zeros((2, 4, 8, 8)), "4 axes"),
        (np.zeros((0, 8, 8)), "empty"),
        (np.zeros((4, 8, 8), bool), "intensities"),
    ],
)
def test_check_volume_refuses_with_what_to_do(image, message):
    with pytest.raises(ValueError, match=message):
        check_volume(image, "segmentation")


def test_check_volume_values_only_when_asked():
    flat = np.full((4, 8, 8), 3, np.uint16)
    assert check_volume(flat, "segmentation") == (4, 8, 8)
    with pytest.raises(ValueError, match="nothing to deblur"):
        check_volume(flat, "deblurring", values=True)
    bad = np.ones((4, 8, 8), np.float32)
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN voxels"):
        check_volume(bad, "deblurring", values=True)
    with pytest.raises(ValueError, match="fewer than 2"):
        check_volume(np.ones((1, 8, 8)), "deblurring", min_size=2)


def test_output_path_rules(tmp_path):
    assert check_output_path(None, False) is None
    with pytest.raises(ValueError, match=r"\.tif, \.tiff or \.zarr"):
        check_output_path(str(tmp_path / "out.png"), False)
    (tmp_path / "out.tif").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_path(str(tmp_path / "out.tif"), False)
    assert check_output_path(str(tmp_path / "out.tif"), True) == tmp_path / "out.tif"
    with pytest.raises(FileNotFoundError):
        check_output_path(str(tmp_path / "nowhere" / "out.tif"), False)


def test_scratch_output_is_numpy_small_and_zarr_large():
    assert scratch_output((4, 8, 8), np.uint16) == (None, None)
    out, folder = scratch_output((4, 8, 8), np.uint16, max_bytes=100)
    try:
        assert out.shape == (4, 8, 8) and out.dtype == np.uint16
        out[:] = 7
        assert int(np.asarray(out).sum()) == 7 * 4 * 8 * 8
    finally:
        remove_scratch(folder)
