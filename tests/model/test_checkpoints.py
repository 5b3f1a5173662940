"""Loading weights: the four published lsm_fm layouts, our own format, the default, safety."""

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import napari_lsmfm.model.checkpoints as checkpoints
import napari_lsmfm.model.text as text
from _checkpoints import (
    PUBLISHED,
    TINY_BERT,
    make_lightning_checkpoint,
    make_malicious_checkpoint,
    make_our_checkpoint,
    write_bert_vocab,
)
from napari_lsmfm.model import (
    CheckpointError,
    UnsafeCheckpointError,
    inspect_checkpoint,
    load_encoder_weights,
    load_foundation,
    save_foundation,
)

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
LAYOUTS = [("swinunetr", True), ("swinunetr", False), ("unet", True), ("unet", False)]


def _ids(layout):
    return f"{layout[0]}_{'image_text' if layout[1] else 'image_only'}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One small synthetic checkpoint per published layout, and a BERT vocab.txt."""
    root = tmp_path_factory.mktemp("ckpts")
    files = {
        layout: make_lightning_checkpoint(root / f"{_ids(layout)}_best.ckpt", *layout)
        for layout in LAYOUTS
    }
    return {"root": root, "files": files, "vocab": write_bert_vocab(root / "vocab.txt")}


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_published_layouts_load_every_encoder_key(store, layout):
    arch, use_text = layout
    path = store["files"][layout]
    fm = load_foundation(path, device="cpu", vocab=store["vocab"])
    state = _state(path)
    report = fm.load_report
    encoder_keys = {k for k in state if k.startswith("student_encoder.")}
    assert encoder_keys and encoder_keys <= set(report.used)  # every encoder key used
    assert not report.dropped
    assert set(report.used) | set(report.ignored) == set(state)
    assert all(k.startswith(checkpoints.TRAINING_ONLY) for k in report.ignored)
    # the student, not the (drifted) EMA teacher
    for key, value in fm.backbone.state_dict().items():
        assert torch.equal(value, state["student_encoder." + key]), key
    info = fm.info()
    assert info["architecture"] == arch and info["source"] == str(path)
    assert info["variant"] == ("image_text" if use_text else "image_only")
    assert not fm.training and fm.device == torch.device("cpu")
    if use_text:
        for key, value in fm.image_proj.state_dict().items():
            assert torch.equal(value, state["image_proj." + key]), key
        assert fm.spec.proj_dim == fm.spec.embed_dim  # lsm_fm projects into embed_dim
        assert fm.logit_scale == pytest.approx(math.log(10))
        assert info["text_tower"] is HAS_TRANSFORMERS
        if HAS_TRANSFORMERS:
            assert {k for k in state if k.startswith(("text_encoder.", "text_proj."))} <= set(
                report.used
            )
            assert fm.spec.text["num_hidden_layers"] == TINY_BERT["layers"]
            z = fm.embed_text(["nuclei stained with DAPI", "vessels"])
            assert z.shape == (2, fm.spec.proj_dim)
    else:
        assert fm.image_proj is None and fm.text_tower is None
    if arch == "unet":  # (a loaded SwinUNETR runs in test_text_tower_unavailable_...)
        with torch.no_grad():
            assert fm(torch.rand(1, 1, 9, 10, 11)).shape == (1, fm.spec.embed_dim, 9, 10, 11)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_published_sizes(tmp_path, layout):
    """The real architectures: SwinUNETR fs36/fs24 (35.1 M / 15.7 M), UNet (19.0 M)."""
    arch, use_text = layout
    path = make_lightning_checkpoint(tmp_path / "best.ckpt", arch, use_text, small=False)
    info = inspect_checkpoint(path)  # no vocab: the image side only
    sizes = PUBLISHED[layout]
    if arch == "swinunetr":
        assert info["feature_size"] == sizes["feature_size"] and info["embed_dim"] == 512
        backbone = 35_091_422 if use_text else 15_715_754
    else:
        assert info["channels"] == [32, 64, 128, 256, 512] and info["embed_dim"] == 128
        assert info["strides"] == [2, 2, 2, 1] and info["norm"] == "BATCH"
        backbone = 19_030_321
    proj = 2 * (sizes["embed_dim"] ** 2 + sizes["embed_dim"]) + 2 * sizes["embed_dim"]
    assert info["parameters"] == backbone + (proj if use_text else 0)
    assert info["text_tower"] is False
    assert info["format"] == "lsm_fm-lightning" and info["device"] == "cpu"


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the BERT tower needs transformers")
def test_bert_text_tower_matches_a_plain_bert(store):
    import transformers

    path = store["files"][("unet", True)]
    fm = load_foundation(path, device="cpu", vocab=store["vocab"])
    state = _state(path)
    config = transformers.BertConfig(
        vocab_size=TINY_BERT["vocab_size"],
        hidden_size=TINY_BERT["hidden"],
        num_hidden_layers=TINY_BERT["layers"],
        num_attention_heads=1,
        intermediate_size=TINY_BERT["intermediate"],
        max_position_embeddings=TINY_BERT["max_positions"],
    )
    bert = transformers.BertModel(config).eval()
    bert.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    proj = torch.nn.Sequential(
        torch.nn.Linear(TINY_BERT["hidden"], 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 8),
        torch.nn.LayerNorm(8),
    )
    proj.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("text_proj.")})
    tokens = fm.text_tower.tokenize(["Nuclei stained with DAPI"])
    words = fm.text_tower.tokenizer._tok.convert_ids_to_tokens(tokens["input_ids"][0])
    assert words == ["[CLS]", "nuclei", "stained", "with", "dapi", "[SEP]"]
    with torch.no_grad():  # the published encode_text: BERT, mean over tokens, text_proj
        expected = proj(bert(**tokens).last_hidden_state.mean(dim=1))
    expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(fm.embed_text(["Nuclei stained with DAPI"]), expected)


