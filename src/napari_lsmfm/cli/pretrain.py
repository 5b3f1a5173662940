"""``lsmfm pretrain``: pretrain a Foundation from the command line (one process or torchrun).

    lsmfm pretrain DATA --out WEIGHTS [--captions CAPTIONS.json] [--steps N]
                        [--patch-size P] [--batch-size B] ...
    lsmfm pretrain --synthetic --out WEIGHTS          # the rebuildable default corpus
    torchrun --nproc_per_node 4 -m napari_lsmfm.cli pretrain DATA --out WEIGHTS

Bad settings and unreadable data raise ValueError / OSError, which ``lsmfm`` prints as one
line. Only rank 0 prints progress and the final JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from napari_lsmfm.pretrain.config import ARCH_PRESETS, OBJECTIVES, PretrainConfig

from .common import print_summary, run_subcommand


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand to an argparse ``subparsers``; returns its parser."""
    defaults = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a foundation model on unlabelled volumes (or the synthetic corpus)",
        description=(
            "Pretrain a backbone with masked reconstruction, EMA-teacher distillation and "
            "image-text (CLIP) alignment on random 3D patches of unlabelled volumes. Under "
            "torchrun every process trains one replica (DDP)."
        ),
    )
    p.add_argument(
        "data", nargs="?", default=None,
        help="folder (searched recursively) or file of TIFF / Zarr volumes, or synthetic://",
    )
    p.add_argument(
        "--out", required=True, help="output model folder (model.safetensors + config.json)"
    )
    p.add_argument(
        "--captions", default=None,
        help="JSON mapping a folder, file or label name to a description (or a list of them)",
    )
    p.add_argument("--synthetic", action="store_true",
                   help="train on the synthetic light-sheet corpus (no DATA needed)")
    p.add_argument("--synthetic-volumes", type=int, default=None, metavar="N",
                   help="distinct volumes in the synthetic corpus (default 192)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {defaults.steps}; with --resume, those of "
                        "the run being resumed)")
    p.add_argument("--patch-size", type=int, nargs="+", default=[64], metavar="P",
                   help="patch edge in voxels, or three values D H W (default 64)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="patches per step and process")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                   help="steps of learning-rate warm-up and of the warm-up mask ratio")
    p.add_argument(
        "--objectives", default=",".join(defaults.objectives),
        help=f"comma-separated subset of {','.join(OBJECTIVES)} (default: the published "
        "recipe, recon,distill,align,clip; structure needs the synthetic corpus)",
    )
    p.add_argument("--masking", choices=("cube", "intensity"), default=defaults.masking,
                   help="cube: uniform; intensity: masks drawn where the signal is")
    p.add_argument("--channel-separated", action="store_true",
                   help="a different mask per channel of multichannel volumes")
    p.add_argument("--mask-ratio", type=float, default=defaults.mask_ratio)
    p.add_argument("--warmup-mask-ratio", type=float, default=defaults.warmup_mask_ratio)
    p.add_argument("--cube-sizes", type=int, nargs="+", default=list(defaults.cube_sizes))
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    p.add_argument("--arch", default="default",
                   help=f"backbone: {', '.join(ARCH_PRESETS)}, or a JSON spec (text or file)")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between checkpoints in OUT/checkpoints (0: only at the end)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in OUT, or from CHECKPOINT")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if OUT holds a model or checkpoints")
    p.add_argument("--loss-weights", default=None, metavar="NAME=W,...",
                   help="override objectives' loss weights, e.g. structure=2,clip=0.3 "
                        "(defaults: the published recipe; structure 0.5)")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="start from this saved foundation model's weights (a fresh optimizer "
                        "and teacher); to continue an interrupted run use --resume")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=defaults.amp,
                   help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--workers", type=int, default=defaults.num_workers,
                   help="data-loading processes (0: load in the training process)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: all cores; fewer on a busy machine)")
    p.add_argument(
        "--text-model", default=None, metavar="FOLDER",
        help="optional local Hugging Face BERT folder as text tower (needs transformers); "
        "default: our own small offline text tower",
    )
    p.set_defaults(func=run)
    return p


