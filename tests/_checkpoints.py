"""Synthetic checkpoints for tests: the four published lsm_fm layouts and our own format.

The published files cannot be downloaded here, so these are built with the same key
layout and hyper_parameters as `{swinunetr,unet}_{image_text,image_only}_best.ckpt`
(see AdinaScheinfeld/lsm_fm_public_repo, 01-pretraining/scripts/pretrain_module_*.py and
pretrain_*_config.yaml), with random weights. `small=True` shrinks the sizes but keeps
the layout; the BERT text encoder is always tiny unless `bert=BERT_BASE`.
"""

from __future__ import annotations

import copy
import math
import pathlib
from pathlib import Path

import torch
from torch import nn

# Published sizes (the configs in the public repository).
PUBLISHED = {
    ("swinunetr", True): {"feature_size": 36, "embed_dim": 512},
    ("swinunetr", False): {"feature_size": 24, "embed_dim": 512},
    ("unet", True): {
        "channels": (32, 64, 128, 256, 512),
        "strides": (2, 2, 2, 1),
        "embed_dim": 128,
    },
    ("unet", False): {
        "channels": (32, 64, 128, 256, 512),
        "strides": (2, 2, 2, 1),
        "embed_dim": 128,
    },
}
# Same layouts, sizes that run in a fraction of a second on a CPU.
SMALL = {
    "swinunetr": {"feature_size": 12, "embed_dim": 16},
    "unet": {"channels": (4, 8, 8, 16, 16), "strides": (2, 2, 2, 1), "embed_dim": 8},
}
TINY_BERT = {
    "vocab_size": 120,
    "hidden": 64,
    "layers": 2,
    "intermediate": 128,
    "max_positions": 40,
}
BERT_BASE = {
    "vocab_size": 30522,
    "hidden": 768,
    "layers": 12,
    "intermediate": 3072,
    "max_positions": 512,
}
WORDS = [
    "nuclei", "nucleus", "cell", "vessels", "vessel", "amyloid", "plaques", "plaque",
    "stained", "with", "dapi", "lectin", "in", "the", "mouse", "brain", "human", "cortex",
    "light", "sheet", "microscopy", "channel", "nm", "488", "561", "640", "round", "bright",
    "tubular", "network", "of", "and", "a", "an", "blood", "signal", "sparse", "dense",
]  # fmt: skip


def hyper_parameters(arch: str, use_text: bool, sizes: dict) -> dict:
    """The training config as Lightning saved it (`save_hyperparameters(config)`)."""
    model: dict = {
        "use_text": use_text,
        "mask_ratio_warmup": 0.05,
        "warmup_epochs": 30 if arch == "swinunetr" else 20,
        "mask_ratio": 0.3,
        "lr": 0.0001,
        "ema_decay": 0.994 if arch == "swinunetr" else 0.996,
        "mask_patch_size": 8,
        "temp_student": 0.025 if arch == "swinunetr" else 0.1,
        "temp_teacher": 0.1,
        "text_model_name": "../../setup/pretrained_models/bert-base-uncased",
        "embed_dim": sizes["embed_dim"],
        "clip_temperature": 0.1,
        "save_filename": f"pretrained_{arch}",
        "save_dirpath": "../output",
        "max_log_images": 5,
    }
    if arch == "swinunetr":
        model["swinunetr"] = {"feature_size": sizes["feature_size"], "use_checkpoint": True}
    else:
        model["unet"] = {
            "channels": list(sizes["channels"]),
            "strides": list(sizes["strides"]),
            "num_res_units": 2,
            "norm": "BATCH",
        }
    return {
        "training": {
            "seed": 100,
            "project_name": f"pretrain-lsm-{arch}",
            "max_epochs": 500,
            "patience": 200,
            "log_every_n_steps": 5,
            "checkpoint_every_n_epochs": 50,
        },
        "dist": {
            "multi_gpu": True,
            "accelerator": "gpu",
            "strategy": "ddp",
            "devices": 2,
            "num_nodes": 1,
            "precision": "bf16-mixed",
            "accumulate_grad_batches": 8,
            "sync_batchnorm": True,
            "deterministic": False,
        },
        "data": {
            "roots": {"wu": "../sample_patches/wu_brain_patches"},
            "enable": {"connection": False, "wu": True},
            "prompt_jsons": ["../sample_patches/text_prompts_wu.json"],
            "global_batch_size": 16,
            "batch_size": 16,
            "train_frac": 0.9,
            "data_subset_frac": 1.0,
            "per_source_frac": {},
            "per_source_max": {},
            "use_sub_patches": False,
            "base_patch_size": 96,
            "sub_patch_size": 64,
            "num_workers": 1,
            "downsample": {"enabled": True, "target_size": 64},
        },
        "model": model,
        "loss_weights": {
            "distill_weight": 0.5,
            "reconstruction_weight": 0.3,
            "align_weight": 0.05,
            "clip_weight": 0.3,
        },
        "report_weights": {"clip": 0.3, "align": 0.1, "recon": 0.3, "distill": 0.3},
    }


