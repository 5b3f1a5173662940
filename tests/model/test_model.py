"""The Foundation object: shapes, padding, gradients, embeddings, normalisation, devices."""

import math

import dask.array as da
import numpy as np
import pytest
import torch

from _checkpoints import WORDS, small_spec
from napari_lsmfm.model import (
    Foundation,
    FoundationSpec,
    TextTower,
    build_lsmfm_text_tower,
    build_vocab,
    normalize_intensity,
    percentile_range,
    resolve_device,
)

SHAPE = (1, 1, 40, 50, 70)  # no axis a multiple of 32


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return Foundation(small_spec("swinunetr"))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return Foundation(small_spec("unet"))


@pytest.fixture(scope="module")
def unet_text():
    torch.manual_seed(0)
    return Foundation(small_spec("unet", text="lsmfm", proj_dim=8))


@pytest.fixture(scope="module")
def swin_levels(swin):
    with torch.no_grad():
        return swin.features(torch.rand(SHAPE))


def _expected_shapes(fm, shape):
    return [
        (shape[0], c, *(math.ceil(s / stride) for s in shape[2:]))
        for c, stride in zip(fm.feature_channels, fm.feature_strides, strict=True)
    ]


def test_swinunetr_features_for_sizes_not_multiples_of_32(swin, swin_levels):
    assert swin.feature_channels == [16, 12, 24, 48, 96, 192]
    assert swin.feature_strides == [1, 2, 4, 8, 16, 32]
    assert [tuple(t.shape) for t in swin_levels] == _expected_shapes(swin, SHAPE)
    assert swin_levels[0].shape == (1, 16, 40, 50, 70)  # the dense output at input size
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in swin_levels)


def test_unet_forward_and_features_for_sizes_not_multiples_of_32(unet):
    x = torch.rand(SHAPE)
    with torch.no_grad():
        dense = unet(x)
        levels = unet.features(x)
    assert dense.shape == (1, 8, 40, 50, 70)
    assert unet.feature_channels == [8, 4, 8, 8, 16, 16]
    assert unet.feature_strides == [1, 2, 4, 8, 8, 8]
    assert [tuple(t.shape) for t in levels] == _expected_shapes(unet, SHAPE)
    torch.testing.assert_close(levels[0], dense)


def test_unpadded_input_matches_the_plain_backbone(unet):
    x = torch.rand(1, 1, 16, 24, 32)  # multiples of the UNet's total stride 8: no padding
    with torch.no_grad():
        torch.testing.assert_close(unet(x), unet.backbone(x))


@pytest.mark.parametrize("arch", ["swinunetr", "unet"])
def test_tiny_and_batched_inputs_pad_and_crop(arch, swin, unet):
    fm = swin if arch == "swinunetr" else unet
    x = torch.rand(1 if arch == "swinunetr" else 3, 1, 5, 6, 7)  # too short to reflect: replicate
    with torch.no_grad():
        levels = fm.features(x)
    assert [tuple(t.shape) for t in levels] == _expected_shapes(fm, x.shape)


