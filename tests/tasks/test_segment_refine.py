"""Quick mode's prior refinement (:mod:`napari_lsmfm.tasks.segment.refine`): the head's
probabilities moved from the strokes' class mix to the volume's, so objects brushed as
interiors with far background lines are not predicted too fat."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from test_segment import dice, small_foundation

from napari_lsmfm.tasks import Segmenter
from napari_lsmfm.tasks.segment import SegmentConfig
from napari_lsmfm.tasks.segment.refine import (
    apply_offsets,
    estimate_prior,
    fit_prior_shift,
    stroke_prior,
    volume_sample,
)

SHAPE = (24, 48, 48)


def blurred_balls(seed: int = 0):
    """Six balls of radius 5 blurred (sigma 1.5) under Poisson noise, and strokes as a user
    paints them: interiors eroded by a voxel as 2, background lines kept 3 voxels off the
    objects as 1, on two z planes."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(SHAPE)
    truth = np.zeros(SHAPE, bool)
    for c in [(8, 12, 12), (8, 34, 30), (15, 14, 34), (16, 34, 12), (12, 24, 22), (17, 36, 36)]:
        truth |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 25
    clean = 20.0 + 200.0 * ndi.gaussian_filter(truth.astype(np.float32), 1.5)
    image = rng.poisson(clean).astype(np.float32)
    strokes = np.zeros(SHAPE, np.uint8)
    for z in (8, 16):
        fg = truth[z]
        far = ~ndi.binary_dilation(fg, iterations=3)
        lines = np.zeros(fg.shape, bool)
        lines[::6, :] = True
        lines[:, ::9] = True
        strokes[z][lines & far] = 1
        strokes[z][ndi.binary_erosion(fg)] = 2
    return image, truth, strokes


@pytest.fixture(scope="module")
def balls():
    return blurred_balls()


def test_estimate_prior_recovers_the_volume_mix():
    # calibrated posteriors of a head trained with a 50 / 50 mix, on a volume with 10 %
    # foreground: EM finds the 10 % from the probabilities alone
    rng = np.random.default_rng(0)
    fg = rng.random(200_000) < 0.1
    x = rng.normal(np.where(fg, 1.0, -1.0), 1.0)
    p_fg = 1.0 / (1.0 + np.exp(-2.0 * x))  # the posterior under equal priors
    probs = np.stack([1 - p_fg, p_fg], 1)
    prior = estimate_prior(probs, np.array([0.5, 0.5]))
    assert abs(prior[1] - 0.1) < 0.01
    # the corrected posteriors classify better than the uncorrected ones
    shifted = apply_offsets(probs, np.log(prior) - np.log([0.5, 0.5]))
    assert np.isclose(shifted.sum(1), 1.0, atol=1e-5).all()
    right_before = np.mean((probs[:, 1] > 0.5) == fg)
    right_after = np.mean((shifted[:, 1] > 0.5) == fg)
    assert right_after > right_before + 0.03


def test_stroke_prior_and_volume_sample():
    assert np.allclose(stroke_prior(np.array([0, 1, 1, 1]), 2), [0.25, 0.75])
    assert np.allclose(stroke_prior(np.array([0, 1, 1, 1]), 2, weights=[3.0, 1.0]), [0.5, 0.5])
    coords = np.array([[3, 1, 1], [7, 2, 2]])
    planes = volume_sample((10, 8, 8), coords, cached=False, seed=0, limit=50)
    assert set(np.unique(planes[:, 0])) <= {3, 7} and len(planes) == 50
    whole = volume_sample((10, 8, 8), coords, cached=True, seed=0)
    assert len(whole) == 640 and len(np.unique(whole, axis=0)) == 640


def test_the_shift_never_contradicts_the_strokes():
    # foreground strokes the head is only fairly sure of (a thin structure): the full
    # shift to a 0.1 % foreground mix would erase them, so only part of it is taken
    stroke_probs = np.array([[0.2, 0.8]] * 50 + [[0.99, 0.01]] * 50)
    targets = np.array([1] * 50 + [0] * 50)
    volume = np.array([[0.999, 0.001]] * 5000 + [[0.2, 0.8]] * 10)
    shift = fit_prior_shift(volume, stroke_probs, targets, np.array([0.5, 0.5]))
    assert 0.0 <= shift["strength"] < 1.0
    kept = np.argmax(apply_offsets(stroke_probs, shift.offsets), 1)
    assert np.mean(kept[targets == 1] == 1) >= 0.98
    # confident strokes allow the whole shift (here to a 10 % foreground mix)
    sure = np.array([[0.001, 0.999]] * 50 + [[0.999, 0.001]] * 50)
    tenth = np.array([[0.999, 0.001]] * 900 + [[0.001, 0.999]] * 100)
    shift = fit_prior_shift(tenth, sure, targets, np.array([0.5, 0.5]))
    assert shift["strength"] == 1.0 and abs(shift["volume_prior"][1] - 0.1) < 0.01


def test_refined_borders_beat_unrefined_on_a_blurred_ball(balls):
    image, truth, strokes = balls
    got = {}
    for refine in ("none", "auto"):
        seg = Segmenter(small_foundation(), candidate="filters", steps=120, refine=refine)
        fit = seg.fit(image, strokes)
        mask = np.asarray(seg.predict(image, probabilities=False).classes) == 2
        got[refine] = (dice(mask, truth), mask.sum() / truth.sum(), fit, seg)
    d_none, ratio_none, fit_none, _ = got["none"]
    d_auto, ratio_auto, fit_auto, seg = got["auto"]
    assert fit_none["refine"]["method"] == "none"
    assert fit_auto["refine"]["method"] == "prior" and fit_auto["refine"]["strength"] > 0
    # the strokes hold about 10 x more foreground than the volume's 9 %: the refined
    # model finds the volume's share and shrinks the objects back to their size
    assert fit_auto["refine"]["volume_prior"][1] < 0.5 * fit_auto["refine"]["stroke_prior"][1]
    assert ratio_none > 1.15 and abs(ratio_auto - 1.0) < abs(ratio_none - 1.0)
    assert d_auto > d_none + 0.03, (d_none, d_auto)
    assert seg.predict(image, probabilities=False).stats["refine"]["method"] == "prior"


def test_refinement_is_saved_with_the_model(balls, tmp_path):
    image, _, strokes = balls
    foundation = small_foundation()
    seg = Segmenter(foundation, candidate="filters", steps=40)
    seg.fit(image, strokes)
    before = np.asarray(seg.predict(image, probabilities=False).classes)
    seg.save(tmp_path / "m")
    loaded = Segmenter.load(tmp_path / "m", foundation)
    assert loaded.config.refine == "auto"
    assert np.allclose(loaded.refinement.offsets, seg.refinement.offsets)
    assert np.array_equal(np.asarray(loaded.predict(image, probabilities=False).classes), before)


def test_refine_setting_is_checked():
    assert SegmentConfig().refine == "auto"
    with pytest.raises(ValueError, match="refine"):
        SegmentConfig(refine="always")
    cfg = SegmentConfig(refine="none")
    assert SegmentConfig.from_dict(cfg.to_dict()).refine == "none"


def test_forest_is_not_refined(balls):
    image, _, strokes = balls
    seg = Segmenter(small_foundation(), candidate="forest", forest_trees=10)
    fit = seg.fit(image, strokes)
    assert fit["refine"]["method"] == "none" and seg.refinement.offsets is None
