"""``lsmfm predict``: a saved task model over a whole volume, block by block, into OME-Zarr.

    lsmfm predict MODEL IMAGE --out OUT.zarr                       # this machine
    lsmfm predict MODEL IMAGE --out OUT.zarr --instances I.zarr    # objects kept whole
    lsmfm predict MODEL IMAGE --out OUT.zarr --workers 4           # a local dask cluster
    lsmfm predict MODEL IMAGE --out OUT.zarr --scheduler tcp://host:8786
    lsmfm predict MODEL IMAGE --out OUT.zarr --resume              # after an interrupted run

MODEL is a folder saved by ``lsmfm segment --save-model``, ``lsmfm train-deblur`` or the
widgets, or ``default-deblur`` (the shipped deblur model). Memory is bounded by the
block, not the volume (:mod:`napari_lsmfm.scale`). Prints one JSON summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import check_outputs, parse_triple, print_summary, user_errors

DEFAULT_DEBLUR = "default-deblur"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "predict",
        help="apply a saved model to a whole volume block by block (larger than memory, "
             "resumable, on a dask.distributed cluster), into OME-Zarr with a pyramid",
        description="Apply a saved segmentation or deblur model to a whole volume, block by "
                    "block, into OME-Zarr outputs with a multiscale pyramid.",
    )
    p.add_argument("model", help=f"a saved task model folder, or {DEFAULT_DEBLUR}")
    p.add_argument("image", help="the volume: a 3D TIFF / OME-TIFF or a Zarr / OME-Zarr folder")
    p.add_argument("--out", required=True,
                   help="OUT.zarr: the class map (segmentation) or the deblurred image")
    p.add_argument("--probabilities", help="P.zarr: per-class probabilities (segmentation)")
    p.add_argument("--prob-dtype", choices=("uint8", "float16", "float32"), default="uint8",
                   help="probability values (default uint8, 255 = 1)")
    p.add_argument("--instances", help="I.zarr: object ids, stitched across block borders")
    p.add_argument("--instance-classes", default=None,
                   help="comma-separated class values to split into objects (default: all)")
    p.add_argument("--block", default=None,
                   help="block z,y,x in voxels (rounded up to whole window steps; default "
                        "four steps per axis)")
    p.add_argument("--no-skip", action="store_true",
                   help="predict every block (default: blocks with nothing brighter than "
                        "the background skip the network)")
    p.add_argument("--threshold", type=float, default=None,
                   help="foreground threshold in the image's units for skipping blocks "
                        "(default: from the volume's histogram)")
    p.add_argument("--workers", type=int, default=None,
                   help="run on a local dask.distributed cluster of N worker processes "
                        "(one per GPU where there are GPUs)")
    p.add_argument("--scheduler", default=None,
                   help="address of a running dask.distributed scheduler (tcp://host:8786); "
                        "its workers must see the same files")
    p.add_argument("--resume", action="store_true",
                   help="continue the partial outputs an interrupted run left")
    p.add_argument("--no-pyramid", action="store_true", help="level 0 only")
    p.add_argument("--weights", default=None,
                   help="foundation weights of a quick-mode segmentation model (default: "
                        "the ones it was saved with)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--tile", default=None, help="prediction window z,y,x in voxels")
    p.add_argument("--voxel-size", default=None,
                   help="z,y,x in micrometres (default: from the image's metadata)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove existing outputs when the run starts, then write new ones")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


@user_errors
def run(args: argparse.Namespace) -> int:
    """Run ``lsmfm predict``; returns the exit status (errors raise ValueError / OSError)."""
    from napari_lsmfm.io.output import check_not_inputs, partial_info

    if args.workers is not None and args.scheduler is not None:
        raise ValueError("give --workers (a local cluster) or --scheduler (an existing one), "
                         "not both")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a partial output, --overwrite replaces it: "
                         "give one of them")
    if args.no_skip and args.threshold is not None:
        raise ValueError("--threshold sets the test --no-skip turns off: give one of them")
    model = _model_path(args.model)
    outputs = {"--out": args.out, "--probabilities": args.probabilities,
               "--instances": args.instances}
    for flag, value in outputs.items():
        if value is not None and not str(value).lower().rstrip("/\\").endswith(".zarr"):
            raise ValueError(f"{flag} {value}: lsmfm predict writes OME-Zarr; name it .zarr")
    inputs = {"the image": args.image, "the model": str(model), "the weights": args.weights}
    if args.resume:  # partial outputs are continued; the others are checked as usual
        check_not_inputs(outputs, inputs)
        fresh = {k: v for k, v in outputs.items()
                 if v is not None and partial_info(Path(v)) is None}
        check_outputs(fresh, {}, overwrite=False, resume=True)
    else:
        check_outputs(outputs, inputs, overwrite=args.overwrite, resume=True)
    classes = None
    if args.instance_classes:
        try:
            classes = [int(v) for v in args.instance_classes.split(",")]
        except ValueError:
            raise ValueError("--instance-classes takes class values like 2,3") from None

    from napari_lsmfm.engine.jobs import JobContext, terminal_progress
    from napari_lsmfm.scale import predict_volume

    show = None if args.quiet else terminal_progress("predict ")
    summary = predict_volume(
        str(model), args.image, args.out, probabilities=args.probabilities,
        instances=args.instances, prob_dtype=args.prob_dtype,
        block=parse_triple(args.block, "block", int), skip_empty=not args.no_skip,
        threshold=args.threshold, resume=args.resume, overwrite=args.overwrite,
        workers=args.workers, scheduler=args.scheduler, pyramid=not args.no_pyramid,
        device=args.device, weights=args.weights, tile=parse_triple(args.tile, "tile", int),
        voxel_size=parse_triple(args.voxel_size, "voxel-size"), instance_classes=classes,
        ctx=JobContext(show),
    )
    if not args.quiet:
        print(f"predict: {summary['predicted']} blocks predicted, {summary['skipped']} "
              f"skipped as empty, {summary['resumed']} done before; "
              f"{summary['voxels_per_second'] / 1e6:.2f} M voxels/s", file=sys.stderr)
    print_summary({"model": str(model), "image": str(args.image), **summary})
    return 0


def _model_path(model: str) -> Path:
    path = Path(model).expanduser()
    if model == DEFAULT_DEBLUR and not path.exists():
        from napari_lsmfm.tasks.deblur.api import DEFAULT_DEBLUR_DIR

        return DEFAULT_DEBLUR_DIR
    if not (path / "config.json").is_file():
        raise ValueError(f"{model}: not a saved napari-lsmfm model (a folder with config.json); "
                         "save one with `lsmfm segment --save-model` or `lsmfm train-deblur`, "
                         f"or use {DEFAULT_DEBLUR}")
    return path
