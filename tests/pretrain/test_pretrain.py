"""Pretraining: masks, losses, data sources, the loop (each objective), checkpoints and resume,
and that the result loads and feeds downstream code. Tiny UNet, 32^3 patches, CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from napari_lsmfm.engine.jobs import Cancelled, JobContext
from napari_lsmfm.model import FoundationSpec, inspect_checkpoint, load_foundation
from napari_lsmfm.pretrain import (
    CaptionTable,
    PatchDataset,
    PretrainConfig,
    SyntheticCorpus,
    alignment_loss,
    apply_mask,
    build_student,
    clip_loss,
    cube_mask,
    distillation_loss,
    ema_update,
    latest_checkpoint,
    load_checkpoint,
    mask_ratio_at,
    masked_l1,
    pretrain,
    weights_digest,
)
from napari_lsmfm.pretrain.objectives import LOGIT_SCALE_INIT

TINY = {"architecture": "unet", "embed_dim": 8, "channels": [8, 16, 32], "strides": [2, 2],
        "num_res_units": 1}


def tiny_config(**changes) -> PretrainConfig:
    base = dict(
        steps=2, patch_size=32, batch_size=2, spec=TINY, warmup_steps=1, checkpoint_every=0,
        device="cpu", proj_dim=16, text_width=16, text_layers=1, seed=3,
    )
    base.update(changes)
    return PretrainConfig(**base)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return SyntheticCorpus(32, n_volumes=3, volume_shape=(36, 40, 40), seed=1)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("size", [8, 16])
def test_cube_mask_ratio_and_grid(size):
    image = torch.rand(3, 1, 64, 64, 64)
    mask = cube_mask(image, 0.3, (size,), generator=torch.Generator().manual_seed(0))
    assert mask.shape == image.shape and mask.dtype == torch.bool
    n_cubes = (64 // size) ** 3
    expected = round(0.3 * n_cubes) / n_cubes
    for m in mask[:, 0]:
        assert m.float().mean().item() == pytest.approx(expected)
        cubes = m.reshape(64 // size, size, 64 // size, size, 64 // size, size)
        per_cube = cubes.float().mean(dim=(1, 3, 5))
        assert set(per_cube.unique().tolist()) <= {0.0, 1.0}  # cubes aligned to the grid


def test_cube_mask_sizes_vary_and_partial_border():
    image = torch.rand(8, 1, 40, 40, 40)  # not a multiple of 16: border cubes are cut
    mask = cube_mask(image, 0.5, (8, 16), generator=torch.Generator().manual_seed(1))
    assert mask.shape == image.shape
    fractions = mask.float().mean(dim=(1, 2, 3, 4))
    assert ((fractions > 0.2) & (fractions < 0.8)).all()
    assert mask_ratio_at(0, 10, 0.05, 0.3) == 0.05
    assert mask_ratio_at(10, 10, 0.05, 0.3) == 0.3
    tiny = cube_mask(torch.rand(1, 1, 32, 32, 32), 0.05, (16,))  # 8 cubes: still one masked
    assert tiny.float().mean().item() == pytest.approx(1 / 8)
    masked = apply_mask(image, mask)
    assert (masked[mask] == 0).all() and torch.equal(masked[~mask], image[~mask])


def test_intensity_masking_prefers_signal():
    image = torch.full((1, 1, 32, 64, 64), 0.02)
    image[..., 32:] = 1.0  # the right half holds the signal
    bright, dark = 0.0, 0.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        mask = cube_mask(image, 0.3, (8,), mode="intensity", generator=gen)[0, 0]
        bright += mask[..., 32:].float().mean().item()
        dark += mask[..., :32].float().mean().item()
    assert bright > 4 * dark
    assert dark > 0  # the background floor still masks some empty cubes
    uniform = cube_mask(image, 0.3, (8,), mode="cube", generator=gen)[0, 0]
    assert uniform.float().mean().item() == pytest.approx(round(0.3 * 256) / 256)


def test_channel_separated_masks_differ():
    image = torch.rand(2, 3, 32, 32, 32)
    gen = torch.Generator().manual_seed(0)
    separated = cube_mask(image, 0.3, (8,), channel_separated=True, generator=gen)
    shared = cube_mask(image, 0.3, (8,), channel_separated=False, generator=gen)
    for b in range(2):
        assert not torch.equal(separated[b, 0], separated[b, 1])
        assert torch.equal(shared[b, 0], shared[b, 1]) and torch.equal(shared[b, 1], shared[b, 2])
        for c in range(3):
            assert separated[b, c].float().mean().item() == pytest.approx(round(0.3 * 64) / 64)
    intensity = cube_mask(image, 0.3, (8,), mode="intensity", channel_separated=True, generator=gen)
    assert not torch.equal(intensity[0, 0], intensity[0, 1])


def test_cube_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        cube_mask(torch.rand(32, 32, 32), 0.3)
    with pytest.raises(ValueError, match="masking mode"):
        cube_mask(torch.rand(1, 1, 16, 16, 16), 0.3, mode="random")
    with pytest.raises(ValueError, match="ratio"):
        cube_mask(torch.rand(1, 1, 16, 16, 16), 1.5)


# --------------------------------------------------------------------------- losses


def test_ema_update_math():
    teacher = torch.nn.Linear(3, 2)
    student = torch.nn.Linear(3, 2)
    t0 = teacher.weight.detach().clone()
    s0 = student.weight.detach().clone()
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, 0.9 * t0 + 0.1 * s0)
    bn_t, bn_s = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    bn_s.running_mean.fill_(3.0)
    ema_update(bn_t, bn_s, 0.5)
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)  # buffers are copied


def test_clip_loss_matched_below_shuffled():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(8, 16, generator=gen)
    text = image + 0.1 * torch.randn(8, 16, generator=gen)
    scale = torch.tensor(LOGIT_SCALE_INIT)
    matched = clip_loss(image, text, scale)
    shuffled = clip_loss(image, text[torch.roll(torch.arange(8), 1)], scale)
    assert matched < shuffled
    assert matched < math.log(8)
    # Items sharing a caption are positives of each other; one caption only: nothing to learn.
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    dup_text = text[ids * 2]
    assert clip_loss(image, dup_text, scale, ids) < clip_loss(image, dup_text, scale)
    same = torch.zeros(8, dtype=torch.long)
    assert clip_loss(image, text, scale, same).item() == pytest.approx(0.0, abs=1e-6)
    # Captions through labels: a batch of two "nuclei" images against one text per label.
    labels = torch.randn(3, 16, generator=gen)
    pair = labels[[0, 0]] + 0.1 * torch.randn(2, 16, generator=gen)
    label_ids = torch.tensor([0, 1, 2])
    right = clip_loss(pair, labels, scale, torch.tensor([0, 0]), label_ids)
    wrong = clip_loss(pair, labels, scale, torch.tensor([1, 1]), label_ids)
    assert 0 < right < wrong
    # The temperature is learnable and clamped at 100.
    learn = torch.tensor(LOGIT_SCALE_INIT, requires_grad=True)
    clip_loss(image, text, learn).backward()
    assert learn.grad is not None and learn.grad != 0
    big = clip_loss(image, text, torch.tensor(10.0))
    assert big == pytest.approx(clip_loss(image, text, torch.tensor(math.log(100.0))).item())


def test_masked_losses_only_see_masked_voxels():
    target = torch.rand(1, 1, 8, 8, 8)
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[..., :4] = True
    pred = target.clone()
    pred[..., 4:] += 5.0  # errors only where nothing is masked
    assert masked_l1(pred, target, mask).item() == pytest.approx(0.0)
    pred[..., :4] += 0.5
    assert masked_l1(pred, target, mask).item() == pytest.approx(0.5, rel=1e-5)
    student = torch.randn(1, 6, 8, 8, 8)
    teacher = torch.randn(1, 6, 8, 8, 8)
    base = distillation_loss(student, teacher, mask)
    changed = teacher.clone()
    changed[..., 4:] = torch.randn(1, 6, 8, 8, 4)
    assert distillation_loss(student, changed, mask).item() == pytest.approx(base.item())
    assert distillation_loss(teacher, teacher, mask) < base
    same = alignment_loss(student.flatten(1), student.flatten(1))
    assert same.item() == pytest.approx(0, abs=1e-6)


# --------------------------------------------------------------------------- data


def _write_tiff(path, array, **kwargs):
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, **kwargs)


def test_folder_dataset_captions_and_lazy_patches(tmp_path):
    rng = np.random.default_rng(0)
    _write_tiff(tmp_path / "DAPI" / "brain1.tif", rng.integers(100, 4000, (40, 48, 48), np.uint16))
    _write_tiff(tmp_path / "lectin" / "sub" / "b.tif", rng.integers(0, 255, (20, 30, 30), np.uint8))
    _write_tiff(tmp_path / "unlabelled.tif", rng.random((36, 36, 36), np.float32))
    from napari_lsmfm.io import write_volume

    write_volume(tmp_path / "DAPI" / "brain2.ome.zarr", rng.random((34, 40, 40), np.float32))
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({
        "labels": {"nuclei": ["Nuclear stain, round blobs", "nuclei"], "vessels": "Lectin vessels"},
        "sources": {"DAPI": "nuclei", "lectin": "vessels"},
    }))
    data = PatchDataset(tmp_path, 32, captions)
    assert [e.relative for e in data.entries] == [
        "DAPI/brain1.tif", "DAPI/brain2.ome.zarr", "lectin/sub/b.tif", "unlabelled.tif"
    ]
    assert [e.labels for e in data.entries] == [["nuclei"], ["nuclei"], ["vessels"], [None]]
    seen = set()
    for i in range(12):
        patch = data.sample(np.random.default_rng(i))
        assert patch.image.shape == (1, 32, 32, 32) and patch.image.dtype == np.float32
        assert 0.0 <= patch.image.min() and patch.image.max() <= 1.0
        seen.add(patch.source)
    assert len(seen) == 4
    # The small volume (20 x 30 x 30) is zero-padded up to the patch.
    small = data.entries[2]
    assert small.shape == (20, 30, 30)
    assert data.describe()["captioned"] == 3 and data.has_captions


def test_caption_table_layouts():
    flat = CaptionTable.from_mapping({"DAPI": "nuclear stain", "vessels": ["a", "b"]})
    assert flat.label_for("DAPI/x/y.tif") == "DAPI"
    assert flat.label_for("run1/vessels.ome.tif") == "vessels"  # by file stem
    assert flat.label_for("other/z.tif") is None
    assert flat.label_names == ["DAPI", "vessels"] and flat.texts() == ["nuclear stain", "a", "b"]
    with pytest.raises(ValueError, match="no description"):
        CaptionTable.from_mapping({"labels": {"a": "x"}, "sources": {"f": "missing"}})
    with pytest.raises(ValueError, match="text or a list"):
        CaptionTable.from_mapping({"a": 3})


def test_synthetic_corpus_is_deterministic(corpus):
    a = corpus.sample(np.random.default_rng(5))
    b = corpus.sample(np.random.default_rng(5))
    assert np.array_equal(a.image, b.image) and a.labels == b.labels
    assert a.image.shape == (1, 32, 32, 32)
    assert a.labels[0] in corpus.captions.labels
    assert corpus.volume_params(0) == corpus.volume_params(0)
    assert corpus.volume_params(0)["kind"] != corpus.volume_params(1)["kind"]
    # the structure mask is the volume's ground truth at the patch, flipped with it
    assert corpus.has_masks and a.mask.shape == (32, 32, 32) and np.array_equal(a.mask, b.mask)
    assert set(np.unique(a.mask)) <= {0.0, 1.0}
    from napari_lsmfm.synth import make_volume

    for seed in range(8):
        p = corpus.sample(np.random.default_rng(seed))
        j = int(p.source.rsplit("/", 1)[1])
        truth = make_volume(**corpus.volume_params(j)).labels > 0
        image, _, mask = corpus._volume(j)
        assert np.array_equal(mask, truth)
        if p.mask.any():  # the patch's mask is a (flipped) crop of the truth
            assert p.mask.sum() <= truth.sum()
            break
    else:
        pytest.fail("no sampled patch had structure")


def test_structure_objective_teaches_the_mask(tmp_path, corpus):
    # A few steps of the structure objective alone lower its loss (a linear read-out of
    # the features learns the mask).
    config = tiny_config(steps=12, objectives=("structure",), lr=3e-3, warmup_steps=1)
    updates = []
    pretrain(config, corpus, tmp_path / "m", JobContext(updates.append))
    losses = [u.values["structure"] for u in updates if "structure" in u.values]
    assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4])


def test_structure_objective_needs_masks(tmp_path):
    volume = np.random.default_rng(0).random((32, 32, 32), np.float32)
    _write_tiff(tmp_path / "data" / "a.tif", volume)
    both = tiny_config(steps=1, objectives=("recon", "structure"))
    result = pretrain(both, str(tmp_path / "data"), tmp_path / "m")
    assert "structure" not in result and "recon" in result
    record = json.loads((tmp_path / "m" / "config.json").read_text())["training"]
    assert any("no structure masks" in n for n in record["notes"])
    with pytest.raises(ValueError, match="structure masks"):
        pretrain(tiny_config(steps=1, objectives=("structure",)), str(tmp_path / "data"),
                 tmp_path / "n")


def test_init_starts_from_a_saved_model(tmp_path, corpus):
    first = tiny_config(steps=2)
    pretrain(first, corpus, tmp_path / "a")
    start = load_foundation(tmp_path / "a", device="cpu")
    # continue with another objective; a different spec in the config is replaced
    second = tiny_config(steps=1, objectives=("recon", "distill", "align", "clip", "structure"),
                         init=str(tmp_path / "a"), lr=1e-12, warmup_steps=0,
                         spec={**TINY, "embed_dim": 4})
    pretrain(second, corpus, tmp_path / "b")
    after = load_foundation(tmp_path / "b", device="cpu")
    assert after.spec.embed_dim == TINY["embed_dim"]
    for k, v in start.state_dict().items():
        torch.testing.assert_close(after.state_dict()[k], v, atol=1e-6, rtol=0)
    record = json.loads((tmp_path / "b" / "config.json").read_text())["training"]
    assert any("started from" in n for n in record["notes"])
    assert record["config"]["spec"]["embed_dim"] == TINY["embed_dim"]
    with pytest.raises(ValueError, match="not a readable foundation"):
        pretrain(tiny_config(steps=1, init=str(tmp_path / "nowhere")), corpus, tmp_path / "c")


# --------------------------------------------------------------------------- the loop


def _backbone_change(out, config, corpus) -> float:
    torch.manual_seed(config.seed)
    fresh = build_student(config, corpus.captions.texts())
    trained = load_foundation(out, device="cpu")
    before = fresh.backbone.state_dict()
    after = trained.backbone.state_dict()
    return max((after[k].float() - before[k].float()).abs().max().item() for k in before)


@pytest.mark.parametrize(
    "objectives",
    [("recon",), ("distill",), ("align",), ("clip",), ("structure",),
     ("recon", "distill", "align", "clip")],
)
def test_each_objective_trains(tmp_path, corpus, objectives):
    config = tiny_config(objectives=objectives)
    updates = []
    result = pretrain(config, corpus, tmp_path / "m", JobContext(updates.append))
    assert result["step"] == 2
    for name in objectives:
        assert math.isfinite(result[name])
        assert all(name in u.values for u in updates if u.values.get("step"))
    assert math.isfinite(result["loss"])
    assert _backbone_change(tmp_path / "m", config, corpus) > 0
    record = json.loads((tmp_path / "m" / "config.json").read_text())["training"]
    assert record["objectives"] == list(objectives) and record["steps"] == 2
    assert set(record["final_losses"]) == {"loss", *objectives}
    assert record["hardware"]["device"] == "cpu" and record["wall_time_s"] >= 0
    text = any(o in objectives for o in ("align", "clip"))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["spec"]["variant"] == (
        "image_text" if text else "image_only"
    )


def test_bf16_autocast_step(tmp_path, corpus):
    # The CUDA default (bf16 autocast) exercised on the CPU: dtypes mix without errors.
    result = pretrain(tiny_config(steps=1, amp="bf16"), corpus, tmp_path / "m")
    assert all(math.isfinite(result[k]) for k in ("recon", "distill", "align", "clip"))


def test_intensity_channel_separated_on_multichannel_folder(tmp_path):
    rng = np.random.default_rng(1)
    two_channel = rng.integers(0, 1000, (32, 2, 36, 36), np.uint16)  # Z C Y X
    path = tmp_path / "data" / "stack.tif"
    _write_tiff(path, two_channel, imagej=True, metadata={"axes": "ZCYX"})
    data = PatchDataset(tmp_path / "data", 32, CaptionTable.from_mapping({"stack": "two stains"}))
    assert data.entries[0].channels == 2
    config = tiny_config(masking="intensity", channel_separated=True, objectives=("recon", "clip"))
    result = pretrain(config, data, tmp_path / "m")
    assert math.isfinite(result["recon"]) and math.isfinite(result["clip"])


def test_no_captions_switches_text_objectives_off(tmp_path):
    volume = np.random.default_rng(0).random((32, 32, 32), np.float32)
    _write_tiff(tmp_path / "data" / "a.tif", volume)
    result = pretrain(tiny_config(steps=1), str(tmp_path / "data"), tmp_path / "m")
    assert "clip" not in result and "recon" in result
    record = json.loads((tmp_path / "m" / "config.json").read_text())["training"]
    assert record["objectives"] == ["recon", "distill"] and "no captions" in record["notes"][0]
    with pytest.raises(ValueError, match="no captions"):
        pretrain(tiny_config(steps=1, objectives=("clip",)), str(tmp_path / "data"), tmp_path / "n")


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, corpus):
    """An uninterrupted 4-step run, and the same run cancelled at step 2 then resumed."""
    root = tmp_path_factory.mktemp("resume")
    config = tiny_config(steps=4, checkpoint_every=3)
    full = pretrain(config, corpus, root / "full")

    def stop_at_2(update):
        if update.values.get("step") == 2:
            ctx.cancel()

    ctx = JobContext(stop_at_2)
    with pytest.raises(Cancelled):
        pretrain(config, corpus, root / "split", ctx)
    cancelled_ckpt = latest_checkpoint(root / "split")
    resumed = pretrain(config, corpus, root / "split", resume=True)
    return root, full, resumed, cancelled_ckpt


def test_checkpoint_resume_matches_uninterrupted(resumed_run):
    root, full, resumed, cancelled_ckpt = resumed_run
    assert cancelled_ckpt is not None and cancelled_ckpt.name == "step_000002.pt"
    state = load_checkpoint(cancelled_ckpt)  # weights_only=True inside
    assert state["step"] == 2 and "teacher" in state and "optimizer" in state
    assert resumed["step"] == full["step"] == 4
    assert resumed["weights_sha256"] == full["weights_sha256"]
    assert resumed["loss"] == pytest.approx(full["loss"])
    from safetensors.torch import load_file

    a = load_file(str(root / "full" / "model.safetensors"))
    b = load_file(str(root / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = sorted(p.name for p in (root / "full" / "checkpoints").iterdir())
    assert names == ["step_000003.pt", "step_000004.pt"]
    record = json.loads((root / "split" / "config.json").read_text())["training"]
    assert any("resumed from step_000002.pt" in n for n in record["notes"])


def test_existing_output_needs_resume_or_overwrite(resumed_run, corpus):
    root = resumed_run[0]
    with pytest.raises(FileExistsError):
        pretrain(tiny_config(steps=1), corpus, root / "full")


def test_output_loads_and_feeds_downstream(resumed_run):
    root, full, _, _ = resumed_run
    info = inspect_checkpoint(root / "full")
    assert info["architecture"] == "unet" and info["text_tower"] is True
    assert info["variant"] == "image_text" and info["text_tower_kind"] == "lsmfm"
    fm = load_foundation(root / "full", device="cpu")
    assert isinstance(fm.spec, FoundationSpec)
    assert fm.logit_scale == pytest.approx(full["logit_scale"])
    x = torch.rand(1, 1, 40, 50, 60)
    with torch.no_grad():
        levels = fm.features(x)
        dense = fm(x)
    assert dense.shape == (1, 8, 40, 50, 60)
    assert levels[0].shape == dense.shape and len(levels) == 1 + len(TINY["channels"])
    head = torch.nn.Conv3d(8, 2, 1)  # a downstream head on the features
    assert head(levels[0]).shape == (1, 2, 40, 50, 60)
    image = fm.embed_image(x)
    text = fm.embed_text(["cell nuclei", "blood vessels"])
    assert image.shape == (1, 16) and text.shape == (2, 16)
    assert weights_digest(fm) == full["weights_sha256"]


def test_lsmfm_info_command(resumed_run, capsys):
    from napari_lsmfm import cli

    assert cli.main(["info", str(resumed_run[0] / "full")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "unet" and info["text_tower"] is True


def test_same_seed_same_weights_other_seed_differs(tmp_path, corpus):
    a = pretrain(tiny_config(steps=2, objectives=("recon",)), corpus, tmp_path / "a")
    # Batches depend on (seed, rank, step) only: a data-loading process changes nothing.
    b = pretrain(tiny_config(steps=2, objectives=("recon",), num_workers=1), corpus, tmp_path / "b")
    c = pretrain(tiny_config(steps=2, objectives=("recon",), seed=4), corpus, tmp_path / "c")
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]


# --------------------------------------------------------------------------- command line


def test_pretrain_cli_synthetic(tmp_path, capsys):
    from napari_lsmfm.cli import pretrain as cli

    out = tmp_path / "m"
    common = ["pretrain", "--synthetic", "--synthetic-volumes", "2", "--out", str(out),
              "--steps", "2", "--patch-size", "32", "--batch-size", "1", "--device", "cpu",
              "--arch", json.dumps(TINY), "--warmup-steps", "1"]
    args = [*common, "--objectives", "recon,clip"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2 and math.isfinite(result["clip"])
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["data"]["kind"] == "synthetic"
    assert config["spec"]["text"]["kind"] == "lsmfm" and config["spec"]["text"]["vocab"]
    with pytest.raises(FileExistsError):
        cli.main(args)
    assert cli.main([*args, "--resume"]) == 0  # already done: rewrites the same model
    with pytest.raises(ValueError, match="objectives"):
        cli.main([*common, "--objectives", "recon,teleport", "--overwrite"])
    # continue the model with the structure objective, weighted from the command line
    again = [*common[:5], str(tmp_path / "m2"), *common[6:], "--init", str(out),
             "--objectives", "recon,structure", "--loss-weights", "structure=2,recon=0.1"]
    assert cli.main(again) == 0
    record = json.loads((tmp_path / "m2" / "config.json").read_text())["training"]
    assert record["config"]["loss_weights"]["structure"] == 2.0
    assert record["config"]["loss_weights"]["recon"] == 0.1
    assert record["config"]["init"] == str(out)
    for bad in ("structure", "teleport=1", "structure=heavy"):
        with pytest.raises(ValueError, match="loss-weights"):
            cli.main([*again, "--overwrite", "--loss-weights", bad])


def test_optional_bert_text_tower(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    texts = corpus.captions.texts()
    words = sorted({w for t in texts for w in t.lower().replace(",", " ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(folder)
    run = tiny_config(steps=2, objectives=("clip",), text_model=str(folder),
                      text_trainable_layers=1)
    result = pretrain(run, corpus, tmp_path / "m")
    assert math.isfinite(result["clip"])
    fm = load_foundation(tmp_path / "m", device="cpu")  # vocab.txt is written next to it
    assert fm.text_tower.kind == "bert"
    assert fm.embed_text(["cell nuclei"]).shape == (1, 16)
