"""Limits of the tasks, said before any work: class values kept whatever their size (or
refused), windows too small, PSFs wider than the volume or than memory, constant
images, thin volumes (issue 19, items 3, 4, 6 and 7)."""

import numpy as np
import pytest
import torch

from napari_lsmfm.engine.jobs import JobContext
from napari_lsmfm.model import Foundation, FoundationSpec
from napari_lsmfm.tasks.deblur import DeblurConfig, deblur
from napari_lsmfm.tasks.deblur import rl as rl_module
from napari_lsmfm.tasks.segment import SegmentConfig, Segmenter, SparseLabels
from napari_lsmfm.tasks.segment.labels import MAX_CLASS_VALUE, class_dtype
from napari_lsmfm.tasks.segment.result import ResultWriter

SHAPE = (12, 32, 32)


@pytest.fixture(scope="module")
def foundation() -> Foundation:
    torch.manual_seed(0)
    return Foundation(FoundationSpec("unet", embed_dim=8, channels=(8, 16), strides=(2,),
                                     num_res_units=0))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, SHAPE).astype(np.float32)
    img[:, 8:20, 8:20] += 200  # a bright block: the class
    return img


def _brushes(value: int, dtype=np.uint32) -> np.ndarray:
    b = np.zeros(SHAPE, dtype)
    b[6, 10:18, 10:18] = value
    b[6, :4, :] = 1
    return b


# --------------------------------------------------------------------- class values


def test_class_dtype_is_the_smallest_that_keeps_every_value():
    assert class_dtype((0, 2)) == np.uint8
    assert class_dtype((0, 255)) == np.uint8
    assert class_dtype((0, 256)) == np.uint16
    assert class_dtype((0, 70000)) == np.uint32
    with pytest.raises(ValueError, match="renumber"):
        class_dtype((0, MAX_CLASS_VALUE + 1))


def test_a_large_brush_value_is_kept_in_the_class_map(foundation, image):
    """Brushes with value 70000 (issue 19: the uint16 file held 4464, predict gave uint8
    112): the classes, the class map and its dtype keep 70000."""
    seg = Segmenter(foundation, steps=3)
    fit = seg.fit(image, _brushes(70000))
    assert fit["classes"] == [70000] and seg.class_dtype == np.uint32
    result = seg.predict(image, probabilities=False, uncertainty=False)
    assert result.classes.dtype == np.uint32
    assert set(np.unique(result.classes)) <= {0, 70000} and (result.classes == 70000).any()


def test_a_too_narrow_class_map_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"uint16 but the class values go up to 70000.*uint32"):
        ResultWriter(SHAPE, (0, 70000), {"classes": np.zeros(SHAPE, np.uint16)}, False, False)


def test_a_brush_value_no_class_map_can_keep_is_refused_before_training():
    big = _brushes(0, np.int64)
    big[6, 10:18, 10:18] = MAX_CLASS_VALUE + 5
    with pytest.raises(ValueError, match=r"larger than 4294967295.*renumber"):
        SparseLabels.from_array(big, SHAPE)


# -------------------------------------------------------------------------- windows


@pytest.mark.parametrize("config", [SegmentConfig, DeblurConfig])
def test_a_window_of_a_few_voxels_is_refused(config):
    """``--tile 1,1,1`` was accepted (131,072 windows on 32 x 64 x 64 voxels)."""
    with pytest.raises(ValueError, match=r"tile 1,1,1 is too small: .*at least 8 voxels"):
        config(tile=(1, 1, 1))
    cfg = config()
    with pytest.raises(ValueError, match="too small"):
        cfg.tile = (4, 64, 64)
    assert min(cfg.tile) >= 8  # the refused assignment left the old value


