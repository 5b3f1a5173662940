"""``lsmfm deblur``: deblur a volume from the command line; ``lsmfm train-deblur``: train
a deblur model on synthetic pairs.

    lsmfm deblur IMAGE --out OUT.tif                              # the shipped model
    lsmfm deblur IMAGE --out OUT.zarr --weights MY_MODEL          # a saved deblur model
    lsmfm deblur IMAGE --out OUT.tif --method rl --psf-sigma 3,1,1 --iterations 10
    lsmfm deblur IMAGE --out OUT.tif --method rl --psf-file psf.tif
    lsmfm train-deblur --out MODEL --steps 3000 [--psf-condition ...]

Same core as the widget (:func:`napari_lsmfm.tasks.deblur.deblur`). The output keeps the
image's shape, dtype and voxel size. A ``.zarr`` output is filled block by block, so a
volume larger than memory works; a ``.tif`` output is assembled in memory. Either
appears under its name only when complete. An existing output is refused unless
``--overwrite``; one that is or lies in an input always. Prints one JSON object
describing the run.
``train-deblur`` calls :func:`napari_lsmfm.tasks.deblur.train_default_deblur`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .common import (
    Outputs,
    check_outputs,
    in_memory,
    parse_triple,
    print_summary,
    user_errors,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``deblur`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "deblur",
        help="deblur a volume with the deblur model or Richardson-Lucy",
        description=(
            "Deblur a 3D stack. The output has the image's shape, dtype and voxel size."
        ),
    )
    p.add_argument("image", help="the volume: a 3D TIFF / OME-TIFF or a Zarr / OME-Zarr folder")
    p.add_argument("--out", required=True, help="the deblurred volume: OUT.tif or OUT.zarr")
    p.add_argument("--method", choices=("model", "rl"), default="model",
                   help="model (default) or rl (Richardson-Lucy, needs a PSF)")
    p.add_argument("--weights", default=None,
                   help="a saved deblur model folder (default: the shipped model)")
    p.add_argument("--psf-sigma", default=None,
                   help="Gaussian PSF sigma z,y,x (or one number): needed by rl; the "
                        "model uses it when it is PSF-conditioned (the shipped one is), else "
                        "it deblurs blind")
    p.add_argument("--psf-unit", choices=("voxel", "um"), default="voxel",
                   help="unit of --psf-sigma: voxels (default) or micrometres (uses the "
                        "voxel size)")
    p.add_argument("--psf-file", default=None, help="Richardson-Lucy: a 3D TIFF of the PSF")
    p.add_argument("--iterations", type=int, default=None,
                   help="Richardson-Lucy iterations (default 10)")
    p.add_argument("--voxel-size", default=None,
                   help="z,y,x in micrometres (default: from the image's metadata)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (model)")
    p.add_argument("--tile", default=None, help="model prediction window z,y,x in voxels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


@user_errors
def run(args: argparse.Namespace) -> int:
    """Run ``lsmfm deblur``; returns the exit status (errors raise ValueError / OSError)."""
    from napari_lsmfm.engine.jobs import JobContext, terminal_progress
    from napari_lsmfm.io import open_volume
    from napari_lsmfm.io.check import check_volume

    if args.method == "model" and (args.psf_file is not None or args.iterations is not None):
        raise ValueError("--psf-file and --iterations belong to --method rl (the model takes "
                         "at most --psf-sigma)")
    if args.method == "rl":
        if args.weights is not None:
            raise ValueError("--weights belongs to --method model; rl needs a PSF instead")
        if (args.psf_sigma is None) == (args.psf_file is None):
            raise ValueError("--method rl needs a PSF: give --psf-sigma z,y,x or --psf-file")
    out_path = check_outputs(
        {"--out": args.out},
        {"the image": args.image, "the model": args.weights, "the PSF": args.psf_file},
        overwrite=args.overwrite,
    )["--out"]
    if args.psf_file is not None and not Path(args.psf_file).expanduser().is_file():
        raise FileNotFoundError(2, "no PSF file here", str(args.psf_file))
    tile = parse_triple(args.tile or None, "tile", int)
    voxel_arg = parse_triple(args.voxel_size or None, "voxel-size")

    volume = open_volume(args.image)
    image = volume.data
    voxel_size = voxel_arg or volume.voxel_size
    image = in_memory(image)
    # before loading a model: bad input fails fast
    check_volume(image, "deblurring", values=True, min_size=2)
    from napari_lsmfm.tasks.deblur import Deblurrer, deblur, load_default_deblur  # torch

    options: dict[str, Any] = {"method": args.method}
    summary: dict[str, Any] = {"image": str(args.image), "shape": list(image.shape),
                               "dtype": str(image.dtype), "method": args.method}
    if args.method == "model":
        model = (load_default_deblur(args.device) if args.weights is None
                 else _load_model(Deblurrer, args.weights, args.device))
        if tile is not None:
            model.config.tile = tile
        options["model"] = model
        summary["model"] = args.weights or "default"
        summary["device"] = str(model.device)
    if args.method == "rl" and args.psf_file is not None:
        options["psf"] = args.psf_file
        summary["psf"] = str(args.psf_file)
    elif args.psf_sigma is not None:
        sigma = parse_triple(args.psf_sigma, "psf-sigma", allow_one=True)
        if args.psf_unit == "um":
            if voxel_size is None:
                raise ValueError(
                    "--psf-unit um needs the voxel size: the image's metadata has none; "
                    "give --voxel-size z,y,x or the sigma in voxels"
                )
            options.update(psf_sigma_um=sigma, voxel_size=voxel_size)
        else:
            options["psf_sigma"] = sigma
        summary["psf_sigma"] = [*sigma, args.psf_unit]
    if args.method == "rl":
        options["iterations"] = args.iterations
        summary["iterations"] = args.iterations or 10

    # the checked image holds integers or floats: the output keeps its dtype
    show = None if args.quiet else terminal_progress("deblur ")
    t0 = time.perf_counter()
    with Outputs(voxel_size, args.overwrite, command="deblur") as outputs:
        target = outputs.array(out_path, image.shape, image.dtype, "image")
        deblur(image, ctx=JobContext(show), out=target, **options)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        outputs.finish()
    summary["out"] = str(out_path)
    summary["voxel_size"] = list(voxel_size) if voxel_size else None
    print_summary(summary)
    return 0


def _load_model(cls, path: str, device: str):
    try:
        return cls.load(path, device=device)
    except ValueError as err:
        if "not a napari-lsmfm task model" in str(err) or "not a saved napari-lsmfm" in str(err):
            raise ValueError(
                f"--weights takes a saved deblur model folder (config.json + safetensors); "
                f"{path} is not one"
            ) from None
        raise


# ------------------------------------------------------------------ lsmfm train-deblur


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train-deblur`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "train-deblur",
        help="train a deblur model (the shipped one's recipe) on synthetic pairs",
        description=(
            "Train the shipped deblur model on synthetic pairs and save it to OUT "
            "(model.safetensors + config.json). Prints the fit summary as one JSON object."
        ),
    )
    p.add_argument("--out", required=True, metavar="OUT",
                   help="folder to write (the shipped one is napari_lsmfm/model/default_deblur)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--foundation", default="auto",
                   help="auto (the default foundation if installed, else small), small, "
                        "or a path to foundation weights")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (2e-3)")
    p.add_argument("--l2", type=float, default=None,
                   help="weight of the mean-squared-error term of the loss (10)")
    p.add_argument("--psnr", type=float, default=None,
                   help="weight of the per-patch log-MSE (PSNR) term of the loss (0)")
    p.add_argument("--psf-condition", action="store_true",
                   help="the network also takes the PSF sigmas when known (non-blind)")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="continue from a saved deblur model instead of a new network")
    p.add_argument("--patch-size", default=None,
                   help="training patch z,y,x in voxels (32,64,64)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--sharp", nargs="+", default=(), metavar="VOLUME",
                   help="real sharp volumes (TIFF / Zarr) imaged through the same synthetic "
                        "optics beside the synthetic pairs")
    p.add_argument("--sharp-share", type=float, default=0.5,
                   help="share of each batch from the --sharp volumes (0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=run_train)
    return p


@user_errors
def run_train(args: argparse.Namespace) -> int:
    """Run ``lsmfm train-deblur``; prints the fit summary as one JSON line; returns 0."""
    foundation = args.foundation if args.foundation not in ("auto", "small") else None
    inputs = {"the model": args.init, "the foundation": foundation,
              **{f"--sharp {path}": path for path in args.sharp}}
    check_outputs({"--out": args.out}, inputs, overwrite=args.overwrite,
                  folders=("--out",))  # before any training
    extra: dict[str, Any] = {
        k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                          ("l2", args.l2), ("psnr", args.psnr)) if v is not None
    }
    if args.psf_condition:
        extra["psf_condition"] = True
    if args.patch_size:
        extra["patch_size"] = parse_triple(args.patch_size, "patch-size", int)

    import torch

    from napari_lsmfm.engine.jobs import JobContext, terminal_progress
    from napari_lsmfm.tasks.deblur import train_default_deblur

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train_default_deblur(
        args.out, steps=args.steps, seed=args.seed, device=args.device,
        foundation=args.foundation, overwrite=args.overwrite,
        ctx=JobContext(terminal_progress("deblur ")), init=args.init, sharp=args.sharp,
        sharp_share=args.sharp_share, **extra,
    )
    print_summary(summary)
    return 0
