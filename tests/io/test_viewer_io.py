"""Samples, reader and writers through napari itself, in a real headless viewer."""

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.gui

EXPECTED = {
    "nuclei": "instance",
    "vessels": "semantic",
    "plaques": "instance",
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_open_sample_through_napari(make_napari_viewer, key):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-lsmfm", key)
    image, labels = viewer.layers
    assert image.name == key
    assert type(image).__name__ == "Image" and type(labels).__name__ == "Labels"
    assert image.data.ndim == 3 and image.data.dtype == np.uint16
    assert labels.data.shape == image.data.shape
    assert tuple(image.scale) == tuple(labels.scale) == (2.0, 1.0, 1.0)
    ids = np.unique(labels.data)
    if EXPECTED[key] == "semantic":
        assert set(ids) == {0, 1}
    else:
        assert len(ids) > 5
    # ground truth sits on the bright structures
    fg = labels.data > 0
    dark = np.percentile(image.data, 1)  # the camera offset
    assert image.data[fg].mean() - dark > 1.5 * (image.data[~fg].mean() - dark)


def test_reader_opens_stack_lazily_with_scale(make_napari_viewer, tmp_path):
    from napari_lsmfm.io import write_volume

    data = (np.arange(20 * 30 * 40) % 1000).astype(np.uint16).reshape(20, 30, 40)
    path = write_volume(tmp_path / "stack.tif", data, voxel_size=(2.5, 0.5, 0.5))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-lsmfm")
    assert tuple(layer.scale) == (2.5, 0.5, 0.5)
    assert type(layer.data).__module__.startswith("dask")
    np.testing.assert_array_equal(np.asarray(layer.data[3]), data[3])


def test_reader_opens_zarr_folder(make_napari_viewer, tmp_path):
    from napari_lsmfm.io import write_volume

    data = np.random.default_rng(0).integers(0, 4000, (16, 32, 32), dtype=np.uint16)
    path = write_volume(tmp_path / "stack.zarr", data, voxel_size=(3.0, 1.0, 1.0))
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-lsmfm")
    assert tuple(layers[0].scale) == (3.0, 1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(layers[0].data), data)


def test_bad_tiff_gets_clear_message(make_napari_viewer, tmp_path):
    path = tmp_path / "slice.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16))
    viewer = make_napari_viewer()
    with pytest.raises(Exception) as info:
        viewer.open(str(path), plugin="napari-lsmfm")
    assert "2D" in str(info.value) and "slice.tif" in str(info.value)
    assert len(viewer.layers) == 0


@pytest.mark.parametrize("ext", [".tif", ".zarr"])
def test_writers_through_napari(make_napari_viewer, tmp_path, ext):
    from napari_lsmfm.io import open_volume

    viewer = make_napari_viewer()
    img = np.random.default_rng(1).integers(0, 3000, (8, 16, 16), dtype=np.uint16)
    lab = (img > 1500).astype(np.uint16)
    viewer.add_image(img, name="img", scale=(2.0, 0.5, 0.5))
    viewer.add_labels(lab, name="lab", scale=(2.0, 0.5, 0.5))
    for name, data in (("img", img), ("lab", lab)):
        out = tmp_path / f"{name}{ext}"
        viewer.layers[name].save(str(out), plugin="napari-lsmfm")
        vol = open_volume(out)
        np.testing.assert_array_equal(np.asarray(vol.data), data)
        assert vol.voxel_size == pytest.approx((2.0, 0.5, 0.5))