def _spec(arch: str) -> dict:
    if arch in ARCH_PRESETS:
        return dict(ARCH_PRESETS[arch])
    text = arch
    if not arch.lstrip().startswith("{"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ValueError(
                f"--arch {arch!r} is neither a preset ({', '.join(ARCH_PRESETS)}) nor a JSON file"
            )
        text = path.read_text(encoding="utf-8")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--arch is not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise ValueError("--arch must be a JSON object of FoundationSpec fields")
    return spec.get("spec", spec)  # a model's config.json works too


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The :class:`PretrainConfig` described by parsed ``lsmfm pretrain`` arguments."""
    patch = args.patch_size[0] if len(args.patch_size) == 1 else tuple(args.patch_size)
    if len(args.patch_size) not in (1, 3):
        raise ValueError("--patch-size takes one value or three (D H W)")
    return PretrainConfig(
        steps=_steps(args),
        patch_size=patch,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        mask_ratio=args.mask_ratio,
        warmup_mask_ratio=args.warmup_mask_ratio,
        cube_sizes=tuple(args.cube_sizes),
        masking=args.masking,
        channel_separated=args.channel_separated,
        objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()),
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        num_workers=args.workers,
        spec=_spec(args.arch),
        text_model=args.text_model,
        init=args.init,
        loss_weights=_loss_weights(args.loss_weights),
    )


def _steps(args: argparse.Namespace) -> int:
    """``--steps``, or when resuming without it the steps of the run being resumed (so its
    learning-rate schedule stays as it was), else the default."""
    if args.steps is not None:
        return args.steps
    if args.resume not in (None, False):
        from napari_lsmfm.pretrain.checkpointing import latest_checkpoint, load_checkpoint

        path = latest_checkpoint(args.out) if args.resume is True else Path(args.resume)
        if path is not None and path.expanduser().is_file():
            steps = (load_checkpoint(path).get("config") or {}).get("steps")
            if steps:
                return int(steps)
    return PretrainConfig().steps


def _loss_weights(text: str | None) -> dict[str, float]:
    """The ``--loss-weights`` overrides (PretrainConfig fills in the other defaults)."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in OBJECTIVES:
            raise ValueError(
                f"--loss-weights takes NAME=WEIGHT pairs with NAME one of {', '.join(OBJECTIVES)}; "
                f"got {item!r}"
            )
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--loss-weights: {value!r} is not a number") from None
    return out


def _check_out_folder(args: argparse.Namespace, inputs: dict) -> None:
    """Before any work: ``--out`` is not one of ``inputs``, and its folder (or the nearest
    folder above it that exists) can be written to. Whether an existing run folder may be
    reused is pretrain's own rule (--resume / --overwrite)."""
    from napari_lsmfm.io.output import check_not_inputs, check_writable

    out = check_not_inputs({"--out": args.out}, inputs)["--out"]
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    check_writable(existing if existing.is_dir() else existing.parent, out)


def run(args: argparse.Namespace) -> int:
    """Run ``lsmfm pretrain``; prints the final losses as one JSON line; returns 0."""
    from napari_lsmfm.engine.jobs import run_job, terminal_progress
    from napari_lsmfm.pretrain.data import SYNTHETIC_PREFIX, open_source
    from napari_lsmfm.pretrain.loop import pretrain

    if args.synthetic and args.data and not str(args.data).startswith(SYNTHETIC_PREFIX):
        raise ValueError("give either DATA or --synthetic, not both")
    data = SYNTHETIC_PREFIX if args.synthetic else args.data
    if data is None:
        raise ValueError("name the DATA folder of volumes, or use --synthetic")
    real_data = None if str(data).startswith(SYNTHETIC_PREFIX) else data
    _check_out_folder(args, {"DATA": real_data, "--init": args.init, "--captions": args.captions})
    config = config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    source = open_source(
        data, config.patch_size, args.captions, seed=config.seed, n_volumes=args.synthetic_volumes
    )
    main = int(os.environ.get("RANK", "0")) == 0
    result = run_job(
        lambda ctx: pretrain(
            config, source, args.out, ctx, resume=args.resume, overwrite=args.overwrite
        ),
        on_update=terminal_progress("pretrain ") if main else None,
    )
    if main:
        print_summary(result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``lsmfm pretrain ...`` alone (``argv`` starts with "pretrain"); errors are raised,
    not printed (for tests and scripts)."""
    return run_subcommand(add_parser, argv)
