"""``lsmfm segment``: few-shot segmentation from the command line.

    lsmfm segment IMAGE --labels BRUSHES.tif --out OUT.tif           # train + segment
    lsmfm segment IMAGE --model MODEL --out OUT.zarr                   # apply a saved model
    lsmfm segment IMAGE --labels BRUSHES.tif --out OUT.tif --adapt 300  # adapt the foundation first

Same core as the widget (:class:`~napari_lsmfm.tasks.segment.Segmenter`). Every output
is checked before any work starts (an existing one is refused unless ``--overwrite``;
one that is, holds or lies in an input is refused always; its folder must be writable).
A ``.zarr`` output is filled block by block under a hidden name, so a volume larger
than memory works; a ``.tif`` output is assembled in memory. Outputs appear under their
names only when complete (an interrupted run leaves the old ones). Prints one JSON
object describing the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    Outputs,
    check_outputs,
    in_memory,
    parse_triple,
    print_summary,
    user_errors,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``segment`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "segment",
        help="train on a few brushed slices and segment the whole volume (or apply a model)",
        description=(
            "Few-shot segmentation. Brushes: 0 = not annotated, 1 = background, 2, 3, ... = "
            "classes; the output keeps the class values (background 0)."
        ),
    )
    p.add_argument("image", help="the volume: a 3D TIFF / OME-TIFF or a Zarr / OME-Zarr folder")
    p.add_argument("--labels", help="brush strokes of the image's shape (TIFF or Zarr)")
    p.add_argument("--model", help="apply a model saved with --save-model instead of training")
    p.add_argument(
        "--weights", default=None,
        help="foundation weights (a published lsm_fm .ckpt or a napari-lsmfm folder); "
             "default: the embedded model",
    )
    p.add_argument("--mode", choices=("quick", "full"), default=None,
                   help="quick (frozen features + small head, default) or full (starts from "
                        "the quick model, then finetunes the backbone; GPU recommended)")
    p.add_argument("--out", required=True, help="class map: OUT.tif or OUT.zarr")
    p.add_argument("--probabilities", help="per-class probabilities (C, Z, Y, X): .tif or .zarr")
    p.add_argument("--prob-dtype", choices=("float32", "float16", "uint8"), default="float32",
                   help="probability values: float, or uint8 where 255 = 1")
    p.add_argument("--uncertainty", help="uncertainty map (0-1, where more strokes help most)")
    p.add_argument("--instances", help="instance labels (one id per object) of blob-like classes")
    p.add_argument("--instance-classes", default=None,
                   help="comma-separated class values to split into objects (default: all)")
    p.add_argument("--save-model", help="save the trained model to this folder")
    p.add_argument("--steps", type=int, default=None, help="training steps")
    p.add_argument("--adapt", type=int, default=0, metavar="STEPS",
                   help="first adapt the foundation to this volume with STEPS "
                        "self-supervised pretraining steps on its own patches (masked "
                        "reconstruction + self-distillation; about 0.2 s a step on one CPU "
                        "thread); default 0 = off")
    p.add_argument("--candidate", choices=("auto", "foundation", "filters", "forest"),
                   default=None,
                   help="quick mode's model: auto (default: each is validated on held-out "
                        "strokes and the best is used), foundation (MLP on foundation + "
                        "filter features), filters (MLP on the classical filters alone) or "
                        "forest (random forest on the filters)")
    p.add_argument("--diameter", type=float, default=None,
                   help="typical object diameter in micrometres (voxels when the image has "
                        "no voxel size; default: estimated from the foreground strokes); "
                        "sets the filter scales and the scale the foundation sees the "
                        "volume at")
    p.add_argument("--quick-weight", type=float, default=None,
                   help="full mode: weight (0-1) of the quick model it started from in the "
                        "prediction; default 0.5, 0 = the finetuned network alone")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--tile", default=None, help="prediction window z,y,x in voxels")
    p.add_argument("--voxel-size", default=None,
                   help="z,y,x in micrometres (default: from the image's metadata)")
    p.add_argument("--trust", action="store_true",
                   help="allow a weights file that needs full unpickling (trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


@user_errors
def run(args: argparse.Namespace) -> int:
    """Run ``lsmfm segment``; returns the exit status (errors raise ValueError / OSError)."""
    from napari_lsmfm.engine.jobs import JobContext, terminal_progress
    from napari_lsmfm.io import open_volume
    from napari_lsmfm.io.check import check_volume

    if (args.labels is None) == (args.model is None):
        raise ValueError("give either --labels (train on brush strokes) or --model (apply a "
                         "saved model)")
    if args.model is not None and (args.mode or args.steps or args.candidate
                                   or args.diameter is not None or args.adapt):
        raise ValueError("--mode, --steps, --candidate, --diameter and --adapt belong to "
                         "training; --model applies a saved model")
    if args.adapt < 0:
        raise ValueError(f"--adapt takes a number of steps (0 = off), got {args.adapt}")
    if args.candidate is not None and args.mode == "full":
        raise ValueError("--candidate belongs to quick mode (full mode finetunes the "
                         "foundation's MLP)")
    if args.diameter is not None and not args.diameter > 0:
        raise ValueError(f"--diameter must be a positive number of micrometres, got "
                         f"{args.diameter}")
    if args.quick_weight is not None and args.model is None and args.mode != "full":
        raise ValueError("--quick-weight belongs to full mode: add --mode full")
    paths = check_outputs(
        {"--out": args.out, "--probabilities": args.probabilities,
         "--uncertainty": args.uncertainty, "--instances": args.instances,
         "--save-model": args.save_model},
        {"the image": args.image, "the brushes": args.labels, "the model": args.model,
         "the weights": args.weights},
        overwrite=args.overwrite, folders=("--save-model",),
    )
    out_path, prob_path, unc_path, inst_path, model_path = paths.values()
    tile = parse_triple(args.tile, "tile", int)
    voxel_arg = parse_triple(args.voxel_size, "voxel-size")
    inst_classes = None
    if args.instance_classes:
        try:
            inst_classes = [int(v) for v in args.instance_classes.split(",")]
        except ValueError:
            raise ValueError("--instance-classes takes class values like 2,3") from None

    volume = open_volume(args.image)
    image = volume.data
    check_volume(image)
    voxel_size = voxel_arg or volume.voxel_size

    # torch: only once every check that needs none has passed (bad input fails fast)
    from napari_lsmfm.model import load_foundation
    from napari_lsmfm.tasks.segment import SegmentConfig, Segmenter, SparseLabels

    if args.quick_weight is not None:
        SegmentConfig(quick_weight=args.quick_weight)  # says what is wrong with the value
    image = in_memory(image)

    show = None if args.quiet else terminal_progress("segment ")
    summary: dict[str, Any] = {"image": str(args.image), "shape": list(image.shape)}
    warnings: list[str] = []
    if args.model is not None:
        foundation = (
            load_foundation(args.weights, device=args.device, trusted=args.trust)
            if args.weights is not None else None
        )
        seg = Segmenter.load(args.model, foundation, device=args.device)
        summary["model"] = str(args.model)
    else:
        brushes = open_volume(args.labels).data
        sparse = SparseLabels.from_array(brushes, image.shape)
        foundation = load_foundation(args.weights, device=args.device, trusted=args.trust)
        overrides: dict[str, Any] = {"mode": args.mode or "quick", "voxel_size": voxel_size}
        if args.steps is not None:
            overrides["steps"] = args.steps
        if tile is not None:
            overrides["tile"] = tile
        if args.mode == "full":
            overrides["device"] = args.device
        if args.quick_weight is not None:
            overrides["quick_weight"] = args.quick_weight
        if args.candidate is not None:
            overrides["candidate"] = args.candidate
        if args.diameter is not None:
            overrides["object_diameter"] = args.diameter
        config = SegmentConfig(**overrides)
        if args.adapt:
            foundation, summary["adapt"] = adapt(foundation, image, sparse, config, args.adapt,
                                                 show, model_path)
        seg = Segmenter(foundation, config)
        if show is not None:
            print(f"segment: {sparse.summary()}", file=sys.stderr)
        fit = seg.fit(image, sparse, JobContext(show))
        summary["fit"] = {k: fit[k] for k in ("steps_done", "best_loss", "seconds", "stopped")}
        # which quick-mode model won, its score on held-out strokes, the object scale
        summary["fit"].update({k: fit[k] for k in (
            "candidate", "validation", "validation_metric", "object_diameter_um",
            "diameter_source", "sigmas", "scale_factor") if k in fit})
        if fit.get("validation"):
            summary["fit"]["validation_score"] = fit["validation"][fit["candidate"]]
        warnings += fit.get("warnings", [])
        summary["classes"] = list(seg.classes)
        if model_path is not None:
            seg.save(model_path, overwrite=args.overwrite)
            summary["saved_model"] = str(model_path)
            if args.adapt:
                from napari_lsmfm.model import save_foundation

                save_foundation(foundation, model_path / ADAPTED_FOLDER,
                                extra_config={"adaptation": summary["adapt"]})
    if tile is not None:
        seg.config.tile = tile
    if args.quick_weight is not None:
        if seg.config.mode != "full":
            raise ValueError(f"--quick-weight belongs to full mode; {args.model} is a "
                             f"{seg.config.mode}-mode model")
        if args.quick_weight > 0 and seg.anchor is None:
            raise ValueError(f"{args.model} was saved without the quick model it started "
                             "from (trained with quick weight 0, or by an older version); "
                             "only --quick-weight 0 applies to it")
        seg.config.quick_weight = args.quick_weight

    n_out = len(seg.channel_values)
    cdtype = seg.class_dtype  # uint8, uint16 or uint32: every class value kept
    with Outputs(voxel_size, args.overwrite, command="segment") as outputs:
        targets = {
            "classes": outputs.array(out_path, image.shape, cdtype, "labels"),
            "probabilities": outputs.array(prob_path, (n_out, *image.shape),
                                           np.dtype(args.prob_dtype), "image"),
            "uncertainty": outputs.array(unc_path, image.shape, np.float32, "image"),
            "instances": outputs.array(inst_path, image.shape, np.uint32, "labels"),
        }
        result = seg.predict(
            image, JobContext(show),
            out={k: v for k, v in targets.items() if v is not None},
            probabilities=args.prob_dtype if prob_path is not None else False,
            uncertainty=unc_path is not None,
            instances=(inst_classes or True) if inst_path is not None else False,
        )
        outputs.finish()
    # said once each (fit and predict both see a constant image)
    warnings = list(dict.fromkeys([*warnings, *result.stats.get("warnings", [])]))
    for text in warnings:
        print(f"lsmfm segment: warning: {text}", file=sys.stderr)
    if warnings:
        summary["warnings"] = warnings
    summary["predict_seconds"] = result.stats.get("predict_seconds")
    summary["outputs"] = outputs.written
    print_summary(summary)
    return 0


# where --save-model puts the adapted foundation its head reads (`--model` loads it again)
ADAPTED_FOLDER = "adapted_foundation"


def adapt(foundation: Any, image: Any, sparse: Any, config: Any, steps: int, show: Any,
          model_path: Any) -> tuple[Any, dict]:
    """The foundation adapted to ``image`` (``--adapt``) at the scale quick mode will see
    it (the object scale of the strokes), and what the summary says about it."""
    from napari_lsmfm.engine.jobs import JobContext
    from napari_lsmfm.pretrain.adapt import adapt_foundation
    from napari_lsmfm.tasks.segment.scale import object_scale

    zoom = object_scale(config, sparse.coords, sparse.values, image.shape)["zoom"]
    adapted, report = adapt_foundation(foundation, image, steps=steps, zoom=zoom,
                                       seed=config.seed, ctx=JobContext(show))
    out = {k: report[k] for k in ("steps", "steps_done", "stopped", "seconds", "loss",
                                  "first_loss", "recon", "distill", "patch", "batch", "lr",
                                  "zoom", "fingerprint")}
    if model_path is not None:
        # the saved head reads the adapted features: it records where they come from, so
        # `--model` alone loads them again
        adapted.source = str(Path(model_path).resolve() / ADAPTED_FOLDER)
        out["saved_foundation"] = adapted.source
    return adapted, out
