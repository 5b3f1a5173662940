"""`lsmfm info` describes weights without building the network: the same description as
loading them, for every layout, and MONAI is imported only where a file needs it."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from _checkpoints import make_lightning_checkpoint, make_our_checkpoint, write_bert_vocab
from napari_lsmfm.model import CheckpointError, inspect_checkpoint, read_torch_checkpoint

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
LAYOUTS = [("swinunetr", True), ("swinunetr", False), ("unet", True), ("unet", False)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    out = {f"{a}_{t}": make_lightning_checkpoint(root / f"{a}_{t}.ckpt", a, t) for a, t in LAYOUTS}
    out["ours_swinunetr"] = make_our_checkpoint(root / "ours_swin", "swinunetr")
    out["ours_unet"] = make_our_checkpoint(root / "ours_unet", "unet")
    out["ours_unet_no_text"] = make_our_checkpoint(root / "ours_plain", "unet", text=None)
    out["vocab"] = write_bert_vocab(root / "vocab.txt")
    return out


@pytest.mark.parametrize("name", [f"{a}_{t}" for a, t in LAYOUTS]
                         + ["ours_swinunetr", "ours_unet", "ours_unet_no_text", "default"])
def test_description_without_building_equals_loading(files, name):
    path = None if name == "default" else files[name]
    described = inspect_checkpoint(path)
    loaded = inspect_checkpoint(path, check=True)
    assert described == loaded
    assert described["parameters"] > 1000


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the BERT tower needs transformers")
@pytest.mark.parametrize("arch", ["swinunetr", "unet"])
def test_description_with_the_bert_tower_equals_loading(files, arch):
    path, vocab = files[f"{arch}_True"], files["vocab"]
    described = inspect_checkpoint(path, vocab=vocab)
    assert described["text_tower"] is True and described["text_tower_kind"] == "bert"
    assert described == inspect_checkpoint(path, vocab=vocab, check=True)


def test_batch_norm_statistics_are_not_parameters(tmp_path):
    """The published UNet uses batch norm: its running statistics are in the file but are
    buffers, not parameters (the published count, 19.0 M, holds without them)."""
    path = make_lightning_checkpoint(tmp_path / "unet.ckpt", "unet", False)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.endswith("running_mean") for k in state)
    info = inspect_checkpoint(path)
    assert info["norm"] == "BATCH" and info == inspect_checkpoint(path, check=True)


def test_a_file_with_a_missing_part_is_refused_without_building(tmp_path):
    folder = make_our_checkpoint(tmp_path / "model", "unet")
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("image_proj.")}
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="image_proj"):
        inspect_checkpoint(folder)


def test_a_checkpoint_holding_a_metatensor_still_loads_weights_only(tmp_path):
    """MONAI's MetaTensor stays allowed; MONAI is imported only for such a file."""
    from monai.data import MetaTensor

    path = tmp_path / "meta.ckpt"
    torch.save({"w": MetaTensor(torch.ones(2)), "plain": torch.zeros(1)}, path)
    plain = tmp_path / "plain.ckpt"
    torch.save({"plain": torch.zeros(1)}, plain)
    code = (
        "import sys; from napari_lsmfm.model import read_torch_checkpoint as read; "
        f"read({str(plain)!r}); before = 'monai' in sys.modules; "
        f"loaded = read({str(path)!r}); print(before, type(loaded['w']).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "MetaTensor"]
    assert float(read_torch_checkpoint(path)["w"].sum()) == 2.0


def test_building_a_network_keeps_transformers_out_of_monai():
    """MONAI's TransChex would import transformers (seconds) with every network; only the
    BERT tower needs it, and it still imports afterwards."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from napari_lsmfm.model import load_foundation\n"
        "f = load_foundation(None)\n"
        "print('monai' in sys.modules, 'transformers' in sys.modules)\n"
        "import transformers\n"
        "print(transformers.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "transformers"]
