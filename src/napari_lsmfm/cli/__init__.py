"""The ``lsmfm`` command: the plugin's tasks without a viewer.

Each subcommand parses its arguments, calls the same core functions the widgets use,
and turns an expected failure (bad file, existing output) into one line on stderr
and a non-zero exit status, never a traceback. One module per task (``segment``,
``deblur``, ``pretrain``) adds its subcommand; :mod:`.common` holds what they share.
Building the parser imports neither torch nor monai: each task imports them when it runs.

    lsmfm sample OUTDIR                         # synthetic volumes and ground truth
    lsmfm info [WEIGHTS] [--check]              # describe foundation weights (JSON)
    lsmfm segment IMAGE --labels BRUSHES --out OUT.tif
    lsmfm deblur IMAGE --out OUT.tif
    lsmfm predict MODEL IMAGE --out OUT.zarr    # whole volumes block by block, resumable, dask
    lsmfm train-deblur --out MODEL --steps N    # the shipped deblur model, retrained
    lsmfm pretrain DATA --out WEIGHTS           # or: torchrun ... -m napari_lsmfm.cli pretrain
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import EXIT_USER_ERROR, one_line

__all__ = ["EXIT_USER_ERROR", "build_parser", "main"]


def run_sample(args: argparse.Namespace) -> int:
    """Run ``lsmfm sample``: write the sample volumes; prints one path a line."""
    from napari_lsmfm.synth import write_samples

    paths = write_samples(Path(args.outdir), overwrite=args.overwrite)
    for p in paths:
        print(p)
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Run ``lsmfm info``: print the description of foundation weights as one JSON object."""
    from napari_lsmfm.model import inspect_checkpoint

    info = inspect_checkpoint(args.weights, trusted=args.trust, vocab=args.vocab,
                              check=args.check)
    print(json.dumps(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``lsmfm`` parser with every subcommand; each sets ``func(args) -> exit status``."""
    parser = argparse.ArgumentParser(
        prog="lsmfm",
        description="Light-sheet foundation model tasks on the command line.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write the synthetic sample volumes and ground truth")
    p.add_argument("outdir", help="folder for <kind>.tif and <kind>_labels.tif")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=run_sample)

    p = sub.add_parser("info", help="describe foundation weights as one JSON object")
    p.add_argument(
        "weights", nargs="?", default=None,
        help="a published lsm_fm .ckpt or a napari-lsmfm model; default: the embedded model",
    )
    p.add_argument("--vocab", default=None, help="BERT vocab.txt for a published text tower")
    p.add_argument(
        "--trust", action="store_true",
        help="allow a checkpoint that needs full unpickling (can run code: trusted files only)",
    )
    p.add_argument(
        "--check", action="store_true",
        help="also load the weights into the network, proving every tensor fits (slower: "
        "builds the network); without it the file is described from its config and shapes",
    )
    p.set_defaults(func=run_info)

    # Each task's module adds its subcommand(s); importing one does not import the others.
    from . import classify, deblur, predict, pretrain, segment

    segment.add_parser(sub)
    deblur.add_parser(sub)
    deblur.add_train_parser(sub)
    pretrain.add_parser(sub)
    classify.add_parser(sub)
    predict.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lsmfm``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        # VolumeError and CheckpointError are ValueErrors; missing or existing files
        # are OSErrors. LSMFM_DEBUG=1 shows the traceback.
        if os.environ.get("LSMFM_DEBUG"):
            raise
        print(f"lsmfm {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"lsmfm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        from napari_lsmfm.engine.device import is_out_of_memory

        if os.environ.get("LSMFM_DEBUG") or not is_out_of_memory(exc):
            raise
        print(f"lsmfm {args.command}: error: out of memory ({one_line(exc)[:160]}); use "
              "smaller windows (--tile), a .zarr output (written block by block) or a machine "
              "with more memory", file=sys.stderr)
        return EXIT_USER_ERROR
