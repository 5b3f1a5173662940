"""Resuming says what it does: no checkpoint (a fresh start), other steps (the schedule
changes), fewer steps than done (refused); the command line resumes with the run's own
steps (issue 19, item 7)."""

import json

import pytest

from napari_lsmfm.pretrain import PretrainConfig, pretrain
from napari_lsmfm.pretrain.checkpointing import checkpoint_path
from napari_lsmfm.pretrain.data import SyntheticCorpus

TINY = {"architecture": "unet", "embed_dim": 8, "channels": [8, 16], "strides": [2],
        "num_res_units": 0}


def tiny_config(**changes) -> PretrainConfig:
    base = dict(steps=2, patch_size=16, batch_size=1, spec=TINY, warmup_steps=1,
                checkpoint_every=1, device="cpu", proj_dim=16, text_width=16, text_layers=1,
                seed=3, objectives=("recon",))
    return PretrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def corpus():
    return SyntheticCorpus(16, n_volumes=2, volume_shape=(20, 24, 24), seed=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_in_an_empty_folder_says_it_starts_afresh(tmp_path, corpus):
    result = pretrain(tiny_config(steps=1), corpus, tmp_path / "m", resume=True)
    assert result["step"] == 1
    assert any("found no checkpoint" in n and "starting afresh" in n for n in result["notes"])


def test_resume_with_other_steps_says_the_schedule_changes(tmp_path, corpus):
    out = tmp_path / "m"
    pretrain(tiny_config(steps=2), corpus, out)
    first = checkpoint_path(out, 1)
    assert first.is_file()
    longer = pretrain(tiny_config(steps=3), corpus, out, resume=first)
    assert longer["step"] == 3
    assert any("had 2 steps, this one has 3" in n and "learning rate changes at step 1" in n
               for n in longer["notes"])
    with pytest.raises(ValueError, match=r"step 3, past the 2 steps asked for; resume with"):
        pretrain(tiny_config(steps=2), corpus, out, resume=True)


def test_the_cli_resumes_with_the_steps_of_the_run(tmp_path, capsys):
    from napari_lsmfm.cli import pretrain as cli

    out = tmp_path / "m"
    common = ["pretrain", "--synthetic", "--synthetic-volumes", "2", "--out", str(out),
              "--patch-size", "16", "--batch-size", "1", "--device", "cpu", "--arch",
              json.dumps(TINY), "--warmup-steps", "1", "--objectives", "recon",
              "--checkpoint-every", "1"]
    assert cli.main([*common, "--steps", "2"]) == 0
    capsys.readouterr()
    assert cli.main([*common, "--resume"]) == 0  # no --steps: the run's 2, not the default
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2
    assert not any("steps" in n for n in result["notes"])