def build_encoder(arch: str, sizes: dict, seed: int = 0) -> nn.Module:
    """The MONAI network the published code builds (student and teacher alike)."""
    torch.manual_seed(seed)
    if arch == "swinunetr":
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(
            in_channels=1, out_channels=sizes["embed_dim"], feature_size=sizes["feature_size"]
        )
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=sizes["embed_dim"],
        channels=tuple(sizes["channels"]),
        strides=tuple(sizes["strides"]),
        num_res_units=2,
        norm="BATCH",
    )


def _randomise_buffers(state: dict, generator: torch.Generator) -> dict:
    """Trained-looking batch-norm statistics, so that a test notices buffers not loaded."""
    out = {}
    for key, value in state.items():
        if key.endswith("running_mean"):
            value = torch.randn(value.shape, generator=generator) * 0.1
        elif key.endswith("running_var"):
            value = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(1000)
        out[key] = value
    return out


def bert_state_dict(spec: dict, generator: torch.Generator, *, pooler: bool = True) -> dict:
    """BertModel weights under transformers' key names (no transformers needed to write them)."""
    h, i = spec["hidden"], spec["intermediate"]

    def w(*shape):
        return torch.randn(shape, generator=generator) * 0.05

    def ln(prefix):
        return {prefix + ".weight": 1 + w(h), prefix + ".bias": w(h)}

    state = {
        "embeddings.word_embeddings.weight": w(spec["vocab_size"], h),
        "embeddings.position_embeddings.weight": w(spec["max_positions"], h),
        "embeddings.token_type_embeddings.weight": w(2, h),
        **ln("embeddings.LayerNorm"),
    }
    for n in range(spec["layers"]):
        p = f"encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
            state[p + name + ".weight"], state[p + name + ".bias"] = w(h, h), w(h)
        state[p + "attention.output.dense.weight"] = w(h, h)
        state[p + "attention.output.dense.bias"] = w(h)
        state.update(ln(p + "attention.output.LayerNorm"))
        state[p + "intermediate.dense.weight"], state[p + "intermediate.dense.bias"] = w(i, h), w(i)
        state[p + "output.dense.weight"], state[p + "output.dense.bias"] = w(h, i), w(h)
        state.update(ln(p + "output.LayerNorm"))
    if pooler:
        state["pooler.dense.weight"], state["pooler.dense.bias"] = w(h, h), w(h)
    return state


def write_bert_vocab(path: Path, vocab_size: int = TINY_BERT["vocab_size"]) -> Path:
    """A WordPiece vocab.txt laid out like BERT's ([PAD], [unusedN], [UNK], [CLS], [SEP],
    [MASK], then words and ## pieces) with exactly `vocab_size` lines."""
    tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokens += ["##s", "##ed", "##ing", "##er", "##ly"]
    n = 0
    while len(tokens) < vocab_size:
        tokens.append(f"[unused{n + 1}]")
        n += 1
    path = Path(path)
    path.write_text("\n".join(tokens[:vocab_size]) + "\n", encoding="utf-8")
    return path