def test_text_tower_unavailable_says_what_is_missing(store, monkeypatch):
    path = store["files"][("swinunetr", True)]
    fm = load_foundation(path, device="cpu")  # no vocab
    assert fm.text_tower is None and fm.image_proj is not None
    assert "--vocab" in fm.text_unavailable_reason
    with pytest.raises(RuntimeError, match="--vocab"):
        fm.embed_text(["nuclei"])
    assert fm.embed_image(torch.rand(1, 1, 9, 10, 11)).shape == (1, fm.spec.proj_dim)
    assert not any(k.startswith("text_") for k in fm.load_report.used)

    def no_transformers():
        raise text.TextTowerUnavailable("transformers is not installed")

    monkeypatch.setattr(text, "_import_transformers", no_transformers)
    info = inspect_checkpoint(path, vocab=store["vocab"])
    assert info["text_tower"] is False and info["variant"] == "image_text"
    assert "napari-lsmfm[text]" in info["text_unavailable_reason"]
    both = load_foundation(path, device="cpu").text_unavailable_reason
    assert "napari-lsmfm[text]" in both and "--vocab" in both


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the BERT tower needs transformers")
def test_wrong_vocabulary_is_explained(store, tmp_path):
    path = store["files"][("unet", True)]
    short = write_bert_vocab(tmp_path / "vocab.txt", vocab_size=TINY_BERT["vocab_size"] - 1)
    reason = load_foundation(path, device="cpu", vocab=short).text_unavailable_reason
    assert "119 tokens" in reason and "120" in reason
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\nworld\n")
    reason = load_foundation(path, device="cpu", vocab=notes).text_unavailable_reason
    assert "not a BERT WordPiece vocabulary" in reason


