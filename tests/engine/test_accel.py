"""Inference accelerators: channels-last, precision, the engine's background threads, and
the quick mode's fused paths give the results of the plain ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage as ndi

from napari_lsmfm.engine import accel
from napari_lsmfm.engine.tiled import predict_tiled
from napari_lsmfm.model import Foundation, FoundationSpec
from napari_lsmfm.tasks.filters import filter_bank
from napari_lsmfm.tasks.heads import VoxelHead
from napari_lsmfm.tasks.segment import SegmentConfig
from napari_lsmfm.tasks.segment.features import QuickFeatures
from napari_lsmfm.tasks.segment.quick import (
    folded_layers,
    head_probabilities,
    head_probabilities_flat,
)


@pytest.fixture()
def settings():
    """Restore the process-wide settings after a test changes them."""
    old = accel.current_settings()
    yield
    accel.configure(**dataclasses.asdict(old))


def small_foundation() -> Foundation:
    torch.manual_seed(0)
    spec = FoundationSpec("unet", embed_dim=8, channels=(8, 16, 32), strides=(2, 2),
                          num_res_units=1)
    return Foundation(spec)


def _wide_weight(net: torch.nn.Module) -> torch.Tensor:
    return next(p for p in net.parameters() if p.ndim == 5 and p.shape[1] > 1)


def test_channels_last_keeps_keys_and_values(settings):
    f = small_foundation()
    x = torch.rand(1, 1, 16, 24, 32)
    accel.configure(channels_last=False)
    keys = list(f.state_dict())
    with torch.inference_mode():
        plain = f(x)
        assert _wide_weight(f.backbone).is_contiguous()
        accel.configure(channels_last=True)
        fast = f(x)
    assert _wide_weight(f.backbone).is_contiguous(memory_format=torch.channels_last_3d)
    assert list(f.state_dict()) == keys  # nothing registered, nothing renamed
    np.testing.assert_allclose(fast.numpy(), plain.numpy(), atol=1e-5)
    # training (autograd on) runs the backbone as it is and matches too
    trained = f(x).detach()
    np.testing.assert_allclose(trained.numpy(), plain.numpy(), atol=1e-5)
    accel.configure(channels_last=False)
    with torch.inference_mode():
        f(x)
    assert _wide_weight(f.backbone).is_contiguous()


def test_channels_last_default_is_the_cpu_only(settings):
    accel.configure(channels_last=None)
    assert accel.use_channels_last("cpu")
    assert not accel.use_channels_last("cuda")
    assert accel.use_channels_last("cuda", True) and not accel.use_channels_last("cpu", False)


def test_precision_choices(settings):
    assert accel.autocast_dtype("cpu") is None  # auto: float32 on the CPU
    assert accel.autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert accel.autocast_dtype("cpu", "fp32") is None
    with pytest.raises(ValueError, match="fp16 autocast is for GPUs"):
        accel.autocast_dtype("cpu", "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        accel.autocast_dtype("cpu", "int8")
    with pytest.raises(ValueError, match="unknown accelerator settings"):
        accel.configure(fast=True)
    old = accel.configure(precision="bf16")
    assert old.precision == "auto" and accel.current_settings().precision == "bf16"
    f = small_foundation()
    with torch.inference_mode():
        low = f(torch.rand(1, 1, 8, 16, 16))
    assert low.dtype == torch.float32  # features are float32 whatever ran inside
    assert accel.suggest_batch_size("cpu", 1e6) == 1


def test_for_inference_runs_the_prepared_network(settings):
    accel.configure(channels_last=True)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU())
    x = torch.rand(1, 2, 8, 8, 8)
    ref = net(x).detach()
    with accel.for_inference(net, "cpu") as run:
        y = run(accel.to_memory_format(x, True))
        assert torch.is_inference_mode_enabled()
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), atol=1e-6)


def local_mean(windows: np.ndarray) -> np.ndarray:
    out = ndi.uniform_filter(windows[:, 0], size=(1, 5, 5, 5), mode="nearest")
    return np.concatenate([out[:, None], -out[:, None]], 1)


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_background_threads_change_nothing(blend):
    vol = ndi.gaussian_filter(np.random.default_rng(1).random((30, 50, 70)), 2)
    vol = vol.astype(np.float32)
    kw = {"out_channels": 2, "tile": (16, 24, 24), "blend": blend, "max_block_bytes": 40_000}
    plain = predict_tiled(local_mean, vol, overlap_io=False, **kw)
    threaded = predict_tiled(local_mean, vol, overlap_io=True, **kw)
    assert np.array_equal(plain, threaded)  # bit for bit: the same sums in the same order
    store = zarr.zeros((2, *vol.shape), chunks=(2, 8, 16, 16), dtype="float32")
    predict_tiled(local_mean, vol, out=store, **kw)
    np.testing.assert_array_equal(store[:], plain)


def test_a_failing_window_function_stops_the_threads():
    calls = []

    def failing(windows):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("window 3 broke")
        return windows.copy()

    with pytest.raises(RuntimeError, match="window 3 broke"):
        predict_tiled(failing, np.zeros((20, 40, 40), np.float32), out_channels=1,
                      tile=(10, 16, 16), max_block_bytes=10_000)


def test_folded_head_equals_the_head():
    torch.manual_seed(0)
    head = VoxelHead(7, 3, hidden=16, dropout=0.1)
    samples = torch.randn(500, 7) * 3 + 2
    head.set_standardization(samples)
    head.eval()
    feats = (np.random.default_rng(0).standard_normal((7, 6, 10, 12)) * 3 + 2).astype(np.float32)
    fused = head_probabilities(head, feats, torch.device("cpu"))
    flat = head_probabilities_flat(head, feats.reshape(7, -1).T, torch.device("cpu"))
    np.testing.assert_allclose(fused, flat.T.reshape(3, 6, 10, 12), atol=1e-5)
    np.testing.assert_allclose(fused.sum(0), 1.0, atol=1e-5)
    # float16 cached features take the same path
    half = head_probabilities(head, feats.astype(np.float16), torch.device("cpu"))
    np.testing.assert_allclose(half, fused, atol=1e-2)
    assert folded_layers(head.train(), torch.device("cpu")) is None  # dropout active: as is
    odd = VoxelHead(7, 3)
    odd.mlp[1] = torch.nn.Tanh()
    assert folded_layers(odd.eval(), torch.device("cpu")) is None


def test_quick_window_features_equal_the_sequential_ones():
    f = small_foundation()
    qf = QuickFeatures(f, SegmentConfig(voxel_size=(2.0, 1.0, 1.0)), sigmas=(1.0, 2.0))
    windows = (np.random.default_rng(2).random((2, 1, 16, 24, 24)) * 500).astype(np.float32)
    got = qf.window_fn((0.0, 500.0))(windows)
    x = torch.from_numpy(np.clip(windows / 500.0, 0, 1).astype(np.float32))
    with torch.inference_mode():
        ref = torch.cat([*qf.foundation_features(x),
                         filter_bank(x, qf.sigmas, qf.spacing)], 1)
    assert got.shape == (2, qf.channels, 16, 24, 24)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