def make_lightning_checkpoint(
    path: str | Path,
    arch: str = "swinunetr",
    use_text: bool = True,
    small: bool = True,
    *,
    seed: int = 0,
    bert: dict | None = None,
    extra: dict | None = None,
    edit_state=None,
    edit_hparams=None,
    legacy: bool = False,
) -> Path:
    """Write a synthetic lsm_fm Lightning checkpoint with the published key layout.

    state_dict: student_encoder.*, teacher_encoder.* (mostly shared with the student, one
    tensor differs), reconstruction_head.decoder.{0,2,4}.*, ema_decay, and for image+text
    logit_scale, text_encoder.* (BERT names, `bert` sizes, tiny by default), text_proj.*,
    image_proj.*. Plus hyper_parameters, optimizer_states, lr_schedulers, callbacks, loops.
    `extra` adds top-level entries; `edit_state` / `edit_hparams` may change the dicts;
    `legacy` writes torch's pre-1.6 (non-zip) format.
    """
    path = Path(path)
    sizes = dict(SMALL[arch] if small else PUBLISHED[(arch, use_text)])
    embed = sizes["embed_dim"]
    generator = torch.Generator().manual_seed(seed)
    student = _randomise_buffers(build_encoder(arch, sizes, seed).state_dict(), generator)
    teacher = dict(student)  # the EMA teacher starts as a copy; shared tensors are saved once
    first = next(iter(teacher))
    teacher[first] = teacher[first] + 0.5  # ...but it has drifted, so loading it would show

    state: dict[str, torch.Tensor] = {}
    state.update({"student_encoder." + k: v for k, v in student.items()})
    state.update({"teacher_encoder." + k: v for k, v in teacher.items()})
    decoder = nn.Sequential(
        nn.Conv3d(embed, 64, 3, padding=1), nn.ReLU(), nn.Conv3d(64, 32, 3, padding=1), nn.ReLU(),
        nn.Conv3d(32, 1, 1),
    )  # fmt: skip
    state.update({"reconstruction_head.decoder." + k: v for k, v in decoder.state_dict().items()})
    if use_text:
        state["logit_scale"] = torch.tensor(math.log(1 / 0.1))
    state["ema_decay"] = torch.tensor(0.994)
    if use_text:
        bert_sizes = bert or TINY_BERT
        for k, v in bert_state_dict(bert_sizes, generator).items():
            state["text_encoder." + k] = v
        text_proj = nn.Sequential(
            nn.Linear(bert_sizes["hidden"], embed), nn.ReLU(), nn.Linear(embed, embed),
            nn.LayerNorm(embed),
        )  # fmt: skip
        image_proj = nn.Sequential(
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(embed, embed), nn.ReLU(),
            nn.Linear(embed, embed), nn.LayerNorm(embed),
        )  # fmt: skip
        for module in (text_proj, image_proj):  # non-trivial LayerNorm parameters
            module[-1].weight.data.uniform_(0.5, 1.5, generator=generator)
            module[-1].bias.data.normal_(0, 0.1, generator=generator)
        state.update({"text_proj." + k: v for k, v in text_proj.state_dict().items()})
        state.update({"image_proj." + k: v for k, v in image_proj.state_dict().items()})

    hparams = hyper_parameters(arch, use_text, sizes)
    if edit_state is not None:
        state = edit_state(state) or state
    if edit_hparams is not None:
        hparams = edit_hparams(hparams) or hparams
    adam_param = {
        "step": torch.tensor(1000.0),
        "exp_avg": torch.zeros(4),
        "exp_avg_sq": torch.zeros(4),
    }
    monitor = "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, 'train_time_interval': None}"  # noqa: E501
    best = f"../output/pretrained_{arch}-epoch=123-val_loss=0.4321.ckpt"
    ckpt = {
        "epoch": 123,
        "global_step": 4567,
        "pytorch-lightning_version": "2.5.1",
        "state_dict": state,
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 4567},
                "epoch_loop.batch_progress": {
                    "total": {"ready": 9000, "completed": 9000, "started": 9000, "processed": 9000},
                    "current": {"ready": 70, "completed": 70, "started": 70, "processed": 70},
                    "is_last_batch": True,
                },
                "epoch_progress": {"total": {"ready": 124, "completed": 123}, "current": {}},
            },
            "validate_loop": {"state_dict": {}, "batch_progress": {"total": {"ready": 8}}},
        },
        "callbacks": {
            monitor: {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(0.4321),
                "best_model_path": best,
                "current_score": torch.tensor(0.4321),
                "dirpath": "../output",
                "best_k_models": {best: torch.tensor(0.4321)},
                "kth_best_model_path": best,
                "kth_value": torch.tensor(0.4321),
                "last_model_path": "",
            },
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 3,
                "stopped_epoch": 0,
                "best_score": torch.tensor(0.4321),
                "patience": 200,
            },
        },
        "optimizer_states": [
            {
                "state": {0: copy.deepcopy(adam_param), 1: copy.deepcopy(adam_param)},
                "param_groups": [
                    {
                        "lr": 0.0001,
                        "betas": (0.9, 0.999),
                        "eps": 1e-08,
                        "weight_decay": 0.01,
                        "amsgrad": False,
                        "maximize": False,
                        "foreach": None,
                        "capturable": False,
                        "differentiable": False,
                        "fused": None,
                        "params": [0, 1],
                    }
                ],
            }
        ],
        "lr_schedulers": [],
        "hparams_name": "config",
        "hyper_parameters": hparams,
    }
    ckpt.update(extra or {})
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