# --- our own format and the default -------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the BERT tower needs transformers")
def test_our_format_round_trip_with_the_bert_tower(store, tmp_path):
    fm = load_foundation(store["files"][("unet", True)], device="cpu", vocab=store["vocab"])
    folder = save_foundation(fm, tmp_path / "model", extra_config={"pretrained_on": "synthetic"})
    assert (folder / "vocab.txt").read_text() == store["vocab"].read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "napari-lsmfm-foundation" and config["version"] == 1
    assert config["normalization"] == {"low": 1.0, "high": 99.0}
    assert config["pretrained_on"] == "synthetic" and config["spec"]["text"]["kind"] == "bert"
    x = torch.rand(1, 1, 9, 10, 11)
    for where in (folder, folder / "model.safetensors", folder / "config.json"):
        again = load_foundation(where, device="cpu")  # vocab.txt is found beside the weights
        assert again.info()["parameters"] == fm.info()["parameters"]
        assert again.load_report.format == "napari-lsmfm" and not again.load_report.ignored
        torch.testing.assert_close(again.embed_image(x), fm.embed_image(x))
        torch.testing.assert_close(again.embed_text(["vessels"]), fm.embed_text(["vessels"]))
        assert again.logit_scale == pytest.approx(fm.logit_scale)


@pytest.mark.parametrize("arch", ["swinunetr", "unet"])
def test_our_format_with_our_own_text_tower(tmp_path, arch):
    folder = make_our_checkpoint(tmp_path / "model", arch)
    fm = load_foundation(folder, device="cpu")
    assert fm.text_tower is not None and fm.text_tower.kind == "lsmfm"
    assert json.loads((folder / "config.json").read_text())["trained_by"] == "tests"
    assert set(fm.load_report.used) == set(load_file(str(folder / "model.safetensors")))
    again = save_foundation(fm, tmp_path / "again")
    twin = load_foundation(again, device="cpu")
    torch.testing.assert_close(twin.embed_text(["dapi nuclei"]), fm.embed_text(["dapi nuclei"]))


def test_saving_without_the_unavailable_text_tower(store, tmp_path):
    fm = load_foundation(store["files"][("swinunetr", True)], device="cpu")  # no vocab
    folder = save_foundation(fm, tmp_path / "model")
    again = load_foundation(folder, device="cpu")
    assert again.spec.variant == "image_text" and again.text_tower is None
    assert "--vocab" in again.text_unavailable_reason
    torch.testing.assert_close(again.image_proj[2].weight, fm.image_proj[2].weight)


def test_default_model(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "DEFAULT_MODEL_DIR", tmp_path / "default")
    with pytest.raises(CheckpointError) as err:
        load_foundation()
    assert str(err.value) == (
        "No default foundation model is installed in this napari-lsmfm; name a weights file "
        "(a published lsm_fm .ckpt or a napari-lsmfm .safetensors)"
    )
    make_our_checkpoint(tmp_path / "default", "unet")
    fm = load_foundation(device="cpu")
    assert fm.source == "default" and fm.info()["source"] == "default"
    assert inspect_checkpoint(None)["text_tower"] is True


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the BERT tower needs transformers")
def test_bert_index_buffers_of_older_transformers_are_accepted(store, tmp_path):
    def old_style(state):
        state["text_encoder.embeddings.position_ids"] = torch.arange(TINY_BERT["max_positions"])[
            None
        ]

    path = make_lightning_checkpoint(tmp_path / "old.ckpt", "unet", True, edit_state=old_style)
    fm = load_foundation(path, device="cpu", vocab=store["vocab"])
    assert fm.text_tower is not None
    assert "text_encoder.embeddings.position_ids" in fm.load_report.ignored


