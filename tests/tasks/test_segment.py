"""Few-shot segmentation from three brushed slices (issue 4), with a small random-init
foundation (no default weights exist yet): quality, Stop, save/load, out-of-core,
instances, bad inputs and the ``lsmfm segment`` command.

Brushes are simulated the way a user paints: on three z-slices, every voxel of the
structure (class 2), and background (class 1) along the structure's edges (half the
voxels of a 3-voxel band) plus a sprinkle (5 %) elsewhere. The model is trained on
one synthetic volume and evaluated on another (different seed): foreground Dice.
"""

from __future__ import annotations

import argparse
import json

import dask.array as da
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_lsmfm.engine.jobs import Cancelled, JobContext
from napari_lsmfm.model import Foundation, FoundationSpec, save_foundation
from napari_lsmfm.synth import make_volume
from napari_lsmfm.tasks import (
    SegmentConfig,
    Segmenter,
    SparseLabels,
    segment,
    split_instances,
)
from napari_lsmfm.tasks.instance_metrics import object_f1

SHAPE = (48, 128, 128)
VOXEL = (2.0, 1.0, 1.0)
SLICES = (10, 24, 38)

# Foreground Dice on an unseen volume (seed 2) after training on three slices of seed 1,
# measured with this small random-init foundation on 2 CPU cores: nuclei 0.825-0.831,
# vessels 0.605-0.625 (the random-forest baseline, tasks/baseline.py: 0.837 / 0.655).
# Thresholds keep a margin for platform and seed differences.
NUCLEI_DICE = 0.77
VESSELS_DICE = 0.53


def small_foundation(seed: int = 0) -> Foundation:
    torch.manual_seed(seed)
    spec = FoundationSpec("unet", embed_dim=16, channels=(8, 16, 32), strides=(2, 2),
                          num_res_units=1)
    return Foundation(spec)


def brush(labels: np.ndarray, slices=SLICES, value: int = 2, seed: int = 0,
          out: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b = np.zeros(labels.shape, np.uint8) if out is None else out
    for z in slices:
        fg = labels[z] > 0
        b[z][fg] = value
        bg = ~ndi.binary_dilation(fg)
        band = ndi.binary_dilation(fg, iterations=3) & bg
        pick = (bg & (rng.random(fg.shape) < 0.05)) | (band & (rng.random(fg.shape) < 0.5))
        b[z][pick & (b[z] == 0)] = 1
    return b


def dice(pred, truth) -> float:
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    return float(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))


@pytest.fixture(scope="module")
def foundation() -> Foundation:
    return small_foundation()


@pytest.fixture(scope="module")
def nuclei(foundation):
    train = make_volume("nuclei", SHAPE, VOXEL, seed=1)
    test = make_volume("nuclei", SHAPE, VOXEL, seed=2)
    brushes = brush(train.labels)
    # the MLP on foundation + filter features, whose training these tests follow (the
    # candidate choice: tests/tasks/test_segment_candidates.py)
    seg = Segmenter(foundation, voxel_size=VOXEL, candidate="foundation")
    updates = []
    fit = seg.fit(train.image, brushes, JobContext(updates.append))
    return {"seg": seg, "train": train, "test": test, "brushes": brushes, "fit": fit,
            "updates": updates, "result": seg.predict(test.image)}


# ------------------------------------------------------------------------ quality


