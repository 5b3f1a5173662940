"""DDP pretraining: two CPU processes (gloo) train a few steps and end with identical weights.

The processes get the environment torchrun would give them (RANK, WORLD_SIZE, MASTER_ADDR,
...), so ``pretrain`` joins the process group itself, exactly as under
``torchrun --nproc_per_node 2 -m napari_lsmfm.cli pretrain ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

import pytest
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, results: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from napari_lsmfm.pretrain import PretrainConfig, SyntheticCorpus, pretrain

    config = PretrainConfig(
        steps=3, patch_size=32, batch_size=1, warmup_steps=1, checkpoint_every=2, device="cpu",
        spec={"architecture": "unet", "embed_dim": 8, "channels": [8, 16, 32],
              "strides": [2, 2], "num_res_units": 1},
        proj_dim=16, text_width=16, text_layers=1, seed=7,
    )
    corpus = SyntheticCorpus(32, n_volumes=3, volume_shape=(36, 36, 36), seed=2)
    first = corpus.sample(np.random.default_rng([7, rank, 0, 0]))  # what BatchStream draws
    result = pretrain(config, corpus, out)
    result["first_patch"] = hashlib.sha256(first.image.tobytes()).hexdigest()
    with open(os.path.join(results, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP on Windows is not set up here")
def test_two_cpu_ranks_end_identical(tmp_path):
    out = tmp_path / "model"
    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(
        _worker, args=(_free_port(), str(out), str(results)), nprocs=WORLD, join=True,
        start_method="spawn",
    )
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["step"] == 3 for r in ranks)
    # Different data per rank, identical weights: the gradients were averaged.
    assert ranks[0]["first_patch"] != ranks[1]["first_patch"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"])  # logged as the rank mean
    assert ranks[0]["clip"] > 0  # CLIP over both ranks' images and every label's caption

    # Only rank 0 wrote, and what it wrote is the weights both ranks hold.
    from napari_lsmfm.model import load_foundation
    from napari_lsmfm.pretrain import weights_digest

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_000002.pt", "step_000003.pt"
    ]
    record = json.loads((out / "config.json").read_text())["training"]
    assert record["hardware"]["world_size"] == WORLD
    assert weights_digest(load_foundation(out, device="cpu")) == ranks[0]["weights_sha256"]
