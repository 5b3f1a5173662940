"""``lsmfm classify``: sort objects, points or tiles into classes from the command line.

    lsmfm classify IMAGE --objects LABELS.tif --examples EXAMPLES.csv --out TABLE.csv
    lsmfm classify IMAGE --points POINTS.csv --prompts "nucleus;blood vessel" --out T.csv
    lsmfm classify IMAGE --tiles 32,64,64 --model PROBE --out T.csv --map MAP.zarr

Same core as the widget (:class:`~napari_lsmfm.tasks.classify.Classifier`). Examples CSV:
``z,y,x,class`` (voxels); points CSV: ``z,y,x`` (or napari's ``axis-0,axis-1,axis-2``).
The table has one row per object, point or tile, in input order: ``z,y,x`` (an object's
centroid), ``label`` (objects), ``class`` (``unknown`` when rejected), ``confidence``.
``--map``: the class map (objects: the labels with class values; tiles: one voxel per
tile), value i + 1 = class i in the table's order, the last value = unknown.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from .common import Outputs, check_outputs, in_memory, parse_triple, print_summary, user_errors


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``classify`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "classify",
        help="classify objects, points or tiles from examples or text prompts",
        description="Few-shot (examples) or zero-shot (prompts) classification; 'unknown' for "
                    "what matches no class.",
    )
    p.add_argument("image", help="the volume: a 3D TIFF / OME-TIFF or a Zarr / OME-Zarr folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--objects", help="labels volume: classify each object (label value)")
    what.add_argument("--points", help="CSV of points z,y,x (voxels) to classify")
    what.add_argument("--tiles", help="tile size z,y,x (or one number): a class per tile")
    p.add_argument("--examples", help="CSV z,y,x,class of examples (voxels)")
    p.add_argument("--prompts", help='class names or descriptions, e.g. "nucleus;blood vessel"; '
                                     "with --examples, priors of their classes")
    p.add_argument("--model", help="apply a classifier saved with --save-model")
    p.add_argument("--out", required=True, help="the table: TABLE.csv")
    p.add_argument("--map", help="class map (objects or tiles): MAP.tif or MAP.zarr")
    p.add_argument("--save-model", help="save the trained classifier to this folder")
    p.add_argument("--weights", default=None, help="foundation weights (default: the embedded "
                                                   "model)")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt for a published text tower")
    p.add_argument("--threshold", type=float, default=None,
                   help="open-set threshold on the score (default: calibrated from the "
                        "examples' leave-one-out scores)")
    p.add_argument("--voxel-size", default=None,
                   help="z,y,x in micrometres (default: from the image's metadata)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--trust", action="store_true",
                   help="allow a weights file that needs full unpickling (trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> dict:
    if args.model is not None and (args.examples or args.prompts):
        raise ValueError("--model applies a saved classifier; --examples and --prompts train "
                         "a new one: give one or the other")
    if args.model is None and not (args.examples or args.prompts):
        raise ValueError("give --examples EXAMPLES.csv (z,y,x,class), --prompts \"a;b\" or "
                         "--model M")
    if args.map is not None and args.points is not None:
        raise ValueError("--map needs --objects or --tiles (points have no map)")
    if not str(args.out).lower().endswith(".csv"):
        raise ValueError(f"{Path(args.out).name}: the table is a CSV file (e.g. table.csv)")
    return check_outputs(
        {"--out": args.out, "--map": args.map, "--save-model": args.save_model},
        {"the image": args.image, "--objects": args.objects, "--points": args.points,
         "--examples": args.examples, "--model": args.model, "--weights": args.weights},
        overwrite=args.overwrite, folders=("--out", "--save-model"))


@user_errors
def run(args: argparse.Namespace) -> int:
    """Run ``lsmfm classify``; returns the exit status (errors raise ValueError / OSError)."""
    from napari_lsmfm.engine.jobs import JobContext, terminal_progress
    from napari_lsmfm.io import open_volume
    from napari_lsmfm.io.check import check_volume
    from napari_lsmfm.model import load_foundation
    from napari_lsmfm.tasks.classify import Classifier, read_examples_csv, read_points_csv

    paths = _check(args)
    tiles = parse_triple(args.tiles, "tiles", int, allow_one=True)
    voxel_arg = parse_triple(args.voxel_size, "voxel-size")
    volume = open_volume(args.image)
    check_volume(volume.data, "classification")
    image = in_memory(volume.data)
    voxel_size = voxel_arg or volume.voxel_size
    inputs: dict[str, Any] = {"tiles": tiles}
    if args.objects is not None:
        inputs["objects"] = np.asarray(open_volume(args.objects).data)
    if args.points is not None:
        inputs["points"] = read_points_csv(args.points)
    examples = read_examples_csv(args.examples) if args.examples else None

    show = None if args.quiet else terminal_progress("classify ")
    foundation = None
    if args.weights is not None or args.model is None:
        foundation = load_foundation(args.weights, device=args.device, trusted=args.trust,
                                     vocab=args.vocab)
    summary: dict[str, Any] = {"image": str(args.image), "shape": list(image.shape)}
    if args.model is not None:
        clf = Classifier.load(args.model, foundation, device=args.device)
        if args.threshold is not None and clf.openset is not None:
            clf.openset.threshold = float(args.threshold)
            clf.openset.calibrated = False  # the user's threshold, on the similarity score
        summary["model"] = str(args.model)
    else:
        clf = Classifier(foundation, voxel_size=voxel_size, unknown_threshold=args.threshold,
                         prompts=tuple((args.prompts or "").split(";")),
                         **({"tile": tiles} if tiles else {}))
        fit = clf.fit(image, examples, JobContext(show),
                      **{k: v for k, v in inputs.items() if k in ("objects", "tiles")
                         and v is not None})
        summary["fit"] = {k: fit[k] for k in ("steps_done", "best_loss", "seconds")
                          if k in fit}
        if "forest_weight" in fit:
            summary["fit"]["forest_share"] = fit["forest_weight"]
        if paths.get("--save-model") is not None:
            clf.save(paths["--save-model"], overwrite=args.overwrite)
            summary["saved_model"] = str(paths["--save-model"])
    with Outputs(voxel_size, args.overwrite, command="classify") as outputs:
        result = clf.predict(image, JobContext(show),
                             **{k: v for k, v in inputs.items() if v is not None})
        if paths.get("--map") is not None:
            class_map = np.asarray(result.class_map())
            target = outputs.array(paths["--map"], class_map.shape, np.uint8, "labels")
            target[...] = class_map
        result.to_csv(paths["--out"])
        outputs.finish()
    summary.update(classes=list(result.class_names), items=len(result.classes),
                   unknown=int(np.sum(result.unknown)), out=str(paths["--out"]),
                   counts={c: result.classes.count(c) for c in dict.fromkeys(result.classes)})
    if paths.get("--map") is not None:
        summary["map"] = str(paths["--map"])
    print_summary(summary)
    return 0