@pytest.mark.parametrize("arch", ["swinunetr", "unet"])
def test_gradients_flow_for_finetuning(arch, swin, unet):
    fm = swin if arch == "swinunetr" else unet
    x = torch.rand(1, 1, 9, 10, 11, requires_grad=True)
    fm.zero_grad()
    fm(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in fm.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    fm.zero_grad(set_to_none=True)


def test_input_checks(unet):
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        unet(torch.rand(8, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        unet(torch.rand(1, 2, 8, 8, 8))
    with torch.no_grad():
        out = unet(np.ones((1, 1, 8, 8, 8), dtype=np.uint16))  # numpy and integers are fine
    assert out.shape == (1, 8, 8, 8, 8) and out.dtype == torch.float32


def test_embed_image_is_normalised_and_uses_the_projection(unet_text, unet):
    x = torch.rand(2, 1, 9, 10, 11)
    z = unet_text.embed_image(x)
    assert z.shape == (2, unet_text.spec.proj_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    assert not z.requires_grad
    with torch.no_grad():
        # as in lsm_fm pretraining: per-voxel L2 norm, then image_proj (pool, MLP, LayerNorm)
        feats = torch.nn.functional.normalize(unet_text(x), dim=1)
        expected = torch.nn.functional.normalize(unet_text.image_proj(feats), dim=-1)
    torch.testing.assert_close(z, expected)
    image_only = unet.embed_image(x)
    assert image_only.shape == (2, unet.spec.embed_dim)  # no projection: pooled features
    torch.testing.assert_close(image_only.norm(dim=-1), torch.ones(2))
    assert unet_text.embed_image(x[:1], grad=True).requires_grad


def test_embed_text_with_our_own_tower(unet_text, unet):
    prompts = ["nuclei stained with DAPI", "blood vessels", "zebrafish unknown words"]
    z = unet_text.embed_text(prompts)
    assert z.shape == (3, unet_text.spec.proj_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    alone = unet_text.embed_text("blood vessels")  # a batch does not change an embedding
    torch.testing.assert_close(alone[0], z[1], atol=1e-5, rtol=1e-5)
    assert unet_text.embed_text(["nuclei"], grad=True).requires_grad
    with pytest.raises(RuntimeError, match="image-only"):
        unet.embed_text(["nuclei"])


def test_lsmfm_text_tower_round_trips_through_its_config():
    vocab = build_vocab(["Nuclei stained with DAPI", "nuclei in the cortex"], tokenizer="trigram")
    assert vocab[:2] == ["[PAD]", "[UNK]"] and "#nu" in vocab
    torch.manual_seed(0)
    tower = build_lsmfm_text_tower(vocab, 12, width=16, layers=0, heads=2, tokenizer="trigram")
    copy = TextTower.from_config(tower.config())
    copy.load_state_dict(tower.state_dict())
    tower.eval(), copy.eval()
    with torch.no_grad():
        torch.testing.assert_close(tower(["nuclei"]), copy(["nuclei"]))
        assert tower(["", "nuclei in the cortex"]).shape == (2, 12)
    with pytest.raises(ValueError, match="prompt"):
        tower([])
    with pytest.raises(ValueError, match="tokenizer"):
        build_lsmfm_text_tower(WORDS, 8, tokenizer="bytes")


# --- normalisation ----------------------------------------------------------------------------


def test_normalize_scales_percentiles_to_unit_range(unet):
    rng = np.random.default_rng(0)
    volume = rng.gamma(2.0, 100.0, size=(20, 30, 40)).astype(np.uint16)
    out = unet.normalize(volume)
    lo, hi = np.percentile(volume, [1, 99])
    assert out.dtype == np.float32 and out.shape == volume.shape
    assert out.min() == 0.0 and out.max() == 1.0
    expected = np.clip((volume.astype(np.float32) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert abs((out == 0).mean() - 0.01) < 0.01 and abs((out == 1).mean() - 0.01) < 0.01


def test_normalize_dask_equals_numpy_and_tiles_share_one_range(unet):
    volume = np.random.default_rng(1).normal(100, 20, size=(16, 32, 32)).astype(np.float32)
    lazy = da.from_array(volume, chunks=(8, 16, 16))
    np.testing.assert_allclose(unet.normalize(lazy), unet.normalize(volume))
    rng = unet.intensity_range(lazy)
    tile = unet.normalize(lazy[:8, :16, :16], intensity_range=rng)
    np.testing.assert_allclose(tile, unet.normalize(volume)[:8, :16, :16])


def test_percentiles_of_large_volumes_come_from_a_subsample():
    volume = np.random.default_rng(2).uniform(0, 1000, size=(64, 64, 64))
    lo, hi = percentile_range(volume, max_samples=5000)
    assert abs(lo - 10) < 15 and abs(hi - 990) < 15
    lazy = da.from_array(volume, chunks=32)
    assert percentile_range(lazy, max_samples=5000) == pytest.approx((lo, hi))


def test_normalize_constant_sparse_nan_and_empty():
    constant = normalize_intensity(np.full((4, 5, 6), 7.0))
    assert constant.dtype == np.float32 and not constant.any() and np.isfinite(constant).all()
    sparse = np.zeros((10, 10, 10))
    sparse[5, 5, 5] = 50.0  # 1st and 99th percentiles coincide: fall back to min-max
    out = normalize_intensity(sparse)
    assert out.max() == 1.0 and out.sum() == 1.0
    bad = np.ones((4, 4, 4))
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        normalize_intensity(bad)
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        normalize_intensity(bad)
    with pytest.raises(ValueError, match="empty"):
        normalize_intensity(np.zeros((0, 4, 4)))


# --- devices, spec, info ---------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    assert resolve_device("auto").type in ({expected} if expected else {"cpu", "mps"})
    with pytest.raises(ValueError, match="not understood"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_to_device_moves_once_and_amp_only_on_cuda(unet):
    assert not unet.training and unet.device == torch.device("cpu")
    before = [p.data_ptr() for p in unet.parameters()]
    unet.to_device("cpu")
    assert [p.data_ptr() for p in unet.parameters()] == before  # nothing copied
    assert unet.amp is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_precision():
    fm = Foundation(small_spec("swinunetr")).to_device("cuda")
    assert fm.amp and fm.device.type == "cuda"
    with torch.no_grad():
        out = fm(torch.rand(1, 1, 40, 50, 70))
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert out.shape == (1, 16, 40, 50, 70)


def test_spec_round_trip_and_validation():
    spec = small_spec("unet", text="lsmfm", proj_dim=8)
    assert FoundationSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="multiple of 12"):
        FoundationSpec("swinunetr", 16, feature_size=20)
    with pytest.raises(ValueError, match="one stride fewer"):
        FoundationSpec("unet", 8, channels=(4, 8), strides=(2, 2))
    with pytest.raises(ValueError, match="architecture"):
        FoundationSpec("vit", 8)
    with pytest.raises(ValueError, match="projects to"):
        FoundationSpec.from_dict({**spec.to_dict(), "proj_dim": 4})


def test_info_describes_the_model(swin, unet, unet_text):
    info = swin.info()
    assert info["architecture"] == "swinunetr" and info["feature_size"] == 12
    assert info["variant"] == "image_only" and info["text_tower"] is False
    assert "image-only" in info["text_unavailable_reason"]
    assert info["parameters"] == sum(p.numel() for p in swin.parameters())
    assert info["source"] == "memory" and info["device"] == "cpu"
    info = unet_text.info()
    assert info["channels"] == [4, 8, 8, 16, 16] and info["strides"] == [2, 2, 2, 1]
    assert info["variant"] == "image_text" and info["text_tower"] is True
    assert info["text_tower_kind"] == "lsmfm" and info["proj_dim"] == 8
    parts = [unet_text.backbone, unet_text.image_proj, unet_text.text_tower]
    assert info["parameters"] == sum(p.numel() for m in parts for p in m.parameters())


def test_unet_without_residual_units_has_every_encoder_level():
    # MONAI's Convolution is itself a Sequential: with num_res_units=0 (the embedded
    # default's layout) the bottom block must not be mistaken for another level.
    from napari_lsmfm.model import Foundation, FoundationSpec

    spec = FoundationSpec(architecture="unet", embed_dim=4, channels=(4, 8, 16),
                          strides=(2, 2), num_res_units=0)
    fm = Foundation(spec)
    with torch.no_grad():
        levels = fm.features(torch.rand(1, 1, 8, 16, 16))
    assert [t.shape[1] for t in levels] == fm.feature_channels == [4, 4, 8, 16]
