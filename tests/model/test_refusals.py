"""Weights files refused with what was wrong: a plain pickle that runs code (named like
the torch-saved one), an image given as weights, a missing vocabulary, a published
checkpoint missing a few keys (issue 19, items 5 and 7)."""

import os
import pickle

import numpy as np
import pytest

from napari_lsmfm.cli import main
from napari_lsmfm.model import load_foundation
from napari_lsmfm.model.pickled import (
    CheckpointError,
    UnsafeCheckpointError,
    file_kind,
    pickle_globals,
)


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_plain_pickle_that_runs_code_is_named_like_the_torch_saved_one(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _RunsShell(marker)}, handle)
    system = f"{os.system.__module__}.system"  # posix.system (nt.system on Windows)
    assert pickle_globals(path) == [system]  # read from the opcodes, nothing run
    with pytest.raises(UnsafeCheckpointError) as err:
        load_foundation(path, device="cpu")
    message = str(err.value)
    assert system in message and "--trust" in message and "runs that code" in message
    assert "likely succeed" not in message and "\n" not in message
    assert not marker.exists()


def test_lsmfm_info_on_an_image_says_it_is_an_image(tmp_path, capsys):
    from napari_lsmfm.io import write_volume

    image = write_volume(tmp_path / "stack.tif", np.zeros((4, 8, 8), np.uint16))
    assert file_kind(image) == "tiff"
    assert main(["info", str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "TIFF image, not model weights" in err and "text file" not in err
    assert err.count("\n") == 0


def test_lsmfm_info_with_a_missing_vocab_file_is_an_error(tmp_path, capsys):
    assert main(["info", "--vocab", str(tmp_path / "nowhere" / "vocab.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such vocabulary file" in err and "nowhere" in err and err.count("\n") == 0


def test_a_published_checkpoint_missing_a_few_keys_names_them(tmp_path):
    """Three keys of the first UNet layer removed: the message names them, rather than
    calling the file "neither a SwinUNETR nor a UNet"."""
    from _checkpoints import make_lightning_checkpoint

    def drop_first_layer(state):
        return {k: v for k, v in state.items() if not k.startswith("student_encoder.model.0.")}

    path = make_lightning_checkpoint(tmp_path / "unet.ckpt", "unet", False,
                                     edit_state=drop_first_layer)
    with pytest.raises(CheckpointError) as err:
        load_foundation(path, device="cpu")
    message = str(err.value)
    assert "missing" in message and "model.0." in message
    assert "neither a SwinUNETR nor a UNet" not in message
