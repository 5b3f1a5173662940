"""The tiled-inference engine: exact stitching, no seams, dask in, zarr out, cancel, OOM."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_lsmfm.engine.jobs import Cancelled, JobContext
from napari_lsmfm.engine.tiled import (
    DeviceMemoryError,
    TileGrid,
    gaussian_weights,
    predict_points,
    predict_tiled,
)


def pointwise(windows: np.ndarray) -> np.ndarray:
    """A window function whose output does not depend on the window: stitching is exact."""
    return np.concatenate([windows * 2.0 + 1.0, -windows], axis=1)


def local_mean(windows: np.ndarray) -> np.ndarray:
    """A 7x7x7 mean inside each window (edge voxels see a replicated border): depends on
    the window near its edges, like a network with padding."""
    out = ndi.uniform_filter(windows[:, 0], size=(1, 7, 7, 7), mode="nearest")
    return out[:, None]


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return ndi.gaussian_filter(rng.random((30, 70, 90)), 2).astype(np.float32)


def test_grid_covers_volume_and_cores_partition_it():
    grid = TileGrid.build((30, 70, 90), (16, 32, 32), 0.25)
    for a, size in enumerate((30, 70, 90)):
        starts = grid.starts[a]
        assert starts[0] == 0 and starts[-1] + grid.tile[a] == size
        cores = grid.cores[a]
        assert cores[0] == 0 and cores[-1] == size and list(cores) == sorted(cores)
    # a tile larger than the volume is clipped to it: one window
    assert TileGrid.build((10, 20, 30), (64, 128, 128), 0.25).n_windows == 1


@pytest.mark.parametrize("blend", ["gaussian", "constant", "crop"])
def test_pointwise_is_exact(volume, blend):
    out = predict_tiled(pointwise, volume, out_channels=2, tile=(16, 32, 32), blend=blend)
    np.testing.assert_allclose(out[0], volume * 2 + 1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], -volume, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_blocks_and_regions_equal_the_in_memory_result(volume, blend):
    """Block-wise (tiny memory budget) and regional results equal the one-block result:
    the window grid is global, so out-of-core changes nothing."""
    kw = dict(out_channels=1, tile=(16, 32, 32), overlap=0.5, blend=blend)
    whole = predict_tiled(local_mean, volume, **kw)
    blocks = predict_tiled(local_mean, volume, max_block_bytes=40_000, **kw)
    np.testing.assert_allclose(blocks, whole, atol=1e-6)
    region = (slice(5, 25), slice(10, 60), slice(33, 80))
    part = predict_tiled(local_mean, volume, region=region, **kw)
    np.testing.assert_allclose(part, whole[(slice(None), *region)], atol=1e-6)


def test_float_output_accumulates_in_place_running_each_window_once(volume):
    calls = []

    def counted(windows):
        calls.append(len(windows))
        return local_mean(windows)

    kw = dict(out_channels=1, tile=(16, 32, 32), overlap=0.5)
    reference = predict_tiled(local_mean, volume, max_block_bytes=40_000, **kw)
    half = np.zeros((1, *volume.shape), np.float16)
    result = predict_tiled(counted, volume, out=half, max_block_bytes=40_000, **kw)
    assert result is half
    assert sum(calls) == TileGrid.build(volume.shape, (16, 32, 32), 0.5).n_windows
    # float16 accumulation rounds (measured at most 0.0021 on values near 0.5)
    np.testing.assert_allclose(half.astype(np.float32), reference, atol=4e-3)


def test_gaussian_blending_has_no_seams(volume):
    """Against one window over the whole volume (the reference without seams): the
    Gaussian-blended result stays close, with no error peaks at window borders, while a
    plain mean of the same windows shows them (so the measure can see a seam); crop
    (overlap-tile with a halo wider than the filter) is exact."""
    single = local_mean(volume[None, None])[0]

    def plane_error(blend):
        tiled = predict_tiled(local_mean, volume, out_channels=1, tile=(16, 32, 32),
                              overlap=0.5, blend=blend)
        err = np.abs(tiled - single)[0, 4:-4, 4:-4, 4:-4]  # volume borders excluded
        return err.mean(axis=(0, 1))  # mean error of each x-plane

    scale = volume.std()
    assert plane_error("gaussian").max() < 0.02 * scale  # measured 0.006
    assert plane_error("constant").max() > 0.05 * scale  # measured 0.095: seams
    assert plane_error("crop").max() < 1e-6


def test_dask_input_and_zarr_output(volume):
    zarr = pytest.importorskip("zarr")
    lazy = da.from_array(volume, chunks=(10, 35, 45))
    out = zarr.create_array(
        store={}, shape=(1, *volume.shape), chunks=(1, 16, 32, 32), dtype="float32",
        fill_value=-1.0,
    )
    result = predict_tiled(local_mean, lazy, out_channels=1, tile=(16, 32, 32), out=out,
                           max_block_bytes=100_000)
    assert result is out
    reference = predict_tiled(local_mean, volume, out_channels=1, tile=(16, 32, 32))
    filled = out[...]
    assert (filled != -1.0).all()
    np.testing.assert_allclose(filled, reference, atol=1e-6)


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_predict_points_matches_the_volume(volume, blend):
    rng = np.random.default_rng(1)
    points = np.stack([rng.integers(0, s, 200) for s in volume.shape], 1)
    kw = dict(out_channels=1, tile=(16, 32, 32), overlap=0.25, blend=blend)
    full = predict_tiled(local_mean, volume, **kw)
    at = predict_points(local_mean, volume, points, **kw)
    np.testing.assert_allclose(at[:, 0], full[0][tuple(points.T)], atol=1e-6)


def test_sink_receives_blocks(volume):
    seen = []
    predict_tiled(pointwise, volume, out_channels=2, tile=(16, 32, 32),
                  sink=lambda sl, v: seen.append((sl, v.shape)), max_block_bytes=100_000)
    covered = np.zeros(volume.shape, int)
    for sl, shape in seen:
        covered[sl] += 1
        assert shape[0] == 2
    assert (covered == 1).all()


def test_progress_and_cancel(volume):
    updates = []
    ctx = JobContext(updates.append)
    predict_tiled(pointwise, volume, out_channels=2, tile=(16, 32, 32), ctx=ctx)
    assert updates[-1].fraction == pytest.approx(1.0)
    assert updates[-1].values["tile"] == updates[-1].values["tiles"]

    def cancel_on_third(update):
        if update.values.get("tile") == 3:
            ctx2.cancel()

    ctx2 = JobContext(cancel_on_third)
    with pytest.raises(Cancelled):
        predict_tiled(pointwise, volume, out_channels=2, tile=(16, 32, 32), ctx=ctx2)


def test_out_of_memory_halves_the_batch_then_explains(volume):
    calls = []

    def picky(windows):
        calls.append(len(windows))
        if len(windows) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return pointwise(windows)

    out = predict_tiled(picky, volume, out_channels=2, tile=(16, 32, 32), batch_size=4)
    np.testing.assert_allclose(out[1], -volume, atol=1e-6)
    assert calls[0] == 4 and 1 in calls

    def hopeless(windows):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeviceMemoryError, match="smaller tile"):
        predict_tiled(hopeless, volume, out_channels=2, tile=(16, 32, 32))


def test_bad_arguments(volume):
    with pytest.raises(ValueError, match="blend"):
        predict_tiled(pointwise, volume, out_channels=2, blend="max")
    with pytest.raises(ValueError, match="Z, Y, X"):
        predict_tiled(pointwise, volume[0], out_channels=2)
    with pytest.raises(ValueError, match="channels"):
        predict_tiled(pointwise, volume, out_channels=3, tile=(16, 32, 32))
    with pytest.raises(ValueError, match="outside"):
        predict_tiled(pointwise, volume, out_channels=2, region=(slice(0, 5), slice(0, 5),
                                                                 slice(80, 120)))
    with pytest.raises(ValueError, match="overlap"):
        predict_tiled(pointwise, volume, out_channels=2, overlap=1.0)


def test_gaussian_weights_peak_in_the_centre():
    w = gaussian_weights((9, 17, 17))
    assert w.shape == (9, 17, 17) and w.max() == pytest.approx(1.0)
    assert w[4, 8, 8] == w.max() and w.min() > 0


def test_aligned_grid_puts_window_origins_on_block_multiples():
    from napari_lsmfm.engine.tiled import TileGrid

    grid = TileGrid.build((50, 71, 70), (16, 32, 30), 0.3, align=2)
    for size, tile, starts in zip(grid.shape, grid.tile, grid.starts, strict=True):
        assert starts[-1] == size - tile  # the volume is covered to its end
        assert all(s % 2 == 0 for s in starts[:-1])
    assert grid.starts[1][-1] % 2 == 1  # 71 - 32: only the last origin may be odd
