"""Click corrections (ClickCorrector on a real quick-mode segmenter) and the simulated
expert (simulate_click, the VISTA3D rule) on hand-made masks."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from napari_lsmfm.model import Foundation, FoundationSpec
from napari_lsmfm.review import ClickCorrector, ReviewError, ReviewSession, simulate_click
from napari_lsmfm.synth import make_volume
from napari_lsmfm.tasks import Segmenter
from napari_lsmfm.tasks.segment.features import image_key
from napari_lsmfm.tasks.segment.residual import Residual, fit_residual

# (the package napari_lsmfm.tasks exports a function "segment", which hides the module)
segmenter_module = importlib.import_module("napari_lsmfm.tasks.segment.segmenter")
SHAPE = (12, 40, 40)
VOXEL = (2.0, 1.0, 1.0)


def brush(labels: np.ndarray, planes=(4, 8)) -> np.ndarray:
    out = np.zeros(labels.shape, np.uint8)
    for z in planes:
        fg = labels[z] > 0
        out[z][fg] = 2
        out[z][::3, ::3][~fg[::3, ::3]] = 1
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    foundation = Foundation(FoundationSpec("unet", embed_dim=8, channels=(8, 16),
                                           strides=(2,), num_res_units=1))
    vol = make_volume("nuclei", SHAPE, VOXEL, seed=3)
    seg = Segmenter(foundation, voxel_size=VOXEL, candidate="foundation", steps=40,
                    refine="none")
    brushes = brush(vol.labels)
    seg.fit(vol.image, brushes)
    result = seg.predict(vol.image, instances=True)
    return {"seg": seg, "vol": vol, "brushes": brushes, "result": result}


def session_of(trained) -> ReviewSession:
    return ReviewSession(np.asarray(trained["result"].instances).astype(np.uint32),
                         voxel_size=VOXEL)


def test_fit_keeps_its_strokes_and_their_image(trained):
    seg, vol = trained["seg"], trained["vol"]
    assert seg.strokes.n_annotated == int((trained["brushes"] > 0).sum())
    assert seg.strokes_image == image_key(vol.image)


def test_click_changes_labels_near_the_click_and_nowhere_outside_its_region(trained):
    session = session_of(trained)
    before = np.array(session.labels)
    obj = max(session.objects.values(), key=lambda r: r.voxels)
    point = tuple(int(round(c)) for c in obj.centroid)
    assert before[point] == obj.id
    corrector = ClickCorrector(trained["seg"], trained["vol"].image, radius=1)
    region = session.click(point, False, corrector)
    after = np.array(session.labels)
    assert all(s.start <= p < s.stop for p, s in zip(point, region, strict=True))
    assert after[point] == 0  # the negative click removed the clicked voxel
    outside = np.ones(SHAPE, bool)
    outside[region] = False
    np.testing.assert_array_equal(after[outside], before[outside])
    # a positive click where it was removed brings the object back there
    session.click(point, True, corrector)
    assert np.array(session.labels)[point] == obj.id
    assert len(corrector.clicks) == 2


def test_region_is_about_the_object_size_and_reach_is_honoured(trained):
    seg, image = trained["seg"], trained["vol"].image
    session = session_of(trained)
    obj = max(session.objects.values(), key=lambda r: r.voxels)
    point = tuple(int(round(c)) for c in obj.centroid)
    region, mask = ClickCorrector(seg, image).correct(session, point, True)
    size = [s.stop - s.start for s in region]
    extent = [s.stop - s.start for s in obj.bbox]
    assert mask.shape == tuple(size) and mask.dtype == bool
    assert all(4 <= n <= 3 * e + 8 for n, e in zip(size, extent, strict=True))
    region, mask = ClickCorrector(seg, image, reach=(3, 5, 7)).correct(session, point, True)
    assert [s.stop - s.start for s in region] == [3, 5, 7] and mask.shape == (3, 5, 7)
    assert mask[1, 2, 3]  # the clicked voxel, positive


def test_clicks_condition_the_model_without_changing_the_segmenter(trained, monkeypatch):
    seg, image = trained["seg"], trained["vol"].image
    session = session_of(trained)
    weights = [p.detach().clone() for p in seg.head.parameters()]
    computed = []
    real = segmenter_module.volume_features
    monkeypatch.setattr(segmenter_module, "volume_features",
                        lambda *a, **k: computed.append(1) or real(*a, **k))
    obj = max(session.objects.values(), key=lambda r: r.voxels)
    point = tuple(int(round(c)) for c in obj.centroid)
    corrector = ClickCorrector(seg, image, reach=(6, 12, 12), radius=2, strength=20.0,
                               steps=60)
    first = None
    for _ in range(3):  # the expert insists: this object is background
        region, mask = corrector.correct(session, point, False)
        first = mask.sum() if first is None else first
    base = np.asarray(trained["result"].classes)[region] == 2
    assert mask.sum() < base.sum()  # the model, conditioned, predicts less of it
    assert not computed  # the cached foundation features were reused, never recomputed
    for p, w in zip(seg.head.parameters(), weights, strict=True):
        assert torch.equal(p, w)  # the segmenter itself is untouched
    corrector.reset()
    assert corrector.clicks == []


def test_refusals(trained):
    seg, image = trained["seg"], trained["vol"].image
    corrector = ClickCorrector(seg, image)
    with pytest.raises(ReviewError, match="outside the image"):
        corrector.correct(None, (0, 0, 99), True)
    with pytest.raises(ValueError, match="not trained"):
        ClickCorrector(Segmenter(seg.foundation), image)
    with pytest.raises(ValueError, match="quick-mode"):
        ClickCorrector(Segmenter(seg.foundation, mode="full"), image)
    with pytest.raises(ValueError, match="labels have shape"):
        ClickCorrector(seg, image, strokes=np.ones((2, 2, 2), np.uint8) + 1)


def test_residual_starts_at_the_model_and_learns_the_clicks():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 4)).astype(np.float32)
    probs = np.stack([np.full(500, 0.8), np.full(500, 0.2)], 1).astype(np.float32)
    res = Residual(feats, np.log(probs))
    np.testing.assert_allclose(res.probabilities(feats, probs), probs, atol=1e-5)
    clicked = feats[:5] + 3.0  # voxels of their own kind, said to be class 1
    fit_residual(res, [((feats, probs, np.zeros(500, np.int64)), 1.0),
                       ((clicked, probs[:5], np.ones(5, np.int64)), 5.0)], steps=60)
    assert (res.probabilities(clicked, probs[:5])[:, 1] > 0.5).all()
    assert res.probabilities(feats, probs)[:, 1].mean() < 0.5  # the rest stays


# ------------------------------------------------------------- simulated expert


def test_simulate_click_picks_the_largest_eroded_error_and_its_sign():
    rng = np.random.default_rng(0)
    truth = np.zeros((12, 20, 20), bool)
    truth[2:9, 2:9, 2:9] = True  # a 7^3 object the prediction misses: FN
    pred = np.zeros_like(truth)
    pred[5, 12:19, 12:19] = True  # a thin false positive, gone after erosion
    for _ in range(5):
        point, positive = simulate_click(pred, truth, rng)
        assert positive and all(3 <= c <= 7 for c in point)  # inside the eroded object
    pred2 = truth.copy()
    pred2[1:11, 10:19, 10:19] = True  # a big false positive block
    pred2[2:9, 2:4, 2:9] = False  # a smaller false negative slab
    point, positive = simulate_click(pred2, truth, rng)
    assert not positive and 2 <= point[0] <= 9 and point[1] >= 11 and point[2] >= 11


def test_simulate_click_without_thick_errors_and_without_errors():
    rng = np.random.default_rng(1)
    truth = np.zeros((6, 10, 10), bool)
    truth[2:4, 2:8, 2:8] = True
    assert simulate_click(truth, truth, rng) is None
    pred = truth.copy()
    pred[3, 5, 5] = False  # one missed voxel: erosion leaves nothing, the error itself
    assert simulate_click(pred, truth, rng) == ((3, 5, 5), True)
    with pytest.raises(ValueError, match="shape"):
        simulate_click(pred[:3], truth, rng)


def test_an_undone_click_no_longer_conditions_the_next_one(trained):
    session = session_of(trained)
    obj = max(session.objects.values(), key=lambda r: r.voxels)
    point = tuple(int(round(c)) for c in obj.centroid)
    corrector = ClickCorrector(trained["seg"], trained["vol"].image, radius=1)
    session.click(point, False, corrector)
    assert session.undo()
    other = (point[0], min(point[1] + 2, SHAPE[1] - 1), point[2])
    session.click(other, False, corrector)
    assert [p for p, _ in corrector.clicks] == [other]  # the undone click is gone
    assert session.clicks == [(other, False)]