def test_progress_is_reported(store):
    seen = []
    load_foundation(
        store["files"][("unet", False)], device="cpu", progress=lambda f, m: seen.append((f, m))
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(isinstance(m, str) and m for _, m in seen)


# --- safety --------------------------------------------------------------------------------------


def test_a_pickle_that_runs_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "code_ran.txt"
    path = make_malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    assert not marker.exists()
    for attempt in (lambda: load_foundation(path, device="cpu"), lambda: inspect_checkpoint(path)):
        with pytest.raises(UnsafeCheckpointError) as err:
            attempt()
        message = str(err.value)
        assert "getattr" in message and "pathlib" in message
        assert "trusted=True" in message and "--trust" in message and str(path) in message
        assert "\n" not in message
        assert not marker.exists()
    fm = load_foundation(path, device="cpu", trusted=True)  # explicit trust: the pickle runs
    assert marker.exists()
    assert fm.info()["architecture"] == "unet"


def test_legacy_torch_format(tmp_path):
    marker = tmp_path / "code_ran.txt"
    evil = make_malicious_checkpoint(tmp_path / "evil.pt", marker, legacy=True)
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        load_foundation(evil, device="cpu")
    assert not marker.exists()
    plain = make_lightning_checkpoint(tmp_path / "plain.pt", "unet", False, legacy=True)
    assert load_foundation(plain, device="cpu").info()["architecture"] == "unet"


def _drop_student(state):
    return {k: v for k, v in state.items() if not k.startswith("student_encoder.")}


def _drop_one_student_key(state):
    return {
        k: v
        for k, v in state.items()
        if k != "student_encoder.swinViT.layers1.0.blocks.0.norm1.weight"
    }


def _extra_student_key(state):
    return {**state, "student_encoder.swinViT.extra.weight": torch.zeros(3)}


def _bad_shape(state):
    key = "student_encoder.swinViT.layers2.0.blocks.1.mlp.linear1.weight"
    return {**state, key: torch.zeros(7, 7)}


def _no_model_section(hp):
    del hp["model"]


def _anonymous_model(hp):
    hp["model"] = {"lr": 0.0001}


def _feature_size_24(hp):
    hp["model"]["swinunetr"]["feature_size"] = 24


def _named_unet(hp):
    hp["model"]["arch"] = "UNet"
    del hp["model"]["swinunetr"]


def _written(name, **kwargs):
    return lambda tmp: make_lightning_checkpoint(tmp / name, **kwargs)


def _file(name, data):
    def write(tmp):
        path = tmp / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return path

    return write


def _truncated(tmp):
    path = make_lightning_checkpoint(tmp / "full.ckpt", "unet", False)
    cut = tmp / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return cut


def _npy(tmp):
    np.save(tmp / "array.npy", np.zeros(3))
    return tmp / "array.npy"


def _plain_state_dict(tmp):
    from monai.networks.nets import UNet

    net = UNet(3, 1, 2, (4, 8), (2,))
    torch.save(net.state_dict(), tmp / "weights.pth")
    return tmp / "weights.pth"


def _our(mutate_config=None, mutate_weights=None):
    def write(tmp):
        folder = make_our_checkpoint(tmp / "model", "unet", text=None)
        if mutate_config:
            config = json.loads((folder / "config.json").read_text())
            mutate_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        if mutate_weights:
            mutate_weights(folder / "model.safetensors")
        return folder

    return write


def _truncate_file(path):
    path.write_bytes(path.read_bytes()[:200])


def _stray_tensor(path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["head.weight"] = torch.zeros(2)
    save_file(state, str(path))


def _empty_folder(tmp):
    (tmp / "folder").mkdir()
    return tmp / "folder"


def _weights_without_config(tmp):
    folder = make_our_checkpoint(tmp / "model", "unet", text=None)
    (folder / "config.json").unlink()
    return folder / "model.safetensors"


BAD_FILES = {
    "missing": (lambda tmp: tmp / "nowhere.ckpt", "no such file"),
    "empty": (_file("empty.ckpt", b""), "empty"),
    "text": (_file("notes.ckpt", "not a checkpoint"), "not a PyTorch checkpoint"),
    "random bytes": (_file("noise.ckpt", bytes(range(130, 250))), "not a PyTorch checkpoint"),
    "truncated": (_truncated, "truncated"),
    "numpy": (_npy, "not a PyTorch checkpoint"),
    "plain state_dict": (_plain_state_dict, "'state_dict' and 'hyper_parameters'"),
    "no model section": (
        _written("a.ckpt", arch="unet", use_text=False, edit_hparams=_no_model_section),
        "no recognised 'model' section",
    ),
    "model section without architecture": (
        _written("b.ckpt", arch="unet", use_text=False, edit_hparams=_anonymous_model),
        "no recognised 'model' section",
    ),
    "no student encoder": (
        _written("c.ckpt", arch="unet", use_text=False, edit_state=_drop_student),
        "no student_encoder.* weights",
    ),
    "missing encoder key": (
        _written("d.ckpt", use_text=False, edit_state=_drop_one_student_key),
        "missing 1 key(s): swinViT.layers1.0.blocks.0.norm1.weight",
    ),
    "unexpected encoder key": (
        _written("e.ckpt", use_text=False, edit_state=_extra_student_key),
        "unexpected 1 key(s): swinViT.extra.weight",
    ),
    "shape mismatch": (
        _written("f.ckpt", use_text=False, edit_state=_bad_shape),
        "shape mismatch",
    ),
    "feature_size disagrees": (
        _written("g.ckpt", use_text=False, edit_hparams=_feature_size_24),
        "feature_size 24 but the student_encoder.* weights have 12",
    ),
    "architecture disagrees": (
        _written("h.ckpt", use_text=False, edit_hparams=_named_unet),
        "describe a unet but the student_encoder.* weights are a swinunetr",
    ),
    "our: wrong format": (_our(lambda c: c.update(format="napari-lsmfm-segmentation")), "format"),
    "our: newer version": (_our(lambda c: c.update(version=9)), "version 9"),
    "our: bad spec": (_our(lambda c: c["spec"].update(embed_dim=-1)), "embed_dim"),
    "our: truncated weights": (_our(mutate_weights=_truncate_file), "not a complete safetensors"),
    "our: stray tensors": (_our(mutate_weights=_stray_tensor), "unexpected tensors head.weight"),
    "our: empty folder": (_empty_folder, "no model.safetensors and config.json"),
    "our: no config": (_weights_without_config, "no config.json"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_get_one_clear_line(tmp_path, case):
    make, expected = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_foundation(path, device="cpu")
    message = str(err.value)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert expected in message
    assert path.name in message and "\n" not in message
    assert "expected" in message or "update" in message or "no such file" in message


def test_architecture_named_in_hyper_parameters(tmp_path):
    def named(hp):
        hp["model"]["backbone"] = "SwinUNETR"
        hp["model"]["embed_dim"] = 999  # disagrees with the weights: the weights win, noted

    path = make_lightning_checkpoint(tmp_path / "x.ckpt", use_text=False, edit_hparams=named)
    fm = load_foundation(path, device="cpu")
    assert fm.spec.architecture == "swinunetr" and fm.spec.embed_dim == 16
    assert any("embed_dim 999" in note for note in fm.load_report.notes)


def test_unknown_device_fails_before_reading(tmp_path):
    with pytest.raises(ValueError, match="not understood"):
        load_foundation(tmp_path / "never_read.ckpt", device="tpu")


def test_encoder_weights_into_a_network_with_another_head(store):
    from monai.networks.nets import SwinUNETR, UNet

    for arch, net in (
        ("swinunetr", SwinUNETR(in_channels=1, out_channels=1, feature_size=12)),
        ("unet", UNet(3, 1, 2, (4, 8, 8, 16, 16), (2, 2, 2, 1), num_res_units=2, norm="BATCH")),
    ):
        fm = load_foundation(store["files"][(arch, False)], device="cpu")
        report = load_encoder_weights(net, fm.backbone.state_dict(), architecture=arch)
        head = "out." if arch == "swinunetr" else "model.2."
        assert report.dropped and all(k.startswith(head) for k in report.dropped)
        assert report.notes and not set(report.dropped) & set(report.used)
        body = next(k for k in report.used if not k.startswith(head))
        torch.testing.assert_close(net.state_dict()[body], fm.backbone.state_dict()[body])
