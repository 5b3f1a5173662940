"""io: lazy opening, voxel size, round trips, overwrite safety, clear errors, npe2 hooks."""

from __future__ import annotations

import json
import time
import warnings

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_lsmfm.io import Volume, VolumeError, open_volume, write_volume
from napari_lsmfm.io._napari import napari_get_reader, write_image, write_labels


def _stack(shape=(12, 40, 48), dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 20, shape).astype(dtype)
    return rng.integers(0, 1000, shape).astype(dtype)


# ------------------------------------------------------------------ opening TIFF


def test_tiff_opens_lazily(tmp_path):
    data = _stack()
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data)
    vol = open_volume(path)
    assert isinstance(vol, Volume)
    assert isinstance(vol.data, da.Array)
    assert vol.axes == "ZYX" and vol.channel_axis is None
    assert vol.data.shape == data.shape and vol.data.dtype == data.dtype
    np.testing.assert_array_equal(vol.data[5].compute(), data[5])
    assert vol.voxel_size is None


def test_tiff_slice_reads_only_its_plane(tmp_path):
    data = _stack((30, 32, 32))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, compression="zlib")  # one chunk per page
    vol = open_volume(path)
    store = _zarr_store_of(vol.data)
    reads: list[str] = []
    original = store.get

    async def counting_get(key, *args, **kwargs):
        reads.append(key)
        return await original(key, *args, **kwargs)

    store.get = counting_get
    np.testing.assert_array_equal(vol.data[17].compute(), data[17])
    assert len([k for k in reads if not k.startswith((".", "zarr"))]) == 1


def _zarr_store_of(arr: da.Array):
    for layer in arr.dask.layers.values():
        for value in dict(layer).values():
            if isinstance(value, zarr.Array):
                return value.store
    for value in arr.dask.values():  # older graph layout
        if isinstance(value, zarr.Array):
            return value.store
    pytest.skip("could not find the zarr array in the dask graph")


def test_large_tiff_opens_in_well_under_a_second(tmp_path):
    path = tmp_path / "big.tif"
    plane = np.arange(1024 * 1024, dtype=np.uint16).reshape(1024, 1024)
    with tifffile.TiffWriter(path) as tw:  # ~200 MB, one page at a time
        for z in range(100):
            tw.write(plane + z, contiguous=True)
    assert path.stat().st_size > 200e6
    t0 = time.perf_counter()
    vol = open_volume(path)
    elapsed = time.perf_counter() - t0
    assert vol.data.shape == (100, 1024, 1024)
    assert elapsed < 0.5, f"open took {elapsed:.2f} s"
    np.testing.assert_array_equal(vol.data[42, 3].compute(), plane[3] + 42)


def test_ome_tiff_voxel_size_and_units(tmp_path):
    data = _stack()
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(
        path, data, ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": 2000.0, "PhysicalSizeZUnit": "nm",
                  "PhysicalSizeY": 0.325, "PhysicalSizeX": 0.325},  # default unit: um
    )
    vol = open_volume(path)
    assert vol.voxel_size == pytest.approx((2.0, 0.325, 0.325))
    assert vol.metadata["format"] == "ome-tiff"


def test_imagej_tiff_spacing(tmp_path):
    data = _stack()
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"axes": "ZYX", "spacing": 3.0, "unit": "micron"})
    vol = open_volume(path)
    assert vol.voxel_size == pytest.approx((3.0, 0.25, 0.5))


def test_imagej_hyperstack_channels_first(tmp_path):
    data = _stack((12, 2, 40, 48))  # ImageJ order: Z, C, Y, X
    path = tmp_path / "two_channels.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    vol = open_volume(path)
    assert vol.axes == "CZYX" and vol.channel_axis == 0
    assert vol.data.shape == (2, 12, 40, 48)
    np.testing.assert_array_equal(vol.data[1, 3].compute(), data[3, 1])


def test_singleton_time_and_channel_squeezed(tmp_path):
    data = _stack((1, 12, 1, 40, 48))
    path = tmp_path / "tzcyx.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TZCYX"})
    vol = open_volume(path)
    assert vol.axes == "ZYX" and vol.data.shape == (12, 40, 48)


def test_multichannel_czyx_tiff(tmp_path):
    data = _stack((3, 12, 40, 48))
    path = tmp_path / "czyx.ome.tif"
    write_volume(path, data, voxel_size=(2, 0.5, 0.5))
    vol = open_volume(path)
    assert vol.axes == "CZYX" and vol.channel_axis == 0
    assert vol.voxel_size == pytest.approx((2, 0.5, 0.5))
    np.testing.assert_array_equal(vol.data.compute(), data)


# ------------------------------------------------------------------ opening Zarr