class WritesMarker:
    """Unpickling this calls pathlib.Path.touch(marker): harmless, but it is code running."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def make_malicious_checkpoint(
    path: str | Path, marker: str | Path, arch: str = "unet", *, legacy: bool = False
) -> Path:
    """A valid small lsm_fm checkpoint whose callback state runs code when unpickled."""
    return make_lightning_checkpoint(
        path,
        arch=arch,
        use_text=False,
        extra={"callbacks": {"Evil": WritesMarker(Path(marker))}},
        legacy=legacy,
    )


def small_spec(arch: str = "swinunetr", *, text: str | None = None, proj_dim: int = 16):
    """A small FoundationSpec; text "lsmfm" adds our own text tower config."""
    from napari_lsmfm.model import FoundationSpec, build_lsmfm_text_tower

    sizes = SMALL[arch]
    kwargs = {"architecture": arch, "embed_dim": sizes["embed_dim"]}
    if arch == "swinunetr":
        kwargs["feature_size"] = sizes["feature_size"]
    else:
        kwargs.update(
            channels=sizes["channels"], strides=sizes["strides"], num_res_units=2, norm="BATCH"
        )
    if text is None:
        return FoundationSpec(**kwargs)
    tower = build_lsmfm_text_tower(WORDS, proj_dim, width=32, layers=1, heads=2)
    return FoundationSpec(**kwargs, variant="image_text", proj_dim=proj_dim, text=tower.config())


def make_our_checkpoint(
    folder: str | Path, arch: str = "swinunetr", *, text: str | None = "lsmfm"
) -> Path:
    """A napari-lsmfm model folder (model.safetensors + config.json) with random weights."""
    from napari_lsmfm.model import Foundation, TextTower, save_foundation

    torch.manual_seed(1)
    spec = small_spec(arch, text=text)
    tower = TextTower.from_config(spec.text) if spec.text else None
    foundation = Foundation(spec, text_tower=tower)
    return save_foundation(foundation, folder, extra_config={"trained_by": "tests"})