def test_quick_mode_segments_nuclei_from_three_slices(nuclei):
    fit, result, test = nuclei["fit"], nuclei["result"], nuclei["test"]
    assert fit["steps_done"] == SegmentConfig().n_steps and not fit["stopped"]
    assert fit["history"][-1] < fit["history"][0]  # the loss fell
    steps = [u.values["step"] for u in nuclei["updates"] if "step" in u.values]
    assert steps == list(range(1, fit["steps_done"] + 1))  # a live loss curve
    assert dice(result.classes, test.labels) >= NUCLEI_DICE
    assert result.classes.dtype == np.uint8
    assert set(np.unique(result.classes)) <= {0, 2}  # the class keeps its brush value
    probs = result.probabilities
    assert probs.shape == (2, *SHAPE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert result.channel_values == (0, 2)


def test_quick_mode_segments_vessels_from_three_slices(foundation):
    train = make_volume("vessels", SHAPE, VOXEL, seed=1)
    test = make_volume("vessels", SHAPE, VOXEL, seed=2)
    seg = Segmenter(foundation, voxel_size=VOXEL)
    seg.fit(train.image, brush(train.labels))
    assert dice(seg.predict(test.image).classes, test.labels) >= VESSELS_DICE


def test_several_classes_keep_their_values(foundation):
    nuc = make_volume("nuclei", SHAPE, VOXEL, seed=5)
    ves = make_volume("vessels", SHAPE, VOXEL, seed=5)
    image = np.maximum(nuc.image, ves.image)
    truth = np.where(ves.labels > 0, 3, np.where(nuc.labels > 0, 2, 0))
    b = brush(nuc.labels & (ves.labels == 0))
    brush(ves.labels, value=3, out=b)
    seg = Segmenter(foundation, voxel_size=VOXEL)
    seg.fit(image, b)
    assert seg.classes == (2, 3)
    result = seg.predict(image, probabilities="uint8")
    assert set(np.unique(result.classes)) <= {0, 2, 3}
    assert result.probabilities.dtype == np.uint8 and result.probabilities.shape[0] == 3
    assert dice(result.classes == 2, truth == 2) > 0.65  # measured 0.81
    assert dice(result.classes == 3, truth == 3) > 0.4  # measured 0.52


def test_head_decay_shrinks_as_the_rarest_class_grows(foundation):
    seg = Segmenter(foundation, weight_decay=0.01, decay_reference=500)
    few = np.array([0] * 5000 + [1] * 100)  # background and 100 structure voxels
    many = np.array([0] * 5000 + [1] * 2000)
    assert seg._head_decay(few, 2) == pytest.approx(0.01)
    assert seg._head_decay(many, 2) == pytest.approx(0.0025)
    fixed = Segmenter(foundation, weight_decay=0.01, decay_reference=None)
    assert fixed._head_decay(many, 2) == pytest.approx(0.01)


def test_uncertainty_points_to_where_strokes_help(nuclei):
    result, test = nuclei["result"], nuclei["test"]
    u = result.uncertainty
    assert u.dtype == np.float32 and u.shape == SHAPE
    assert 0.0 <= u.min() and u.max() <= 1.0
    wrong = (result.classes > 0) != (test.labels > 0)
    # the errors are where the model is unsure: that is where a stroke helps
    assert u[wrong].mean() > 4 * u[~wrong].mean()  # measured ratio 8.9
    suggested = result.suggest_slices(axis=0, n=3)
    per_slice = u.mean(axis=(1, 2))
    assert len(suggested) == 3 and per_slice[suggested[0]] == per_slice.max()


def test_full_mode_finetunes_with_a_frozen_then_open_encoder(foundation):
    train = make_volume("nuclei", (32, 64, 64), VOXEL, seed=1)
    test = make_volume("nuclei", (32, 64, 64), VOXEL, seed=2)
    b = brush(train.labels, slices=(8, 16, 24))
    before = {k: v.clone() for k, v in foundation.backbone.state_dict().items()}
    seg = Segmenter(foundation, mode="full", steps=40, freeze_steps=20, patch_size=(16, 32, 32),
                    lr=1e-3, voxel_size=VOXEL, eval_every=4)
    fit = seg.fit(train.image, b)
    hist = fit["history"]
    assert np.mean(hist[-8:]) < np.mean(hist[:8])
    # the shared foundation is untouched; the model's copy changed
    for k, v in foundation.backbone.state_dict().items():
        assert torch.equal(v, before[k])
    tuned = seg.net.foundation.backbone.state_dict()
    assert any(not torch.equal(tuned[k], before[k]) for k in before if k.endswith("weight"))
    result = seg.predict(test.image)
    assert set(np.unique(result.classes)) <= {0, 2}
    assert dice(result.classes, test.labels) > 0.45  # measured 0.54-0.67 (seeds 0-2), 40 steps


def test_full_mode_starts_from_the_quick_model(foundation):
    # Before any finetuning the full network is the quick model (head on the same
    # features), so finetuning begins where quick mode ends.
    vol = make_volume("nuclei", (32, 64, 64), VOXEL, seed=1)
    b = brush(vol.labels, slices=(8, 16, 24))
    # (the quick start of a full fit keeps its probabilities as trained: refine "none")
    quick = Segmenter(foundation, voxel_size=VOXEL, feature_levels=(0,), candidate="foundation",
                      refine="none")
    quick.fit(vol.image, b)
    full = Segmenter(foundation, mode="full", steps=1, lr=1e-12, voxel_size=VOXEL,
                     patch_size=(16, 32, 32))
    full.fit(vol.image, b)
    torch.testing.assert_close(full.net.head.state_dict(), quick.head.state_dict())
    a, c = quick.predict(vol.image).classes, full.predict(vol.image).classes
    assert dice(a == 2, c == 2) > 0.97  # only the window blending differs


def test_full_mode_averages_the_finetuned_and_the_quick_model(foundation):
    # Predictions mix the finetuned network's probabilities with the quick model it
    # started from (weight quick_weight); the quick model stays frozen.
    vol = make_volume("nuclei", (32, 64, 64), VOXEL, seed=1)
    b = brush(vol.labels, slices=(8, 16, 24))
    quick = Segmenter(foundation, voxel_size=VOXEL, feature_levels=(0,), candidate="foundation",
                      refine="none")  # as the quick start of a full fit
    quick.fit(vol.image, b)
    seg = Segmenter(foundation, mode="full", steps=6, lr=1e-2, freeze_steps=0,
                    voxel_size=VOXEL, patch_size=(16, 32, 32), eval_every=1)
    seg.fit(vol.image, b)
    torch.testing.assert_close(seg.anchor.head.state_dict(), quick.head.state_dict())
    torch.testing.assert_close(seg.anchor.foundation.backbone.state_dict(),
                               foundation.backbone.state_dict())
    assert not any(p.requires_grad for p in seg.anchor.parameters())
    mixed = seg.predict(vol.image).probabilities
    seg.config.quick_weight = 0.0
    tuned = seg.predict(vol.image).probabilities
    seg.config.quick_weight = 1.0
    start = seg.predict(vol.image)
    assert np.abs(tuned - start.probabilities).max() > 0.05  # finetuning moved it
    np.testing.assert_allclose(mixed, 0.5 * (tuned + start.probabilities), atol=1e-5)
    q = quick.predict(vol.image).classes
    assert dice(q == 2, start.classes == 2) > 0.97  # only the window blending differs
    with pytest.raises(ValueError, match="quick_weight"):
        SegmentConfig(quick_weight=1.5)


def test_full_mode_keeps_the_encoder_frozen_during_warm_up(foundation):
    from napari_lsmfm.tasks.segment.full import is_encoder

    train = make_volume("nuclei", (32, 64, 64), VOXEL, seed=1)
    seg = Segmenter(foundation, mode="full", steps=4, freeze_steps=4, patch_size=(16, 32, 32))
    seg.fit(train.image, brush(train.labels, slices=(8, 16, 24)))
    original = foundation.backbone.state_dict()
    tuned = seg.net.foundation.backbone.state_dict()
    encoder = [k for k in original if is_encoder(k, "unet") and k.endswith("weight")]
    decoder = [k for k in original if not is_encoder(k, "unet") and k.endswith("weight")]
    assert encoder and decoder
    assert all(torch.equal(original[k], tuned[k]) for k in encoder)
    assert any(not torch.equal(original[k], tuned[k]) for k in decoder)


def test_full_mode_augmentations_keep_intensities_unless_asked():
    """Geometric augmentation (the default) only moves voxels; "all" also jitters their
    brightness; strokes move with their voxels either way."""
    from napari_lsmfm.tasks.segment.full import PatchSampler

    vol = make_volume("nuclei", (16, 32, 32), VOXEL, seed=3)
    sparse = SparseLabels.from_array(brush(vol.labels, slices=(4, 8, 12)), vol.image.shape)
    targets = sparse.targets(sparse.classes)
    irange = (float(vol.image.min()), float(vol.image.max()))

    def draw(augment):
        sampler = PatchSampler(vol.image, irange, sparse, targets, (16, 32, 32),
                                np.random.default_rng(0), augment)
        return sampler.sample(4)

    plain_x, plain_y = draw("none")
    geo_x, geo_y = draw("geometric")
    jit_x, _ = draw("all")
    # the whole volume is the patch: every draw holds the same voxels, moved or not
    assert np.allclose(np.sort(geo_x.numpy().ravel()), np.sort(plain_x.numpy().ravel()))
    assert not torch.equal(geo_x, plain_x)
    assert np.bincount(geo_y.numpy().ravel() + 1).tolist() == np.bincount(
        plain_y.numpy().ravel() + 1).tolist()
    assert not np.allclose(np.sort(jit_x.numpy().ravel()), np.sort(plain_x.numpy().ravel()))
    assert SegmentConfig(augment=True).augment == "all"
    assert SegmentConfig(augment=False).augment == "none"
    with pytest.raises(ValueError, match="augment must be one of"):
        SegmentConfig(augment="elastic")


# ------------------------------------------------------------------- stop, save, load


def test_stop_keeps_the_best_model_so_far(foundation):
    vol = make_volume("nuclei", (24, 64, 64), VOXEL, seed=3)
    b = brush(vol.labels, slices=(6, 12, 18))
    seg = Segmenter(foundation, voxel_size=VOXEL, steps=300, eval_every=10,
                    candidate="foundation")

    def stop_at_45(update):
        if update.values.get("step") == 45:
            ctx.cancel()

    ctx = JobContext(stop_at_45)
    fit = seg.fit(vol.image, b, ctx)
    assert fit["stopped"] and fit["steps_done"] == 45
    assert seg.trained and fit["best_loss"] <= min(fit["history"][:40:10] + [np.inf])
    result = seg.predict(vol.image)
    assert dice(result.classes, vol.labels) > 0.7  # measured 0.84 after 45 steps

    # cancelled before any training step: the previous model stays, Cancelled propagates
    previous = seg.head
    early = JobContext()
    early.cancel()
    with pytest.raises(Cancelled):
        Segmenter(foundation).fit(vol.image, b, early)
    assert seg.head is previous


def test_save_and_load_give_identical_predictions(nuclei, foundation, tmp_path):
    seg = nuclei["seg"]
    folder = seg.save(tmp_path / "nuclei_model")
    config = json.loads((folder / "config.json").read_text())
    assert config["task"] == "segment" and config["classes"] == [2]
    assert config["foundation"]["spec"]["architecture"] == "unet"
    assert (folder / "head.safetensors").is_file()
    loaded = Segmenter.load(folder, foundation)
    again = loaded.predict(nuclei["test"].image)
    np.testing.assert_array_equal(again.classes, nuclei["result"].classes)
    np.testing.assert_allclose(again.probabilities, nuclei["result"].probabilities, atol=1e-5)
    with pytest.raises(FileExistsError):
        seg.save(folder)
    with pytest.raises(ValueError, match="other foundation weights"):
        Segmenter.load(folder, small_foundation(seed=1))
    with pytest.raises(ValueError, match="cannot be found"):
        Segmenter.load(folder)  # trained on an in-memory foundation: name it
    # a damaged copy says so
    (folder / "head.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="damaged"):
        Segmenter.load(folder, foundation)
    with pytest.raises(ValueError, match="not a saved napari-lsmfm model"):
        Segmenter.load(tmp_path)


def test_full_mode_model_carries_its_backbone(foundation, tmp_path):
    vol = make_volume("nuclei", (32, 64, 64), VOXEL, seed=1)
    seg = Segmenter(foundation, mode="full", steps=4, patch_size=(16, 32, 32))
    seg.fit(vol.image, brush(vol.labels, slices=(8, 16, 24)))
    folder = seg.save(tmp_path / "full")
    assert (folder / "backbone.safetensors").is_file()
    assert (folder / "anchor_backbone.safetensors").is_file()  # the quick model too
    loaded = Segmenter.load(folder)  # no foundation needed: the backbones are saved
    a, b = seg.predict(vol.image), loaded.predict(vol.image)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    # without the quick model (quick_weight 0, as in models saved before it existed)
    alone = Segmenter(foundation, mode="full", steps=4, patch_size=(16, 32, 32),
                      quick_weight=0.0)
    alone.fit(vol.image, brush(vol.labels, slices=(8, 16, 24)))
    assert alone.anchor is None
    folder = alone.save(tmp_path / "alone")
    assert not (folder / "anchor_backbone.safetensors").exists()
    a, b = alone.predict(vol.image), Segmenter.load(folder, foundation).predict(vol.image)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_retraining_with_more_strokes_reuses_the_features(foundation):
    vol = make_volume("nuclei", (24, 64, 64), VOXEL, seed=3)
    seg = Segmenter(foundation, voxel_size=VOXEL)
    seg.fit(vol.image, brush(vol.labels, slices=(6, 12)))
    calls = []
    hook = foundation.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        fit = seg.fit(vol.image, brush(vol.labels, slices=(6, 12, 18)))
    finally:
        hook.remove()
    assert calls == []  # no foundation pass: the features are cached
    assert fit["seconds"] < 20.0  # measured about 2 s idle (three candidates validated)
    assert fit["n_annotated"] > 0 and seg.trained


# ---------------------------------------------------------------------- out of core


def test_dask_volume_into_zarr_outputs(nuclei):
    """Out of core: a dask volume, no whole-volume cache, windows smaller than the
    volume, blocks smaller than the volume: features are computed and classified block
    by block into zarr arrays, and agree with the in-memory single-window result."""
    zarr = pytest.importorskip("zarr")
    seg, image = nuclei["seg"], nuclei["test"].image
    lazy = da.from_array(image, chunks=(16, 64, 64))
    settings = SegmentConfig()
    seg.config.cache_bytes = 0
    seg.config.tile = (32, 64, 64)
    seg.config.block_bytes = 48 * 2**20
    try:
        out = {
            "classes": zarr.create_array(store={}, shape=SHAPE, chunks=(16, 64, 64),
                                         dtype="uint8"),
            "probabilities": zarr.create_array(store={}, shape=(2, *SHAPE),
                                               chunks=(1, 16, 64, 64), dtype="uint8"),
        }
        result = seg.predict(lazy, out=out, probabilities="uint8", uncertainty=False)
    finally:
        seg.config.cache_bytes = settings.cache_bytes
        seg.config.tile = settings.tile
        seg.config.block_bytes = settings.block_bytes
    assert result.classes is out["classes"]
    classes = out["classes"][...]
    reference = nuclei["result"]
    # tiling (and float16 caching in the reference) changes almost nothing
    assert (classes == reference.classes).mean() > 0.995
    probs = out["probabilities"][...] / 255.0
    assert np.abs(probs - reference.probabilities).mean() < 0.01
    assert dice(classes, nuclei["test"].labels) >= NUCLEI_DICE


def test_full_mode_out_of_core(foundation):
    """Full mode on a dask volume with no feature cache: the quick start reads features
    at the strokes only, patches are read lazily, and the prediction (finetuned network
    mixed with the quick model) goes window by window into a zarr array."""
    zarr = pytest.importorskip("zarr")
    vol = make_volume("nuclei", (32, 64, 64), VOXEL, seed=1)
    lazy = da.from_array(vol.image, chunks=(16, 32, 32))
    seg = Segmenter(foundation, mode="full", steps=4, patch_size=(16, 32, 32), voxel_size=VOXEL,
                    cache_bytes=0, tile=(16, 32, 32), block_bytes=4 * 2**20)
    fit = seg.fit(lazy, brush(vol.labels, slices=(8, 16, 24)))
    assert fit["steps_done"] == 4 and seg._quick._cache == {}  # nothing cached whole
    out = {"classes": zarr.create_array(store={}, shape=vol.image.shape, chunks=(16, 32, 32),
                                        dtype="uint8")}
    result = seg.predict(lazy, out=out, probabilities=False, uncertainty=False)
    assert result.classes is out["classes"]
    reference = seg.predict(vol.image, probabilities=False, uncertainty=False)
    assert (out["classes"][...] == reference.classes).mean() > 0.999
    # on the brushed volume itself; measured 0.80-0.81 with foundation seeds 0-2
    assert dice(out["classes"][...], vol.labels) > 0.7


def test_roi_prediction_matches_the_whole(nuclei):
    roi = (slice(10, 30), slice(20, 100), slice(0, 64))
    part = nuclei["seg"].predict(nuclei["test"].image, region=roi)
    assert part.classes.shape == (20, 80, 64)
    np.testing.assert_array_equal(part.classes, nuclei["result"].classes[roi])


# ------------------------------------------------------------------------ instances


def test_split_instances_separates_touching_spheres():
    z, y, x = np.mgrid[:30, :40, :60]
    a = (z - 15) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 100
    b = (z - 15) ** 2 + (y - 20) ** 2 + (x - 37) ** 2 < 100
    assert ndi.label(a | b)[1] == 1  # they touch
    labels = split_instances(a | b)
    assert labels.dtype == np.uint32 and labels.max() == 2
    assert set(np.unique(labels[a & ~b])) == {labels[15, 20, 20]}
    assert set(np.unique(labels[b & ~a])) == {labels[15, 20, 37]}
    # the same with anisotropic voxels (every second plane)
    assert split_instances((a | b)[::2], voxel_size=(2, 1, 1)).max() == 2
    assert split_instances(np.zeros((4, 5, 6), bool)).max() == 0


def test_predict_instances_finds_the_nuclei(nuclei):
    test = nuclei["test"]
    result = nuclei["seg"].predict(test.image, instances=True)
    assert result.instances.dtype == np.uint32
    assert ((result.instances > 0) == (result.classes > 0)).mean() > 0.99
    n_true = len(np.unique(test.labels)) - 1
    assert abs(int(result.instances.max()) - n_true) <= 0.2 * n_true  # measured 115 of 126
    assert object_f1(result.instances, test.labels) > 0.7  # measured 0.84
    # on the true mask the splitting alone is nearly perfect (measured 0.99)
    assert object_f1(split_instances(test.labels > 0, voxel_size=VOXEL), test.labels) > 0.95


# ----------------------------------------------------------------------- bad inputs


def test_bad_inputs_get_clear_messages(foundation):
    vol = make_volume("nuclei", (16, 32, 32), VOXEL, seed=0)
    image, good = vol.image, brush(vol.labels, slices=(8,))
    seg = Segmenter(foundation)
    with pytest.raises(ValueError, match="not trained"):
        seg.predict(image)
    with pytest.raises(ValueError, match="no strokes"):
        seg.fit(image, np.zeros_like(good))
    with pytest.raises(ValueError, match="only background"):
        seg.fit(image, (good == 1).astype(np.uint8))
    with pytest.raises(ValueError, match="no background"):
        seg.fit(image, (good == 2).astype(np.uint8) * 2)
    with pytest.raises(ValueError, match="shape"):
        seg.fit(image, good[:, :, :-1])
    bigger = np.zeros((16, 32, 40), np.uint8)
    bigger[:, :, :32] = good
    bigger[8, 5, 35] = 2
    with pytest.raises(ValueError, match="1 painted voxels lie outside"):
        seg.fit(image, bigger)
    with pytest.raises(ValueError, match="outside the image"):
        SparseLabels.from_points([[0, 0, 0], [3, 40, 0]], [1, 2], image.shape)
    with pytest.raises(ValueError, match="2D"):
        seg.fit(image[0], good[0])
    with pytest.raises(ValueError, match="channel"):
        seg.fit(np.stack([image, image]), np.stack([good, good]))
    nan = image.astype(np.float32)
    nan[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        seg.fit(nan, good)
    with pytest.raises(ValueError, match="negative"):
        seg.fit(image, good.astype(np.int16) - 1)
    with pytest.raises(ValueError, match="integers"):
        seg.fit(image, good.astype(np.float32) / 2)
    many = good.astype(np.uint16)
    many[0, :10, :10] = np.arange(100, 200).reshape(10, 10)
    with pytest.raises(ValueError, match="instance image"):
        seg.fit(image, many)
    with pytest.raises(ValueError, match="mode"):
        SegmentConfig(mode="fast")


def test_filter_bank_is_the_same_on_cpu_and_gpu_paths():
    """The scipy path (CPU) and the torch path (GPU) of the quick-mode filters agree, so a
    head trained on one device works on the other; the eigenvalues are right."""
    from napari_lsmfm.tasks.filters import filter_bank, n_channels, sym3_eig_extremes

    rng = np.random.default_rng(0)
    x = torch.from_numpy(ndi.gaussian_filter(rng.random((20, 40, 40)), 1.5).astype(np.float32))
    a = filter_bank(x[None, None], (1.0, 2.0), VOXEL, backend="scipy")
    b = filter_bank(x[None, None], (1.0, 2.0), VOXEL, backend="torch")
    assert a.shape == (1, n_channels((1.0, 2.0)), 20, 40, 40)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    h = rng.standard_normal((500, 3, 3))
    h = h + h.transpose(0, 2, 1)
    lo, hi = sym3_eig_extremes({(i, j): h[:, i, j] for i in range(3) for j in range(i, 3)})
    ev = np.linalg.eigvalsh(h)
    np.testing.assert_allclose(lo, ev[:, 0], atol=1e-9)
    np.testing.assert_allclose(hi, ev[:, 2], atol=1e-9)


def test_sparse_labels_summary():
    b = np.zeros((10, 20, 20), np.uint8)
    b[2, :5, :5] = 1
    b[7, 10:12, 10:12] = 3
    s = SparseLabels.from_array(b, b.shape)
    assert s.classes == (3,) and s.n_annotated == 29
    assert s.slices_used == ("z", (2, 7))
    assert s.counts == {1: 25, 3: 4}
    assert list(np.unique(s.targets(s.classes))) == [0, 1]
    lazy = SparseLabels.from_array(da.from_array(b, chunks=(3, 20, 20)), b.shape)
    np.testing.assert_array_equal(lazy.coords, s.coords)
    # a densely painted volume is thinned evenly per class; a rare class keeps all
    assert s.subsample(10).counts == {1: 6, 3: 4}
    assert s.subsample(100) is s


def test_segment_convenience(foundation):
    vol = make_volume("nuclei", (24, 64, 64), VOXEL, seed=3)
    result = segment(vol.image, brush(vol.labels, slices=(6, 12, 18)), foundation=foundation,
                     steps=100, voxel_size=VOXEL)
    assert dice(result.classes, vol.labels) > 0.75  # measured 0.85
    assert result.stats["segmenter"].trained


# ---------------------------------------------------------------------------- CLI


def run_cli(*argv: str) -> int:
    from napari_lsmfm.cli import segment as cli_segment

    parser = argparse.ArgumentParser(prog="lsmfm")
    cli_segment.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["segment", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, foundation):
    from napari_lsmfm.io import write_volume

    root = tmp_path_factory.mktemp("cli")
    vol = make_volume("nuclei", (24, 64, 64), VOXEL, seed=3)
    write_volume(root / "image.tif", vol.image, voxel_size=VOXEL)
    write_volume(root / "brushes.tif", brush(vol.labels, slices=(6, 12, 18)), kind="labels")
    save_foundation(foundation, root / "weights")
    return root, vol


def test_cli_trains_saves_and_applies(cli_files, capsys):
    from napari_lsmfm.io import open_volume

    root, vol = cli_files
    rc = run_cli(str(root / "image.tif"), "--labels", str(root / "brushes.tif"),
                 "--weights", str(root / "weights"), "--out", str(root / "classes.tif"),
                 "--probabilities", str(root / "probs.zarr"), "--prob-dtype", "uint8",
                 "--uncertainty", str(root / "unc.tif"), "--instances", str(root / "inst.tif"),
                 "--save-model", str(root / "model"), "--steps", "150", "--candidate", "foundation",
                 "--quiet")
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["classes"] == [2] and summary["fit"]["steps_done"] == 150
    classes = np.asarray(open_volume(root / "classes.tif").data)
    assert dice(classes, vol.labels) > 0.75  # measured 0.85
    probs = open_volume(root / "probs.zarr")
    assert probs.shape == (2, 24, 64, 64) and probs.dtype == np.uint8
    assert open_volume(root / "classes.tif").voxel_size == pytest.approx(VOXEL)
    assert np.asarray(open_volume(root / "inst.tif").data).max() > 0
    # apply the saved model to the volume again: the same class map
    rc = run_cli(str(root / "image.tif"), "--model", str(root / "model"), "--weights",
                 str(root / "weights"), "--out", str(root / "again.zarr"), "--quiet")
    assert rc == 0
    np.testing.assert_array_equal(np.asarray(open_volume(root / "again.zarr").data), classes)


def test_cli_full_mode_sets_the_quick_weight(cli_files, capsys, tmp_path):
    from napari_lsmfm.io import open_volume

    root, _ = cli_files
    base = [str(root / "image.tif"), "--weights", str(root / "weights"), "--quiet"]
    train = [*base, "--labels", str(root / "brushes.tif"), "--mode", "full", "--steps", "4"]
    assert run_cli(*train, "--out", str(tmp_path / "mixed.tif"),
                   "--save-model", str(tmp_path / "model")) == 0
    # a saved full model predicts with another weight: finetuned alone, or quick alone
    probs = []
    for w in ("0", "1"):
        rc = run_cli(*base, "--model", str(tmp_path / "model"), "--quick-weight", w,
                     "--out", str(tmp_path / f"c{w}.tif"), "--probabilities",
                     str(tmp_path / f"p{w}.tif"))
        assert rc == 0
        probs.append(np.asarray(open_volume(tmp_path / f"p{w}.tif").data))
    assert np.abs(probs[0] - probs[1]).max() > 1e-3
    with pytest.raises(ValueError, match="quick_weight must be in"):
        run_cli(*base, "--model", str(tmp_path / "model"), "--quick-weight", "2",
                "--out", str(tmp_path / "x.tif"))
    with pytest.raises(ValueError, match="--mode full"):
        run_cli(*base, "--labels", str(root / "brushes.tif"), "--quick-weight", "0.5",
                "--out", str(tmp_path / "y.tif"))
    # trained with weight 0, the quick model is not saved, and cannot be asked for later
    assert run_cli(*train, "--quick-weight", "0", "--out", str(tmp_path / "alone.tif"),
                   "--save-model", str(tmp_path / "alone")) == 0
    assert not (tmp_path / "alone" / "anchor_head.safetensors").exists()
    with pytest.raises(ValueError, match="only --quick-weight 0"):
        run_cli(*base, "--model", str(tmp_path / "alone"), "--quick-weight", "0.5",
                "--out", str(tmp_path / "z.tif"))
    capsys.readouterr()


def test_cli_refuses_to_overwrite_and_explains(cli_files, monkeypatch, tmp_path):
    import napari_lsmfm.model.checkpoints as checkpoints

    root, _ = cli_files
    existing = tmp_path / "taken.tif"
    existing.write_bytes(b"x")
    base = [str(root / "image.tif"), "--labels", str(root / "brushes.tif")]
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_cli(*base, "--weights", str(root / "weights"), "--out", str(existing))
    with pytest.raises(ValueError, match="either --labels"):
        run_cli(str(root / "image.tif"), "--out", str(tmp_path / "a.tif"))
    with pytest.raises(ValueError, match=r"\.tif"):
        run_cli(*base, "--out", str(tmp_path / "a.png"))
    # no --weights and no embedded default installed: say so
    monkeypatch.setattr(checkpoints, "DEFAULT_MODEL_DIR", tmp_path / "no-default")
    with pytest.raises(ValueError, match="No default foundation"):
        run_cli(*base, "--out", str(tmp_path / "b.tif"))
    assert not (tmp_path / "b.tif").exists()