def test_the_cli_refuses_a_tiny_tile_in_one_line(tmp_path, capsys, image):
    from napari_lsmfm.cli import main
    from napari_lsmfm.io import write_volume

    write_volume(tmp_path / "img.tif", image.astype(np.uint16))
    write_volume(tmp_path / "b.tif", _brushes(2, np.uint8), kind="labels")
    code = main(["segment", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "b.tif"),
                 "--out", str(tmp_path / "out.tif"), "--tile", "1,1,1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "too small" in err and "Traceback" not in err
    assert not (tmp_path / "out.tif").exists()


def test_a_thin_volume_is_padded_to_the_networks_multiple_only(foundation):
    """A 3-plane volume runs windows of 3 planes, padded to the network's size multiple
    (here 2), not to the default window's 64 planes."""
    seen = []
    hook = foundation.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        rng = np.random.default_rng(1)
        thin = rng.random((3, 40, 40)).astype(np.float32)
        brushes = np.zeros(thin.shape, np.uint8)
        brushes[1, :5] = 1
        brushes[1, -5:] = 2
        seg = Segmenter(foundation, steps=2)
        seg.fit(thin, brushes)
        seg.predict(thin, probabilities=False, uncertainty=False)
    finally:
        hook.remove()
    assert seen and {tuple(s[2:]) for s in seen} == {(4, 40, 40)}


# ---------------------------------------------------------------------------- PSFs


def test_a_psf_wider_than_the_volume_is_refused_before_work():
    """``--psf-sigma 1000,1000,1000`` tried to allocate 3.73 TiB."""
    image = np.random.default_rng(0).integers(100, 200, (16, 32, 32)).astype(np.uint16)
    with pytest.raises(ValueError, match=r"PSF sigma 1000 voxels along z is larger than the "
                                         r"volume \(16 voxels"):
        deblur(image, method="rl", psf_sigma=(1000.0, 1000.0, 1000.0))


def test_a_psf_larger_than_the_window_is_cut_to_what_a_window_can_use():
    image = np.random.default_rng(0).integers(100, 200, (6, 24, 24)).astype(np.uint16)
    # sigma 4 along z: a 35-plane kernel on a 6-plane volume; cut to 2 x 6 + 1 = 13 planes
    out = deblur(image, method="rl", psf_sigma=(4.0, 1.0, 1.0), iterations=2)
    assert out.shape == image.shape and out.dtype == image.dtype
    cut = rl_module.crop_psf(rl_module.gaussian_psf((4.0, 1.0, 1.0)), (6, 24, 24))
    assert cut.shape == (13, 9, 9) and abs(float(cut.sum()) - 1.0) < 1e-5
    small = rl_module.gaussian_psf((1.0, 1.0, 1.0))
    assert rl_module.crop_psf(small, (6, 24, 24)) is small  # a PSF that fits: unchanged


def test_richardson_lucy_beyond_the_free_memory_is_refused(monkeypatch):
    import napari_lsmfm.engine.device as device

    monkeypatch.setattr(device, "available_memory", lambda: 2**20)
    image = np.random.default_rng(0).integers(100, 200, (16, 32, 32)).astype(np.uint16)
    with pytest.raises(ValueError, match=r"needs about .* more than the 1 MiB of memory free"):
        deblur(image, method="rl", psf_sigma=(2.0, 1.0, 1.0))


# -------------------------------------------------------------------- constant image


def test_a_constant_image_segments_with_a_warning(foundation):
    flat = np.full(SHAPE, 7.0, np.float32)
    updates = []
    seg = Segmenter(foundation, steps=2)
    fit = seg.fit(flat, _brushes(2, np.uint8), JobContext(updates.append))
    assert "constant (7 everywhere)" in fit["warnings"][0]
    result = seg.predict(flat, JobContext(updates.append), probabilities=False,
                         uncertainty=False)
    assert "constant" in result.stats["warnings"][0]
    assert len(np.unique(result.classes)) == 1
    assert any(u.message.startswith("warning: the image is constant") for u in updates)
    plain = Segmenter(foundation, steps=2)
    normal = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    assert "warnings" not in plain.fit(normal, _brushes(2, np.uint8))


# ------------------------------------------------------------------------- messages


def test_input_messages_fit_the_viewer_python_and_the_command_line():
    from napari_lsmfm.io.check import check_volume

    with pytest.raises(ValueError) as err:
        check_volume(np.zeros((2, 3, 8, 8), np.uint16))
    message = str(err.value)
    assert "split the channels" in message and "in Python: image[0]" in message
    assert "command line" in message
    assert check_volume(np.zeros((3, 400, 400), np.uint16)) == (3, 400, 400)  # a thin stack
    assert check_volume(np.zeros((1, 1, 1), np.uint16)) == (1, 1, 1)  # not "2D"
    with pytest.raises(ValueError, match="RGB"):
        check_volume(np.zeros((400, 400, 3), np.uint8))