def test_plain_zarr_array(tmp_path):
    data = _stack()
    path = tmp_path / "plain.zarr"
    z = zarr.open_array(str(path), mode="w", shape=data.shape, chunks=(4, 20, 24),
                        dtype=data.dtype)
    z[...] = data
    vol = open_volume(path)
    assert isinstance(vol.data, da.Array)
    assert vol.axes == "ZYX" and vol.voxel_size is None
    np.testing.assert_array_equal(vol.data.compute(), data)


def test_ome_zarr_round_trip_with_scale(tmp_path):
    data = _stack((3, 12, 40, 48))
    path = write_volume(tmp_path / "out.ome.zarr", data, voxel_size=(2.5, 0.4, 0.4))
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 2.5, 0.4, 0.4]
    assert json.loads((path / "0" / ".zarray").read_text())["zarr_format"] == 2
    vol = open_volume(path)
    assert vol.axes == "CZYX" and vol.voxel_size == pytest.approx((2.5, 0.4, 0.4))
    np.testing.assert_array_equal(vol.data.compute(), data)


def test_ome_zarr_v05_and_multiscale_levels(tmp_path):
    full = _stack((16, 64, 64))
    path = tmp_path / "pyramid.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    levels = [full, full[:, ::2, ::2], full[:, ::4, ::4]]
    datasets = []
    for i, level in enumerate(levels):
        arr = group.create_array(str(i), shape=level.shape, chunks=(8, 32, 32), dtype=level.dtype)
        arr[...] = level
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 0.5 * 2**i, 0.5 * 2**i]}]})
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": datasets,
    }]}
    vol = open_volume(path)
    assert vol.voxel_size == pytest.approx((2.0, 0.5, 0.5))
    assert [lv.shape for lv in vol.metadata["multiscale_levels"]] == [lv.shape for lv in levels]
    assert all(isinstance(lv, da.Array) for lv in vol.metadata["multiscale_levels"])

    layers = napari_get_reader(str(path))(str(path))
    data, meta, kind = layers[0]
    assert kind == "image" and meta["multiscale"] is True and len(data) == 3
    assert meta["scale"] == pytest.approx((2.0, 0.5, 0.5))


def test_ome_zarr_nanometre_unit(tmp_path):
    path = write_volume(tmp_path / "nm.zarr", _stack(), voxel_size=(1, 1, 1))
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    for axis in ms["axes"]:
        axis["unit"] = "nanometer"
    ms["datasets"][0]["coordinateTransformations"][0]["scale"] = [500.0, 100.0, 100.0]
    (path / ".zattrs").write_text(json.dumps(attrs))
    assert open_volume(path).voxel_size == pytest.approx((0.5, 0.1, 0.1))


def test_ome_zarr_unknown_unit_gives_no_voxel_size(tmp_path):
    path = write_volume(tmp_path / "pc.zarr", _stack(), voxel_size=(1, 1, 1))
    attrs = json.loads((path / ".zattrs").read_text())
    for axis in attrs["multiscales"][0]["axes"]:
        axis["unit"] = "parsec"
    (path / ".zattrs").write_text(json.dumps(attrs))
    vol = open_volume(path)
    assert vol.voxel_size is None and vol.metadata["unknown_units"] == ["parsec"]


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".tif", ".ome.tiff", ".zarr"])
@pytest.mark.parametrize(
    ("dtype", "kind"),
    [(np.uint16, "image"), (np.float32, "image"), (np.uint16, "labels"), (np.uint32, "labels")],
)
def test_round_trip(tmp_path, suffix, dtype, kind):
    data = _stack(dtype=dtype)
    if kind == "labels":
        data = (data % 7 * 100_000 if dtype == np.uint32 else data % 7).astype(dtype)
    path = write_volume(tmp_path / f"out{suffix}", data, voxel_size=(2, 0.5, 0.5), kind=kind)
    vol = open_volume(path)
    assert vol.data.dtype == dtype
    assert vol.voxel_size == pytest.approx((2, 0.5, 0.5))
    np.testing.assert_array_equal(vol.data.compute(), data)


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_dask_input_written_block_by_block(tmp_path, suffix):
    data = _stack((40, 64, 64))
    lazy = da.from_array(data, chunks=(7, 32, 32))
    path = write_volume(tmp_path / f"lazy{suffix}", lazy, chunks=(16, 32, 32))
    np.testing.assert_array_equal(open_volume(path).data.compute(), data)


def test_int64_labels_fit_into_32_bits_for_tiff(tmp_path):
    labels = (_stack() % 5).astype(np.int64)
    path = write_volume(tmp_path / "labels.tif", labels, kind="labels")
    vol = open_volume(path)
    assert vol.data.dtype == np.uint32
    np.testing.assert_array_equal(vol.data.compute(), labels)
    zpath = write_volume(tmp_path / "labels.zarr", labels, kind="labels")
    assert open_volume(zpath).data.dtype == np.int64


