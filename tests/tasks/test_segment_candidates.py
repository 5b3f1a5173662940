"""Quick mode's candidate choice and object scale (issue 14): which model a quick fit
uses (validated on held-out strokes), that the choice is deterministic, saved and
reported, and that the filter scales and the foundation's scale follow the objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from test_segment import brush, dice, run_cli, small_foundation

from napari_lsmfm.model import save_foundation
from napari_lsmfm.synth import make_volume
from napari_lsmfm.tasks import Segmenter
from napari_lsmfm.tasks.heads import ForestHead, VoxelHead
from napari_lsmfm.tasks.segment.candidates import stroke_folds, stroke_groups
from napari_lsmfm.tasks.segment.features import QuickFeatures
from napari_lsmfm.tasks.segment.scale import sigmas_for, stroke_diameter, zoom_for

VOXEL = (2.0, 1.0, 1.0)
SHAPE = (16, 48, 48)


def random_foundation():
    """A foundation whose features are deliberately meaningless: every weight redrawn
    large, so its outputs are noise-like functions of the window."""
    foundation = small_foundation(seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in foundation.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3.0)
    return foundation


@pytest.fixture(scope="module")
def easy():
    vol = make_volume("nuclei", SHAPE, VOXEL, seed=11, photons=3000.0, stripes=0.0)
    return vol, brush(vol.labels, slices=(5, 10))


def test_random_foundation_loses_to_the_filters(easy):
    vol, b = easy
    seg = Segmenter(random_foundation(), voxel_size=VOXEL, steps=60, forest_trees=20)
    fit = seg.fit(vol.image, b)
    assert fit["candidate"] in ("filters", "forest")
    scores = fit["validation"]
    assert set(scores) == {"foundation", "filters", "forest"}
    assert scores[fit["candidate"]] >= scores["foundation"]
    assert "balanced accuracy" in fit["validation_metric"] and "2 folds" in fit["validation_metric"]
    # a filters-only model never runs the foundation to predict
    calls = []
    hook = seg.foundation.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        seg.clear_cache()
        result = seg.predict(vol.image)
    finally:
        hook.remove()
    assert calls == []
    assert dice(result.classes, vol.labels) > 0.65


def test_choice_is_deterministic_and_can_be_forced(easy):
    vol, b = easy
    foundation = small_foundation()
    a = Segmenter(foundation, voxel_size=VOXEL, steps=60).fit(vol.image, b)
    again = Segmenter(foundation, voxel_size=VOXEL, steps=60).fit(vol.image, b)
    assert a["candidate"] == again["candidate"] and a["validation"] == again["validation"]
    for name, kind in (("forest", ForestHead), ("filters", VoxelHead),
                       ("foundation", VoxelHead)):
        seg = Segmenter(foundation, voxel_size=VOXEL, steps=60, candidate=name)
        fit = seg.fit(vol.image, b)
        assert fit["candidate"] == name and fit["validation"] == {}
        assert isinstance(seg.head, kind) and seg.candidate == name
        reads = seg.quick_features.foundation_channels
        assert (reads > 0) == (name == "foundation")


def test_forest_and_filters_models_save_and_load(easy, tmp_path):
    vol, b = easy
    foundation = small_foundation()
    for name in ("forest", "filters"):
        seg = Segmenter(foundation, voxel_size=VOXEL, steps=60, candidate=name)
        seg.fit(vol.image, b)
        folder = seg.save(tmp_path / name)
        config = json.loads((folder / "config.json").read_text())
        assert config["candidate"] == name and config["features"]["levels"] == []
        loaded = Segmenter.load(folder, foundation)
        assert loaded.candidate == name
        one, two = seg.predict(vol.image), loaded.predict(vol.image)
        np.testing.assert_array_equal(one.classes, two.classes)
        np.testing.assert_allclose(one.probabilities, two.probabilities, atol=1e-5)


def test_folds_hold_out_whole_slices_or_whole_strokes(easy):
    vol, b = easy
    coords = np.argwhere(b > 0)
    targets = b[tuple(coords.T)].astype(np.int64) - 1
    folds = stroke_folds(coords, targets)
    assert len(folds) == 2
    for held in folds:  # one brushed plane each, every class left to train on
        assert len(np.unique(coords[held, 0])) == 1
        assert set(np.unique(targets[~held])) == {0, 1}
    # one brushed plane: whole connected strokes go to one side or the other
    one = b.copy()
    one[10] = 0
    coords = np.argwhere(one > 0)
    targets = one[tuple(coords.T)].astype(np.int64) - 1
    group = stroke_groups(coords, targets, seed=0)
    fg = np.zeros(one.shape, bool)
    fg[tuple(coords[targets == 1].T)] = True
    comps = ndi.label(fg, structure=np.ones((3, 3, 3)))[0][tuple(coords[targets == 1].T)]
    for c in np.unique(comps):
        assert len(np.unique(group[targets == 1][comps == c])) == 1
    assert set(np.unique(group[targets == 1])) == {0, 1}
    assert len(stroke_folds(coords, targets)) == 2


def test_object_scale_from_strokes_and_from_the_user():
    # filled discs of 15 voxels across, painted in one plane each
    b = np.zeros((3, 60, 60), np.uint8)
    yy, xx = np.mgrid[:60, :60]
    for cy, cx in ((15, 15), (15, 44), (44, 30)):
        b[1][(yy - cy) ** 2 + (xx - cx) ** 2 <= 7**2] = 2
    coords = np.argwhere(b > 0)
    width = (stroke_diameter(coords, b[tuple(coords.T)], b.shape) - 2.0) * np.pi / 4
    assert width == pytest.approx(15.0, rel=0.15)  # 13.1: a digital disc's corners
    assert sigmas_for(6.0) == (1.0, 2.0, 4.0) and sigmas_for(30.0) == (1.0, 2.0, 4.0, 8.0)
    assert zoom_for(8.0) == 1.0 and zoom_for(32.0) == pytest.approx(0.25)
    assert zoom_for(2.0) == 1.0  # small objects: never enlarged


def test_large_objects_get_large_filters_and_a_zoomed_foundation():
    vol = make_volume("nuclei", (16, 96, 96), (1.0, 0.33, 0.33), seed=4, density=2.0)
    b = brush(vol.labels, slices=(5, 10))
    seg = Segmenter(small_foundation(), voxel_size=(1.0, 0.33, 0.33), steps=40,
                    candidate="foundation")
    shapes = []
    hook = seg.foundation.backbone.register_forward_hook(
        lambda m, i, o: shapes.append(tuple(i[0].shape[2:])))
    try:
        fit = seg.fit(vol.image, b)
    finally:
        hook.remove()
    assert fit["diameter_source"] == "strokes" and fit["object_diameter_voxels"] > 16
    assert max(fit["sigmas"]) >= 8 and fit["scale_factor"] < 1
    assert max(s[-1] for s in shapes) < 96  # the foundation saw the windows shrunk
    # the user's diameter wins over the strokes (micrometres, at the finest voxel)
    fit = Segmenter(small_foundation(), voxel_size=(1.0, 0.33, 0.33), steps=20,
                    object_diameter=3.3, candidate="filters").fit(vol.image, b)
    assert fit["diameter_source"] == "config"
    assert fit["object_diameter_voxels"] == pytest.approx(10.0)
    assert fit["sigmas"] == [1.0, 2.0, 4.0] and fit["scale_factor"] == 1.0


def test_zoomed_features_keep_the_window_shape():
    foundation = small_foundation()
    seg = Segmenter(foundation)
    qf = QuickFeatures(foundation, seg.config, zoom=0.5)
    x = np.random.default_rng(0).random((1, 1, 16, 32, 32)).astype(np.float32) * 100
    out = qf.window_fn((0.0, 100.0))(x)
    assert tuple(out.shape) == (1, qf.channels, 16, 32, 32)
    assert torch.isfinite(out).all()


def test_cli_says_which_candidate_won(tmp_path, capsys, easy):
    from napari_lsmfm.io import write_volume

    vol, b = easy
    write_volume(tmp_path / "image.tif", vol.image, voxel_size=VOXEL)
    write_volume(tmp_path / "brushes.tif", b, kind="labels")
    save_foundation(small_foundation(), tmp_path / "weights")
    base = [str(tmp_path / "image.tif"), "--labels", str(tmp_path / "brushes.tif"),
            "--weights", str(tmp_path / "weights"), "--steps", "60", "--quiet"]
    assert run_cli(*base, "--out", str(tmp_path / "a.tif")) == 0
    fit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fit"]
    assert fit["candidate"] in fit["validation"]
    assert fit["validation_score"] == fit["validation"][fit["candidate"]]
    assert run_cli(*base, "--candidate", "forest", "--diameter", "12",
                   "--out", str(tmp_path / "b.tif")) == 0
    fit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fit"]
    assert fit["candidate"] == "forest" and fit["object_diameter_um"] == pytest.approx(12.0)
    with pytest.raises(ValueError, match="--diameter must be"):
        run_cli(*base, "--diameter", "-1", "--out", str(tmp_path / "c.tif"))
