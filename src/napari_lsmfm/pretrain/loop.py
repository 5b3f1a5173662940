"""The pretraining loop: student Foundation + EMA teacher, masked objectives, CLIP, DDP.

One step: draw the rank's batch, mask cubes of each patch, run the student on the masked
patches and the teacher on the full ones, and minimise a weighted sum of

- ``recon``: masked L1 reconstruction through a light conv decoder,
- ``distill``: KL between teacher and student feature distributions on masked voxels,
- ``align``: cosine distance between each image embedding and its caption's,
- ``clip``: symmetric InfoNCE between image and caption embeddings (learnable temperature),
- ``structure`` (ours, opt-in): BCE + soft Dice of a linear read-out of the dense features
  against the structure mask, where the data know it (the synthetic corpus),

then move the teacher towards the student (EMA). Runs on one device, or on several under
``torchrun`` (PyTorch DDP: NCCL on CUDA, gloo on CPU), in bf16 autocast on CUDA. Rank 0
reports progress through a :class:`~napari_lsmfm.engine.jobs.JobContext`, writes resumable
checkpoints every N steps and, at the end, the Foundation in our format.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import platform
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from napari_lsmfm.engine.jobs import Cancelled, JobContext
from napari_lsmfm.model import (
    Foundation,
    FoundationSpec,
    build_lsmfm_text_tower,
    build_vocab,
    resolve_device,
    save_foundation,
)
from napari_lsmfm.model.backbones import count_parameters

from .data import BatchStream, PatchSource, as_patch_size, open_source
from .masking import MASKING_MODES, apply_mask, cube_mask, mask_ratio_at
from .objectives import (
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    ReconstructionHead,
    StructureHead,
    alignment_loss,
    clip_loss,
    distillation_loss,
    ema_update,
    structure_loss,
)

OBJECTIVES = ("recon", "distill", "align", "clip", "structure")
# The published recipe's objectives (the default); "structure" needs data with masks.
PUBLISHED_OBJECTIVES = ("recon", "distill", "align", "clip")
TEXT_OBJECTIVES = ("align", "clip")
# The published recipe's loss weights, plus ours for "structure".
DEFAULT_LOSS_WEIGHTS = {"distill": 0.5, "recon": 0.3, "align": 0.05, "clip": 0.3,
                        "structure": 0.5}
# The embedded default backbone: small enough to finetune on a laptop CPU (see README).
DEFAULT_SPEC = {
    "architecture": "unet",
    "embed_dim": 16,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 0,
    "norm": "INSTANCE",
}
# Named backbones for --arch: the default, and the published sizes (GPU territory).
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT_SPEC,
    "unet-published": {
        "architecture": "unet",
        "embed_dim": 128,
        "channels": [32, 64, 128, 256, 512],
        "strides": [2, 2, 2, 1],
        "num_res_units": 2,
        "norm": "BATCH",
    },
    "swinunetr-published": {"architecture": "swinunetr", "embed_dim": 512, "feature_size": 36},
    "swinunetr-small": {"architecture": "swinunetr", "embed_dim": 48, "feature_size": 12},
}
CHECKPOINT_FORMAT = "napari-lsmfm-pretrain"
_MAX_LABEL_NEGATIVES = 256
CHECKPOINT_DIR = "checkpoints"
_CKPT_NAME = re.compile(r"^step_(\d+)\.pt$")


@dataclass
class PretrainConfig:
    """Everything that shapes a pretraining run (all JSON-ready; ``to_dict``/``from_dict``).

    steps: optimizer steps in total. patch_size: voxels (int or (D, H, W)). batch_size:
    patches per step and rank (a C-channel patch gives C single-channel items).
    lr, weight_decay: AdamW; the learning rate warms up linearly over ``warmup_steps`` and
    then follows a cosine down to ``min_lr_ratio * lr``.
    mask_ratio: fraction of cubes masked; ``warmup_mask_ratio`` during the first
    ``warmup_steps``. cube_sizes: cube edges in voxels, one drawn per patch.
    masking: "cube" (uniform) or "intensity" (where the signal is). channel_separated: a
    different mask per channel of multichannel data.
    objectives: any of "recon", "distill", "align", "clip" (the published recipe, the
    default) and "structure" (needs a source with structure masks: the synthetic corpus).
    loss_weights: per objective.
    ema_decay: teacher momentum. teacher_temp, student_temp: distillation temperatures.
    recon_kernel: kernel of the reconstruction head's first two convolutions (1 or 3).
    grad_clip: max gradient norm (None: off). checkpoint_every: steps between checkpoints
    (0: only at the end); keep_checkpoints: how many to keep (0: all).
    seed: of weights, data and masks. device: auto / cpu / cuda[:N] / mps (under torchrun
    each rank uses cuda:LOCAL_RANK). amp: "auto" (bf16 on CUDA, fp16 where bf16 is missing,
    off elsewhere), "bf16", "fp16" or "off". num_workers: data-loading processes.
    spec: the backbone (FoundationSpec fields without text; see ``DEFAULT_SPEC``).
    proj_dim, text_width, text_layers, text_tokenizer: the image-text space and our own
    text tower, whose vocabulary is built from the captions and stored in the weights.
    clip_all_labels: besides the batch's captions, CLIP contrasts each image with one
    description of every other label (captions through labels), so batches of two work.
    text_model: optional local folder of a Hugging Face BERT (config.json, weights,
    vocab.txt; needs ``transformers``) used as the text tower instead of ours, as in the
    published model: frozen during the warm-up, then its top ``text_trainable_layers``
    layers train at ``text_lr_scale * lr``.
    init: a saved Foundation folder (or model.safetensors) the student starts from instead
    of random weights (its architecture and text tower replace ``spec``); the optimizer
    and the teacher start afresh. For continuing a finished model with other objectives;
    an interrupted run continues with ``resume`` instead.
    """

    steps: int = 3000
    patch_size: int | tuple[int, int, int] = 64
    batch_size: int = 2
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    mask_ratio: float = 0.3
    warmup_mask_ratio: float = 0.05
    cube_sizes: tuple[int, ...] = (8, 16)
    masking: str = "cube"
    channel_separated: bool = False
    objectives: tuple[str, ...] = PUBLISHED_OBJECTIVES
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    ema_decay: float = 0.994
    teacher_temp: float = 0.025
    student_temp: float = 0.1
    recon_kernel: int = 1
    grad_clip: float | None = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    num_workers: int = 0
    spec: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SPEC))
    proj_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_tokenizer: str = "trigram"
    clip_all_labels: bool = True
    text_model: str | None = None
    text_trainable_layers: int = 4
    text_lr_scale: float = 0.1
    init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.objectives, str):
            self.objectives = tuple(o for o in self.objectives.split(",") if o.strip())
        wanted = {str(o).strip() for o in self.objectives}
        unknown = sorted(wanted - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"unknown objectives {unknown}: choose from {', '.join(OBJECTIVES)}")
        if not wanted:
            raise ValueError(f"at least one objective is needed: {', '.join(OBJECTIVES)}")
        self.objectives = tuple(o for o in OBJECTIVES if o in wanted)
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **dict(self.loss_weights)}
        self.patch_size = as_patch_size(self.patch_size)
        self.cube_sizes = tuple(int(c) for c in self.cube_sizes)
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {MASKING_MODES}, got {self.masking!r}")
        for name in ("mask_ratio", "warmup_mask_ratio", "ema_decay"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.cube_sizes or min(self.cube_sizes) < 1:
            raise ValueError(f"cube sizes must be positive, got {self.cube_sizes}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        FoundationSpec.from_dict(dict(self.spec))  # fail early on a bad architecture

    def to_dict(self) -> dict:
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        out["cube_sizes"] = list(self.cube_sizes)
        out["objectives"] = list(self.objectives)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(data).items() if k in known})


# --------------------------------------------------------------------------- the model


class PretrainModel(nn.Module):
    """What the optimizer trains (and DDP wraps): the student Foundation, the reconstruction
    head, the CLIP temperature and the structure head. ``forward(x, texts, voxels)``
    returns dense features (N, E, D, H, W), the reconstruction at the ``voxels``
    (N, D, H, W bool) as (M, 1) or None, image embeddings (N, P) or None, text embeddings
    (T, P) or None (both L2-normalised) and structure logits (N, 1, D, H, W) or None."""

    def __init__(self, student: Foundation, recon_kernel: int | None, clip: bool,
                 structure: bool = False) -> None:
        super().__init__()
        self.student = student
        self.recon_head = (
            ReconstructionHead(student.spec.embed_dim, 1, recon_kernel)
            if recon_kernel is not None
            else None
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT)) if clip else None
        self.structure_head = StructureHead(student.spec.embed_dim) if structure else None

    def forward(
        self,
        x: torch.Tensor,
        texts: Sequence[str] | None = None,
        voxels: torch.Tensor | None = None,
    ):
        dense = self.student(x)
        recon = None
        if self.recon_head is not None and voxels is not None:
            recon = self.recon_head.forward_voxels(dense, voxels)
        image = text = None
        if texts is not None:
            image = self.student.pool_embedding(dense)  # the embedding embed_image returns
            text = F.normalize(self.student.text_tower(list(texts)).float(), dim=-1)
        structure = self.structure_head(dense) if self.structure_head is not None else None
        return dense, recon, image, text, structure


def build_student(config: PretrainConfig, captions_texts: Sequence[str]) -> Foundation:
    """A randomly initialised Foundation for ``config.spec``; image+text with our own text
    tower (vocabulary from ``captions_texts``) when a text objective is on."""
    spec_dict = {k: v for k, v in dict(config.spec).items() if k not in ("variant", "text")}
    use_text = any(o in config.objectives for o in TEXT_OBJECTIVES)
    if not use_text:
        return Foundation(FoundationSpec.from_dict({**spec_dict, "variant": "image_only"}))
    if config.text_model:
        tower = external_text_tower(config.text_model, config.proj_dim)
    else:
        vocab = build_vocab(captions_texts, tokenizer=config.text_tokenizer)
        heads = 4 if config.text_width % 4 == 0 else 1
        tower = build_lsmfm_text_tower(
            vocab,
            config.proj_dim,
            width=config.text_width,
            layers=config.text_layers,
            heads=heads,
            tokenizer=config.text_tokenizer,
        )
    spec = FoundationSpec.from_dict(
        {**spec_dict, "variant": "image_text", "proj_dim": config.proj_dim, "text": tower.config()}
    )
    return Foundation(spec, text_tower=tower)


def external_text_tower(folder: str | os.PathLike, proj_dim: int):
    """A "bert" TextTower from a local Hugging Face BERT folder (no download): its weights,
    its vocab.txt, and a fresh projection to ``proj_dim``. Raises ValueError when the
    folder is not a BERT or ``transformers`` is missing."""
    from napari_lsmfm.model import TextTower, TextTowerUnavailable
    from napari_lsmfm.model.text import bert_config_from_state

    folder = Path(folder).expanduser()
    if not (folder / "vocab.txt").is_file() or not (folder / "config.json").is_file():
        raise ValueError(
            f"--text-model {folder} must be a local BERT folder with config.json, the weights "
            "and vocab.txt (e.g. what transformers' save_pretrained writes)"
        )
    try:
        from transformers import BertModel

        bert = BertModel.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise ValueError(
            "--text-model needs the optional package transformers: "
            "pip install 'napari-lsmfm[text]'"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--text-model {folder}: not a readable BERT ({exc})") from None
    state = bert.state_dict()
    config = bert_config_from_state(state, proj_dim=proj_dim, name=folder.name)
    try:
        tower = TextTower.from_config(config, vocab=folder / "vocab.txt")
    except TextTowerUnavailable as exc:
        raise ValueError(str(exc)) from None
    missing, _ = tower.encoder.load_state_dict(state, strict=False)
    weights = {k for k, v in tower.encoder.named_parameters()}
    if weights & set(missing):
        raise ValueError(f"--text-model {folder}: weights missing for {sorted(missing)[:3]}")
    return tower


def _student_from_spec(spec: FoundationSpec, config: PretrainConfig) -> Foundation:
    """A Foundation for a saved spec (resume), text tower included."""
    from napari_lsmfm.model import TextTower

    tower = None
    if spec.text is not None:
        vocab = Path(config.text_model) / "vocab.txt" if config.text_model else None
        tower = TextTower.from_config(spec.text, vocab=vocab)
    return Foundation(spec, text_tower=tower)


def _student_from_init(config: PretrainConfig, objectives: Sequence[str]) -> Foundation:
    """The student for ``config.init``: a saved Foundation, read on the CPU."""
    from napari_lsmfm.model import load_foundation

    try:
        student = load_foundation(config.init, device="cpu")
    except (OSError, ValueError) as exc:
        raise ValueError(f"--init {config.init}: not a readable foundation model ({exc})") from None
    if any(o in objectives for o in TEXT_OBJECTIVES) and student.text_tower is None:
        raise ValueError(
            f"--init {config.init} has no text tower, but align / clip were asked for; "
            "drop them (--objectives recon,distill,...) or start afresh"
        )
    if student.text_tower is not None and student.text_tower.kind == "bert":
        raise ValueError("--init with a BERT text tower is not supported; start afresh")
    return student.train()


def _text_encoder_groups(student: Foundation, config: PretrainConfig) -> list[nn.Parameter]:
    """Freeze a BERT text encoder except its top layers; returns those trainable parameters
    (they get their own optimizer group). Our own small tower trains whole: []."""
    tower = student.text_tower
    if tower is None or tower.kind != "bert":
        return []
    tower.encoder.requires_grad_(False)
    layers = tower.encoder.encoder.layer
    keep = max(0, min(config.text_trainable_layers, len(layers)))
    for layer in layers[len(layers) - keep :]:
        layer.requires_grad_(True)
    return [p for p in tower.encoder.parameters() if p.requires_grad]


def _teacher_of(student: Foundation) -> Foundation:
    teacher = copy.deepcopy(student)
    teacher.text_tower = None
    teacher.image_proj = None
    teacher.requires_grad_(False)
    return teacher.eval()


# --------------------------------------------------------------------------- distributed


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _setup_world(device_name: str) -> _World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) or when a caller
    already initialised one; otherwise a single process on ``device_name``."""
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        else:
            device = resolve_device("cpu" if device_name == "auto" else device_name)
        return _World(rank, size, device, owns_group=False)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _World(0, 1, resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith(("cpu", "mps"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return _World(dist.get_rank(), dist.get_world_size(), device, owns_group=True)


def _amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    from napari_lsmfm.model import amp_dtype

    return amp_dtype(device)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / CHECKPOINT_DIR / f"step_{step:06d}.pt"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step under ``out/checkpoints``, or None."""
    folder = Path(out).expanduser() / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_NAME.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a pretraining checkpoint (``weights_only=True``: plain tensors and containers).
    Raises ValueError when the file is not one."""
    path = Path(path).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle refusals, ...
        raise ValueError(
            f"{path} is not a readable pretraining checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); resume from another "
            f"step_*.pt or start afresh"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a napari-lsmfm pretraining checkpoint")
    return state


def _write_checkpoint(path: Path, state: dict, keep: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash never leaves half a checkpoint under the real name
    if keep > 0:
        older = sorted(
            (int(m.group(1)), p) for p in path.parent.iterdir() if (m := _CKPT_NAME.match(p.name))
        )
        for _, old in older[:-keep]:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the loop


def lr_at(step: int, config: PretrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step, 1]).generate_state(1)[0])


def _identity(item):
    return item


def _hardware(world: _World) -> dict:
    out = {
        "device": str(world.device),
        "world_size": world.size,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if world.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(world.device)
    return out


def pretrain(
    config: PretrainConfig,
    data: PatchSource | str | os.PathLike,
    out: str | os.PathLike,
    ctx: JobContext | None = None,
    resume: bool | str | os.PathLike | None = None,
    *,
    captions: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Pretrain a Foundation and write it to ``out`` (model.safetensors + config.json).

    Args:
        config: the run's :class:`PretrainConfig`.
        data: a patch source (:class:`~napari_lsmfm.pretrain.data.PatchDataset`,
            :class:`~napari_lsmfm.pretrain.data.SyntheticCorpus`), a folder or file of
            volumes, or ``"synthetic://"``.
        out: output folder; checkpoints go to ``out/checkpoints/step_NNNNNN.pt``.
        ctx: progress and cancel (``ctx.report`` each step with the loss terms); on cancel
            a checkpoint of the last finished step is written, then ``Cancelled`` is raised.
        resume: True resumes from the latest checkpoint in ``out`` (or starts afresh when
            there is none); a path resumes from that checkpoint; None/False starts afresh.
        captions: a captions JSON, used when ``data`` is a path.
        overwrite: start afresh even when ``out`` already holds a model or checkpoints.

    Returns a dict: ``step`` (steps done), ``loss`` and each active term averaged over the
    last ``min(50, max(1, steps // 10))`` steps, ``logit_scale``, ``wall_time_s``, ``out``
    and ``weights_sha256`` (this rank's final weights, see :func:`weights_digest`).
    Raises ValueError for bad settings or data, FileExistsError when ``out`` is in use.
    """
    ctx = ctx if ctx is not None else JobContext()
    out = Path(out).expanduser()
    world = _setup_world(config.device)
    try:
        return _pretrain(config, data, out, ctx, resume, captions, overwrite, world)
    finally:
        if world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _pretrain(config, data, out, ctx, resume, captions, overwrite, world: _World) -> dict:
    started = time.perf_counter()
    device = world.device
    main = world.rank == 0

    ckpt_path: Path | None = None
    if resume not in (None, False):
        ckpt_path = latest_checkpoint(out) if resume is True else Path(resume).expanduser()
    elif not overwrite and (
        (out / "model.safetensors").exists() or latest_checkpoint(out) is not None
    ):
        raise FileExistsError(
            17,
            "the output folder already holds a model or checkpoints; resume the run "
            "(--resume) or choose another folder (or --overwrite)",
            str(out),
        )
    state = load_checkpoint(ckpt_path) if ckpt_path is not None else None

    source = data
    if isinstance(data, (str, os.PathLike)):
        source = open_source(data, config.patch_size, captions, seed=config.seed)
    if tuple(source.patch_size) != tuple(config.patch_size):
        raise ValueError(
            f"the data source draws {source.patch_size} patches but the config asks for "
            f"{config.patch_size}"
        )
    has_captions = bool(getattr(source, "has_captions", bool(source.captions.labels)))
    objectives = list(config.objectives)
    notes: list[str] = []
    if not has_captions and any(o in objectives for o in TEXT_OBJECTIVES):
        dropped = [o for o in objectives if o in TEXT_OBJECTIVES]
        objectives = [o for o in objectives if o not in TEXT_OBJECTIVES]
        notes.append(f"no captions matched the data: {', '.join(dropped)} switched off")
        if not objectives:
            raise ValueError(
                "only image-text objectives were asked for but the data have no captions; "
                "give a captions JSON (--captions) or add recon / distill"
            )
    if "structure" in objectives and not getattr(source, "has_masks", False):
        objectives = [o for o in objectives if o != "structure"]
        notes.append("the data have no structure masks: structure switched off")
        if not objectives:
            raise ValueError(
                "only the structure objective was asked for but the data have no structure "
                "masks (only the synthetic corpus has them); add recon / distill"
            )
    run_config = PretrainConfig.from_dict({**config.to_dict(), "objectives": objectives})

    # The same seed gives the same initial weights on every rank (DDP also broadcasts them).
    torch.manual_seed(run_config.seed)
    if state is not None:
        student = _student_from_spec(FoundationSpec.from_dict(state["spec"]), run_config)
    elif run_config.init:
        student = _student_from_init(run_config, objectives)
        notes.append(f"started from the weights in {run_config.init}")
        run_config.spec = {k: v for k, v in student.spec.to_dict().items()
                           if k not in ("variant", "text", "proj_dim")}
    else:
        student = build_student(run_config, source.captions.texts())
    use_text = student.text_tower is not None and any(o in objectives for o in TEXT_OBJECTIVES)
    model = PretrainModel(
        student,
        run_config.recon_kernel if "recon" in objectives else None,
        clip="clip" in objectives,
        structure="structure" in objectives,
    ).to(device)
    teacher = _teacher_of(student).to(device) if "distill" in objectives else None
    start_step = 0
    elapsed_before = 0.0
    if state is not None:
        missing, _ = model.load_state_dict(state["model"], strict=False)
        if any(k.startswith("student.") for k in missing):
            raise ValueError(f"{ckpt_path} does not hold this model's weights; start afresh")
        if teacher is not None and state.get("teacher") is not None:
            teacher.backbone.load_state_dict(state["teacher"])
        start_step = int(state["step"])
        elapsed_before = float(state.get("wall_time_s", 0.0))
        notes.append(f"resumed from {ckpt_path.name} at step {start_step}")
    model.train()
    if not use_text:  # kept as loaded, not trained (DDP wants every trained weight used)
        for part in (student.text_tower, student.image_proj):
            if part is not None:
                part.requires_grad_(False)
    text_encoder = _text_encoder_groups(student, run_config) if use_text else []
    encoder_ids = {id(p) for p in text_encoder}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": run_config.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if text_encoder:  # the published recipe: frozen in the warm-up, then the top layers train
        groups.append({
            "params": text_encoder, "weight_decay": 0.01,
            "lr_scale": run_config.text_lr_scale, "frozen_in_warmup": True,
        })
    optimizer = torch.optim.AdamW(groups, lr=run_config.lr)
    dtype = _amp_dtype(run_config.amp, device)
    scaler = None
    if dtype == torch.float16:  # fp16 needs loss scaling; bf16 does not
        make = getattr(torch.amp, "GradScaler", None)
        scaler = make(device.type) if make is not None else torch.cuda.amp.GradScaler()
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"{ckpt_path} was written with other objectives ({exc}); resume with the "
                "objectives of that run, or start afresh"
            ) from None
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if state.get("torch_rng") is not None:
            torch.set_rng_state(state["torch_rng"])

    net: nn.Module = model
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    stream = BatchStream(source, run_config.batch_size, seed=run_config.seed, rank=world.rank,
                         steps=run_config.steps)
    batches: Iterable[dict]
    if run_config.num_workers > 0:
        batches = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            sampler=range(start_step, run_config.steps),
            num_workers=run_config.num_workers,
            collate_fn=_identity,
            pin_memory=device.type == "cuda",
        )
    else:
        batches = (stream[s] for s in range(start_step, run_config.steps))

    weights = run_config.loss_weights
    label_texts = [source.captions.labels[name] for name in source.captions.label_names]
    window = min(50, max(1, run_config.steps // 10))
    history: list[dict[str, float]] = list(state.get("history", [])) if state else []
    step = start_step
    spec_dict = student.spec.to_dict()

    def checkpoint(at: int) -> None:
        _sync_buffers(model, teacher, world)
        if main:
            _write_checkpoint(
                checkpoint_path(out, at),
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": 1,
                    "step": at,
                    "spec": spec_dict,
                    "config": run_config.to_dict(),
                    "model": model.state_dict(),
                    "teacher": teacher.backbone.state_dict() if teacher is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "torch_rng": torch.get_rng_state(),
                    "history": history[-window:],
                    "wall_time_s": elapsed_before + time.perf_counter() - started,
                },
                run_config.keep_checkpoints,
            )
        if world.distributed:
            dist.barrier()

    if main and notes:
        ctx.report(start_step / run_config.steps, "; ".join(notes), step=start_step)
    try:
        for batch in batches:
            terms = _train_step(
                net, model, teacher, batch, step, run_config, objectives, use_text, optimizer,
                scaler, dtype, world, weights, label_texts,
            )
            step += 1
            history.append(terms)
            del history[:-window]
            if main:
                with contextlib.suppress(Cancelled):  # handled below, on every rank
                    ctx.report(
                        step / run_config.steps,
                        f"step {step}/{run_config.steps}",
                        step=step,
                        **{k: float(v) for k, v in terms.items()},
                    )
            stop = ctx.cancelled
            if world.distributed:
                flag = torch.tensor([float(stop)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                checkpoint(step)
                raise Cancelled(f"pretraining stopped at step {step}; resume with --resume")
            if run_config.checkpoint_every > 0 and step % run_config.checkpoint_every == 0:
                checkpoint(step)
    except KeyboardInterrupt:
        if not world.distributed and step > start_step:  # Ctrl-C: keep what was done
            checkpoint(step)
        raise
    else:
        if run_config.checkpoint_every <= 0 or step % run_config.checkpoint_every != 0:
            checkpoint(step)
    finally:
        if hasattr(batches, "close"):
            batches.close()

    wall = elapsed_before + time.perf_counter() - started
    final = {
        k: float(np.mean([h[k] for h in history if k in h]))
        for k in ["loss", *objectives]
        if any(k in h for h in history)
    }
    if model.logit_scale is not None:
        student.logit_scale = float(model.logit_scale.detach().clamp(max=LOGIT_SCALE_MAX))
    if main:
        record = {
            "config": run_config.to_dict(),
            "objectives": objectives,
            "steps": step,
            "final_losses": final,
            "wall_time_s": round(wall, 1),
            "hardware": _hardware(world),
            "data": source.describe(),
            "captions": {k: list(v) for k, v in source.captions.labels.items()},
            "parameters": {
                "backbone": count_parameters(student.backbone),
                "total": count_parameters(student),
            },
            "notes": notes,
        }
        save_foundation(student.eval(), out, extra_config={"training": record})
    if world.distributed:
        dist.barrier()
    return {
        "step": step,
        **final,
        "logit_scale": student.logit_scale,
        "wall_time_s": wall,
        "out": str(out),
        "weights_sha256": weights_digest(student),
    }


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (keys, dtypes, shapes and bytes): equal digests mean
    identical weights (used to check that DDP ranks agree)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _sync_buffers(model: nn.Module, teacher: nn.Module | None, world: _World) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics drift apart between DDP's
    per-step broadcasts), so checkpoints and final weights are identical on all ranks."""
    if not world.distributed:
        return
    for module in (model, teacher):
        if module is None:
            continue
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def _step_texts(
    texts_per_item: Sequence[str | None],
    ids_per_item: Sequence[int],
    captioned: Sequence[int],
    label_texts: Sequence[Sequence[str]],
    all_labels: bool,
    generator: torch.Generator,
) -> tuple[list[str], list[int]]:
    """The captions to embed this step and their label ids: the batch's own (deduplicated),
    then with ``all_labels`` one description of every other label (at most
    ``_MAX_LABEL_NEGATIVES``), so CLIP has negatives even when the batch has one label."""
    texts: list[str] = []
    ids: list[int] = []
    for i in captioned:
        if texts_per_item[i] not in texts:
            texts.append(texts_per_item[i])
            ids.append(int(ids_per_item[i]))
    if all_labels and texts:
        present = set(ids)
        others = [label for label in range(len(label_texts)) if label not in present]
        if len(others) > _MAX_LABEL_NEGATIVES:
            pick = torch.randperm(len(others), generator=generator)[:_MAX_LABEL_NEGATIVES]
            others = [others[int(k)] for k in sorted(pick.tolist())]
        for label in others:
            options = label_texts[label]
            texts.append(options[int(torch.randint(len(options), (1,), generator=generator))])
            ids.append(label)
    return texts, ids


def _gather_labelled(
    rows: torch.Tensor, ids: torch.Tensor, world: _World
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows, ids) concatenated, rows differentiably (DDP); unchanged alone."""
    if not world.distributed:
        return rows, ids
    from torch.distributed.nn.functional import all_gather

    count = torch.tensor([rows.shape[0]], device=rows.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    total = int(count.item())
    if total == 0:
        return rows, ids
    padded = rows.new_zeros((total, *rows.shape[1:]))
    padded = padded.index_copy(0, torch.arange(rows.shape[0], device=rows.device), rows)
    padded_ids = torch.full((total,), -2, dtype=torch.long, device=rows.device)
    padded_ids[: ids.shape[0]] = ids
    gathered_ids = [torch.empty_like(padded_ids) for _ in range(world.size)]
    dist.all_gather(gathered_ids, padded_ids)
    all_ids = torch.cat(gathered_ids)
    keep = all_ids != -2  # the padding of ranks with fewer rows
    return torch.cat(all_gather(padded))[keep], all_ids[keep]


def _train_step(
    net, model, teacher, batch, step, config, objectives, use_text, optimizer, scaler, dtype,
    world, weights, label_texts,
) -> dict[str, float]:
    """One optimizer step; returns the loss terms (averaged over ranks) as floats."""
    device = world.device
    generator = torch.Generator().manual_seed(_step_seed(config.seed, world.rank, step))
    ratio = mask_ratio_at(step, config.warmup_steps, config.warmup_mask_ratio, config.mask_ratio)
    images, masks = [], []
    for image in batch["images"]:
        image = image.to(device, non_blocking=True).float()
        mask = cube_mask(
            image[None], ratio, config.cube_sizes, mode=config.masking,
            channel_separated=config.channel_separated, generator=generator,
        )[0]
        images.append(image)
        masks.append(mask)
    # Channels become items: the backbone takes one channel, each with its own mask.
    x = torch.cat(images).unsqueeze(1)
    mask = torch.cat(masks).unsqueeze(1)
    ids = batch["label_ids"].to(device)
    texts_per_item = batch["texts"]
    captioned = [i for i, t in enumerate(texts_per_item) if t is not None]

    texts: list[str] | None = None
    text_ids: list[int] = []
    if use_text:
        texts, text_ids = _step_texts(
            texts_per_item, batch["label_ids"].tolist(), captioned, label_texts,
            "clip" in objectives and config.clip_all_labels, generator,
        )
        # A step without captions still runs the text tower, so DDP sees every parameter used.
        if not texts:
            texts, text_ids = [next(iter(model.student.text_tower.vocabulary[2:]), "none")], [-1]
    for group in optimizer.param_groups:
        frozen = group.get("frozen_in_warmup", False) and step < config.warmup_steps
        group["lr"] = 0.0 if frozen else lr_at(step, config) * group.get("lr_scale", 1.0)

    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    terms: dict[str, torch.Tensor] = {}
    with autocast:
        voxels = mask[:, 0]
        dense, recon, image_emb, text_emb, structure = net(
            apply_mask(x, mask), texts, voxels if "recon" in objectives else None
        )
        if "recon" in objectives:
            # Masked L1: the head only ran on the masked voxels.
            target = x[:, 0][voxels]
            terms["recon"] = (
                (recon[:, 0].float() - target).abs().mean() if target.numel() else recon.sum() * 0
            )
        if "distill" in objectives:
            with torch.no_grad():
                target = teacher(x)
            terms["distill"] = distillation_loss(
                dense, target, mask, config.student_temp, config.teacher_temp
            )
        if "structure" in objectives:
            # Items (channels) of patches with a mask; the others do not count.
            targets, rows = [], []
            item = 0
            masks = batch.get("masks") or [None] * len(batch["images"])
            for image, m in zip(batch["images"], masks, strict=True):
                for _ in range(image.shape[0]):
                    if m is not None:
                        targets.append(m)
                        rows.append(item)
                    item += 1
            if rows:
                pick = torch.tensor(rows, dtype=torch.long, device=device)
                target = torch.stack(targets).unsqueeze(1).to(device).float()
                terms["structure"] = structure_loss(structure.index_select(0, pick), target)
            else:
                terms["structure"] = structure.sum() * 0.0
    zero = dense.new_zeros(())
    if use_text:
        first = {}
        for j, t in enumerate(texts):
            first.setdefault(t, j)
        rows = torch.tensor([first[texts_per_item[i]] for i in captioned], dtype=torch.long,
                            device=device)
        cap = torch.tensor(captioned, dtype=torch.long, device=device)
        img = image_emb.float().index_select(0, cap)
        # Keep every parameter in the graph even when this rank has no captioned item.
        zero = zero + 0.0 * (image_emb.sum() + text_emb.sum())
        if "align" in objectives:
            own = text_emb.float().index_select(0, rows)
            terms["align"] = alignment_loss(img, own) if captioned else zero.clone()
        if "clip" in objectives:
            zero = zero + 0.0 * model.logit_scale
            all_img, img_ids = _gather_labelled(img, ids.index_select(0, cap), world)
            txt_ids = torch.tensor(text_ids, dtype=torch.long, device=device)
            all_txt, all_txt_ids = _gather_labelled(text_emb.float(), txt_ids, world)
            keep = all_txt_ids >= 0  # the placeholder text of a step without captions
            terms["clip"] = clip_loss(
                all_img, all_txt[keep], model.logit_scale, img_ids, all_txt_ids[keep]
            )
    loss = zero + sum(weights[k] * v for k, v in terms.items())

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], config.grad_clip
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if model.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
    if teacher is not None:
        ema_update(teacher.backbone, model.student.backbone, config.ema_decay)

    values = torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
    if world.distributed:
        dist.all_reduce(values)
        values /= world.size
    out = dict(zip(["loss", *terms], values.tolist(), strict=True))
    out["lr"] = lr_at(step, config)
    out["mask_ratio"] = ratio
    return out
