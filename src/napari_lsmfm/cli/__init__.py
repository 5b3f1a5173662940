"""The ``lsmfm`` command: the plugin's tasks without a viewer.

Each subcommand parses its arguments, calls the same core functions the widgets use,
and turns an expected failure (bad file, existing output) into one line on stderr
and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USER_ERROR = 2


def _cmd_sample(args: argparse.Namespace) -> int:
    from napari_lsmfm.synth import write_samples

    paths = write_samples(Path(args.outdir), overwrite=args.overwrite)
    for p in paths:
        print(p)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from napari_lsmfm.model import inspect_checkpoint

    info = inspect_checkpoint(args.weights, trusted=args.trust, vocab=args.vocab)
    print(json.dumps(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsmfm",
        description="Light-sheet foundation model tasks on the command line.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write the synthetic sample volumes and ground truth")
    p.add_argument("outdir", help="folder for <kind>.tif and <kind>_labels.tif")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_cmd_sample)

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
    p.set_defaults(func=_cmd_info)

    # Task subcommands live beside their tasks; each sets its own `func`.
    from napari_lsmfm.pretrain.cli import add_parser as add_pretrain
    from napari_lsmfm.tasks.cli_deblur import add_parser as add_deblur
    from napari_lsmfm.tasks.cli_segment import add_parser as add_segment

    add_segment(sub)
    add_deblur(sub)
    add_pretrain(sub)
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
        print(f"lsmfm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"lsmfm {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, FileExistsError)) and exc.filename:
        text = f"{exc.strerror or text}: {exc.filename}" if exc.strerror else text
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
