"""Running out of memory on the CPU is recognised like on a GPU: smaller windows, and
windows that would not fit start smaller (issue 19, item 4)."""

import numpy as np
import pytest
import torch

import napari_lsmfm.engine.device as device
from napari_lsmfm.engine.device import (
    DeviceMemoryError,
    is_out_of_memory,
    window_bytes,
    with_smaller_tiles,
)
from napari_lsmfm.engine.jobs import JobContext
from napari_lsmfm.engine.tiled import predict_tiled


def _numpy_memory_error() -> MemoryError:
    try:
        np.empty(1 << 45, np.uint8)  # 32 TiB: refused at once
    except MemoryError as exc:
        return exc
    pytest.skip("this numpy allocated 32 TiB")


def test_cpu_allocation_failures_count_as_out_of_memory():
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 25769803776 bytes.")
    assert is_out_of_memory(cpu)
    assert is_out_of_memory(MemoryError())
    err = _numpy_memory_error()
    assert "_ArrayMemoryError" in repr(type(err)) and is_out_of_memory(err)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shapes do not match"))
    assert not is_out_of_memory(ValueError("can't allocate memory"))  # not an allocator's


def test_the_cpu_falls_back_to_smaller_windows():
    """A window function that fails like PyTorch's CPU allocator for windows over 16
    voxels along x: the engine retries with smaller windows and finishes."""
    volume = np.random.default_rng(0).random((8, 32, 64)).astype(np.float32)
    tried = []

    def fn(windows):
        tried.append(windows.shape[2:])
        if windows.shape[-1] > 16:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 99999999 bytes")
        return windows * 2

    updates = []
    out = with_smaller_tiles(
        lambda tile: predict_tiled(fn, volume, out_channels=1, tile=tile),
        (8, 32, 64), JobContext(updates.append), "cpu", minimum=8)
    np.testing.assert_allclose(out[0], volume * 2, rtol=1e-6)
    assert tried[0] == (8, 32, 64) and tried[-1][-1] == 16
    assert any("out of the CPU's memory: retrying with" in u.message for u in updates)


def test_out_of_memory_even_for_the_smallest_window_says_what_to_do():
    def hopeless(tile):
        raise MemoryError("Unable to allocate 2.00 GiB")

    with pytest.raises(DeviceMemoryError, match="on the CPU: close other programs"):
        with_smaller_tiles(hopeless, (64, 64, 64), None, "cpu", minimum=32)


def test_windows_that_would_not_fit_start_smaller(monkeypatch):
    """On the CPU the estimate comes first (running out of memory there can kill the
    process instead of raising): windows of a 3 x 4000 x 4000 volume that would need far
    more than the memory free start smaller, and the change is reported."""
    monkeypatch.setattr(device, "available_memory", lambda: 2**30)
    ran, updates = [], []
    with_smaller_tiles(ran.append, (4096, 4096, 4096), JobContext(updates.append), "cpu",
                       shape=(3, 4000, 4000), voxel_bytes=600.0, multiple=16)
    tile = ran[0]
    assert tile[0] == 3  # clipped to the volume first
    assert window_bytes(tile, 600.0, 16) <= 2**30
    assert "would need about" in updates[0].message and "using" in updates[0].message
    # on a GPU, out of memory raises cleanly: no estimate, the fall-back handles it
    ran.clear()
    with_smaller_tiles(ran.append, (64, 128, 128), None, "cuda:0", shape=(64, 128, 128),
                       voxel_bytes=1e9)
    assert ran == [(64, 128, 128)]


def test_windows_that_fit_are_left_as_they_are(monkeypatch):
    monkeypatch.setattr(device, "available_memory", lambda: 64 * 2**30)
    ran = []
    with_smaller_tiles(ran.append, (64, 128, 128), None, "cpu", shape=(48, 128, 128),
                       voxel_bytes=600.0, multiple=16)
    assert ran == [(48, 128, 128)]  # clipped to the volume, as the grid does anyway


def test_the_command_line_reports_running_out_of_memory_in_one_line(monkeypatch, capsys,
                                                                    tmp_path):
    import napari_lsmfm.synth as synth
    from napari_lsmfm import cli

    def starved(*args, **kwargs):
        np.empty(1 << 45, np.uint8)

    monkeypatch.setattr(synth, "write_samples", starved)
    assert cli.main(["sample", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lsmfm sample: error: out of memory") and "--tile" in err
    assert err.count("\n") == 0 and not (tmp_path / "out").exists()