def test_float_labels_refused(tmp_path):
    with pytest.raises(ValueError, match="labels must be integers"):
        write_volume(tmp_path / "x.tif", _stack(dtype=np.float32), kind="labels")


def test_tiff_with_last_axis_of_three_is_not_rgb(tmp_path):
    data = _stack((5, 40, 3))
    path = write_volume(tmp_path / "thin.tif", data)
    np.testing.assert_array_equal(open_volume(path).data.compute(), data)


# ------------------------------------------------------------------ overwriting


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_overwrite_refused_then_allowed(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    first, second = _stack(seed=1), _stack(seed=2)
    write_volume(path, first)
    with pytest.raises(FileExistsError, match="already exists; choose another name or pass "
                       r"overwrite=True \(--overwrite on the command line\)"):
        write_volume(path, second)
    np.testing.assert_array_equal(open_volume(path).data.compute(), first)
    write_volume(path, second, overwrite=True)
    np.testing.assert_array_equal(open_volume(path).data.compute(), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporaries left


def test_overwrite_a_zarr_that_is_the_source(tmp_path):
    path = write_volume(tmp_path / "src.zarr", _stack())
    lazy = open_volume(path).data
    write_volume(path, lazy + 1, overwrite=True)  # reads the old store while writing
    np.testing.assert_array_equal(open_volume(path).data.compute(), _stack() + 1)


def test_overwrite_never_deletes_a_foreign_folder(tmp_path):
    folder = tmp_path / "results.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_volume(folder, _stack(), overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"


def test_failed_write_leaves_nothing(tmp_path):
    def fail(block):
        raise ZeroDivisionError("simulated failure while computing a block")

    broken = da.zeros((8, 16, 16), chunks=4).map_blocks(fail, dtype=float)
    for suffix in (".tif", ".zarr"):
        with pytest.raises(ZeroDivisionError):
            write_volume(tmp_path / f"x{suffix}", broken)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bad input


def _assert_clear(exc: VolumeError, name: str, *words: str) -> None:
    message = str(exc)
    assert name in message
    for word in words:
        assert word in message, message
    assert "Traceback" not in message and "\n" not in message


def test_2d_tiff(tmp_path):
    path = tmp_path / "slice.tif"
    tifffile.imwrite(path, _stack((512, 512)))
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    _assert_clear(info.value, "slice.tif", "2D image", "(512, 512)", "3D")
    assert open_volume(path, allow_2d=True).data.shape == (1, 512, 512)


def test_single_voxel_is_not_called_2d(tmp_path):
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, np.ones((1, 1, 1), np.uint16))
    with pytest.raises(VolumeError) as info:
        open_volume(path, allow_2d=True)
    _assert_clear(info.value, "one.tif", "single voxel")
    assert "2D" not in str(info.value)


def test_rgb_tiff(tmp_path):
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, _stack((8, 32, 32, 3), np.uint8), photometric="rgb")
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    _assert_clear(info.value, "photo.tif", "RGB", "grey-scale")


def test_three_planes_tagged_rgb_are_a_stack(tmp_path):
    # tifffile tags a (3, Y, X) array RGB (planar); 16-bit planes are not a colour picture
    path = tmp_path / "three.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(path, _stack((3, 64, 64), np.uint16))
    assert open_volume(path).shape == (3, 64, 64)
    photo = tmp_path / "planar8.tif"
    tifffile.imwrite(photo, _stack((3, 64, 64), np.uint8), photometric="rgb", planarconfig=2)
    with pytest.raises(VolumeError, match="RGB"):
        open_volume(photo)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.tif"
    path.touch()
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    _assert_clear(info.value, "empty.tif", "empty")


def test_zero_size_stack(tmp_path):
    path = tmp_path / "nothing.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tifffile.imwrite(path, np.zeros((0, 16, 16), np.uint16))
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    _assert_clear(info.value, "nothing.tif", "no pixels")


@pytest.mark.parametrize(
    "options",
    [{}, {"compression": "zlib"}, {"ome": True}, {"imagej": True}, {"bigtiff": True}],
    ids=["plain", "zlib", "ome", "imagej", "bigtiff"],
)
def test_truncated_tiff(tmp_path, options, caplog):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _stack((40, 64, 64)), **options)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    _assert_clear(info.value, "cut.tif", "truncated or damaged", "Re-export")
    assert not [r for r in caplog.records if r.name == "tifffile"]  # no log noise


def test_text_file_named_tif(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("these are my notes, not an image\n")
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    _assert_clear(info.value, "notes.tif", "is not a TIFF file")


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError) as info:
        open_volume(tmp_path / "gone.tif")
    _assert_clear(info.value, "gone.tif", "does not exist")


