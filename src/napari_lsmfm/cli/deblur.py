"""``lsmfm deblur``: deblur a volume from the command line.

    lsmfm deblur IMAGE --out OUT.tif                              # the shipped model
    lsmfm deblur IMAGE --out OUT.zarr --weights MY_MODEL          # a saved deblur model
    lsmfm deblur IMAGE --out OUT.tif --method rl --psf-sigma 3,1,1 --iterations 10
    lsmfm deblur IMAGE --out OUT.tif --method rl --psf-file psf.tif

Same core as the widget (:func:`napari_lsmfm.tasks.deblur.deblur`). The output keeps the
image's shape, dtype and voxel size. A ``.zarr`` output is filled block by block, so a
volume larger than memory works; a ``.tif`` output is assembled in memory. An existing
output is refused unless ``--overwrite``. Prints one JSON object describing the run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

# Output checks and the in-memory limit are the segment command's: one behaviour for both.
from .cli_segment import IN_MEMORY_BYTES, _check_output


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


def _numbers(text: str, name: str, kind=float, allow_one: bool = False) -> tuple:
    try:
        values = tuple(kind(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--{name} must be numbers z,y,x, got {text!r}") from None
    if allow_one and len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"--{name} must be three positive numbers z,y,x, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    """Run ``lsmfm deblur``; returns the exit status (errors raise ValueError / OSError)."""
    from napari_lsmfm.engine.tiled import DeviceMemoryError

    try:
        return _run(args)
    except DeviceMemoryError as exc:
        raise ValueError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    from napari_lsmfm.engine.jobs import JobContext, terminal_progress
    from napari_lsmfm.io import open_volume, write_volume

    from .deblur import Deblurrer, check_deblur_input, deblur, load_default_deblur

    if args.method == "model" and (args.psf_file is not None or args.iterations is not None):
        raise ValueError("--psf-file and --iterations belong to --method rl (the model takes "
                         "at most --psf-sigma)")
    if args.method == "rl":
        if args.weights is not None:
            raise ValueError("--weights belongs to --method model; rl needs a PSF instead")
        if (args.psf_sigma is None) == (args.psf_file is None):
            raise ValueError("--method rl needs a PSF: give --psf-sigma z,y,x or --psf-file")
    out_path = _check_output(args.out, args.overwrite)
    if args.psf_file is not None and not Path(args.psf_file).expanduser().is_file():
        raise FileNotFoundError(2, "no PSF file here", str(args.psf_file))
    tile = _numbers(args.tile, "tile", int) if args.tile else None
    voxel_arg = _numbers(args.voxel_size, "voxel-size") if args.voxel_size else None

    volume = open_volume(args.image)
    image = volume.data
    voxel_size = voxel_arg or volume.voxel_size
    nbytes = int(np.prod(image.shape)) * np.dtype(image.dtype).itemsize
    if nbytes <= IN_MEMORY_BYTES:
        image = np.asarray(image)
    check_deblur_input(image)  # before loading a model: bad input fails fast

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
        sigma = _numbers(args.psf_sigma, "psf-sigma", allow_one=True)
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

    target = None
    if out_path.name.lower().endswith(".zarr"):
        import dask.array as da
        import zarr

        chunks = (64, 256, 256)
        empty = da.zeros(image.shape, dtype=image.dtype, chunks=chunks)
        write_volume(out_path, empty, voxel_size=voxel_size, overwrite=args.overwrite,
                     chunks=chunks)
        target = zarr.open_array(str(out_path / "0"), mode="r+")
    show = None if args.quiet else terminal_progress("deblur ")
    t0 = time.perf_counter()
    result = deblur(image, ctx=JobContext(show), out=target, **options)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if target is None:
        write_volume(out_path, result, voxel_size=voxel_size, overwrite=args.overwrite)
    summary["out"] = str(out_path)
    summary["voxel_size"] = list(voxel_size) if voxel_size else None
    print(json.dumps(summary))
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