def test_time_series_refused(tmp_path):
    path = tmp_path / "movie.ome.tif"
    tifffile.imwrite(path, _stack((3, 5, 16, 16)), ome=True, metadata={"axes": "TZYX"})
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    _assert_clear(info.value, "movie.ome.tif", "time series", "3 time points")


def test_unsupported_and_non_zarr_folder(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match="not a supported file type"):
        open_volume(tmp_path / "image.png")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(VolumeError, match="not a Zarr store"):
        open_volume(tmp_path / "empty.zarr")


def test_lzw_without_imagecodecs_says_what_to_install(tmp_path):
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, _stack((5, 16, 16)))
    with tifffile.TiffFile(path) as tif:  # relabel the pages as LZW-compressed
        offsets = [p.tags["Compression"].valueoffset for p in tif.pages]
    with open(path, "r+b") as fh:
        for offset in offsets:
            fh.seek(offset)
            fh.write((5).to_bytes(2, "little"))
    with pytest.raises(VolumeError) as info:
        open_volume(path)
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        _assert_clear(info.value, "lzw.tif", "imagecodecs", "pip install imagecodecs")
    else:  # the codec exists, and the bytes are not LZW
        _assert_clear(info.value, "lzw.tif", "damaged")


# ------------------------------------------------------------------ npe2 hooks


@pytest.mark.parametrize("name", ["a.png", "b.csv", "c.nd2", "d"])
def test_reader_declines_other_files(name):
    assert napari_get_reader(name) is None


def test_reader_declines_several_files():
    assert napari_get_reader(["a.tif", "b.tif"]) is None


@pytest.mark.parametrize("name", ["a.tif", "b.TIFF", "c.ome.tif", "d.zarr", "e.ome.zarr/"])
def test_reader_accepts_volumes(name):
    assert callable(napari_get_reader(name))
    assert callable(napari_get_reader([name]))


def test_reader_layer_has_scale_from_metadata(tmp_path):
    path = write_volume(tmp_path / "cells.ome.tif", _stack(), voxel_size=(2, 0.5, 0.5))
    layers = napari_get_reader(str(path))(str(path))
    assert len(layers) == 1
    data, meta, kind = layers[0]
    assert kind == "image" and meta["name"] == "cells"
    assert meta["scale"] == pytest.approx((2, 0.5, 0.5))
    assert isinstance(data, da.Array) and data.shape == (12, 40, 48)
    assert "multiscale_levels" not in meta["metadata"]
    json.dumps(meta["metadata"], default=str)  # plain values only


def test_reader_multichannel_and_no_scale(tmp_path):
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, _stack((2, 12, 40, 48)))
    data, meta, kind = napari_get_reader([str(path)])([str(path)])[0]
    assert meta["channel_axis"] == 0 and data.shape == (2, 12, 40, 48)
    assert "scale" not in meta


def test_reader_raises_volume_error_for_2d(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, _stack((32, 32)))
    with pytest.raises(VolumeError, match="2D image"):
        napari_get_reader(str(path))(str(path))


def test_labels_zarr_reads_back_as_labels_layer(tmp_path):
    labels = (_stack() % 4).astype(np.uint32)
    written = write_labels(str(tmp_path / "seg.zarr"), labels,
                           {"scale": (2.0, 0.5, 0.5), "name": "seg"})
    assert written == [str(tmp_path / "seg.zarr")]
    data, meta, kind = napari_get_reader(written[0])(written[0])[0]
    assert kind == "labels" and data.dtype == np.uint32
    assert meta["scale"] == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_array_equal(np.asarray(data), labels)


def test_npe2_writers_overwrite_and_take_scale(tmp_path):
    data = _stack()
    target = tmp_path / "img.tif"
    target.write_bytes(b"old")  # napari's dialog already asked the user
    out = write_image(str(target), data, {"scale": (1.0, 3.0, 0.5, 0.5), "name": "img"})
    assert out == [str(target)]
    assert open_volume(target).voxel_size == pytest.approx((3.0, 0.5, 0.5))
    out = write_image(str(tmp_path / "noext"), data, {"scale": (1, 1, 1)})
    vol = open_volume(out[0])
    assert out[0].endswith(".tif") and vol.voxel_size is None  # napari's default scale
    out = write_labels(str(tmp_path / "lab.tif"), (data % 3).astype(np.int32), {})
    assert open_volume(out[0]).data.dtype == np.int32


def test_imagej_frames_read_as_slices(tmp_path):
    # Fiji often labels the planes of a z-stack as frames (T) when importing
    path = tmp_path / "frames.tif"
    tifffile.imwrite(path, _stack((9, 16, 16)), imagej=True, metadata={"axes": "TYX"})
    vol = open_volume(path)
    assert vol.axes == "ZYX" and vol.data.shape == (9, 16, 16)
    assert vol.metadata["z_from_axis"] == "T"
