"""The one-call deblurring functions: :func:`deblur` (an array in, an array out),
:func:`deblur_volume` (what the viewer runs: a result with its contrast, big results on
disk), the shipped model (:func:`load_default_deblur`, :func:`train_default_deblur`)
and the Richardson-Lucy path."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.engine.tiled import predict_tiled
from napari_lsmfm.io.output import scratch_output

from .config import DEBLUR_SPEC, DeblurConfig
from .deblurrer import Deblurrer
from .intensity import check_deblur_input, output_dtype, to_units
from .result import DeblurResult, contrast_limits
from .rl import (
    check_psf,
    check_psf_sigma,
    check_rl_memory,
    crop_psf,
    gaussian_psf,
    gaussian_size,
    psf_sigma_voxels,
    read_psf,
    richardson_lucy,
)

__all__ = [
    "DEFAULT_DEBLUR_DIR",
    "METHODS",
    "RL_TILE",
    "deblur",
    "deblur_volume",
    "load_default_deblur",
    "train_default_deblur",
]

DEFAULT_DEBLUR_DIR = Path(__file__).resolve().parents[2] / "model" / "default_deblur"
METHODS = ("model", "rl")
RL_TILE = (96, 256, 256)
SCRATCH_BYTES = 2**30  # deblur_volume: larger results go to a temporary Zarr store


def load_default_deblur(device: str | None = None) -> Deblurrer:
    """The shipped deblur model; ValueError saying how to train one when it is absent."""
    if not (DEFAULT_DEBLUR_DIR / "config.json").is_file():
        raise ValueError(
            "no default deblur model is installed; train one with "
            f"`lsmfm train-deblur --out {DEFAULT_DEBLUR_DIR}` or give a saved deblur model "
            "(--weights)"
        )
    return Deblurrer.load(DEFAULT_DEBLUR_DIR, device=device)


def deblur(
    image: Any,
    *,
    method: str = "model",
    model: Deblurrer | str | Path | None = None,
    psf_sigma: float | Sequence[float] | None = None,
    psf_sigma_um: float | Sequence[float] | None = None,
    voxel_size: Sequence[float] | None = None,
    psf: np.ndarray | str | Path | None = None,
    iterations: int | None = None,
    device: str | None = None,
    ctx: Any = None,
    out: Any = None,
) -> Any:
    """Deblur a (Z, Y, X) volume; returns an array of its shape and dtype (or ``out``).

    method "model": the learned deblur model (``model``: a :class:`Deblurrer`, a saved
    model folder, or None for the shipped default). method "rl": Richardson-Lucy with
    the PSF given as ``psf_sigma`` (Gaussian sigmas z, y, x in voxels, or one number),
    ``psf_sigma_um`` (micrometres, with ``voxel_size`` z, y, x in micrometres) or ``psf``
    (an array or a TIFF file); ``iterations`` default 10. Both run window by window with
    Gaussian blending, so dask / zarr volumes larger than memory work with a zarr ``out``.
    The voxel size is not changed (the caller keeps it with the result).
    """
    if method not in METHODS:
        raise ValueError(f"method must be 'model' or 'rl', got {method!r}")
    check_deblur_input(image)
    if method == "model":
        if psf is not None or iterations is not None:
            raise ValueError("a PSF file and iterations belong to Richardson-Lucy "
                             "(method='rl'); the model takes at most the PSF's sigma")
        known = None
        if psf_sigma is not None and psf_sigma_um is not None:
            raise ValueError("give the PSF sigma in voxels or in micrometres, not both")
        if psf_sigma is not None:
            known = psf_sigma_voxels(psf_sigma)
        elif psf_sigma_um is not None:
            known = psf_sigma_voxels(psf_sigma_um, unit="um", voxel_size=voxel_size)
        if known is not None:
            check_psf_sigma(known, image.shape)
        if model is None:
            model = load_default_deblur(device)
        elif not isinstance(model, Deblurrer):
            model = Deblurrer.load(model, device=device)
        elif device is not None:
            model.to_device(device)
        return model.predict(image, ctx, out=out, psf_sigma=known).data
    n_iter = 10 if iterations is None else int(iterations)
    if n_iter < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    tile = rl_tile(image.shape)
    kernel = _resolve_psf(psf_sigma, psf_sigma_um, voxel_size, psf, image.shape, tile)
    check_rl_memory(tile, kernel.shape)
    return _deblur_rl(image, kernel, n_iter, ctx, out, tile)


def deblur_volume(image: Any, ctx: Any = None, *, max_bytes: int = SCRATCH_BYTES,
                  **options: Any) -> DeblurResult:
    """:func:`deblur` as the viewer runs it: the default model is loaded when none is
    given (after the image is checked, so a bad image is named first); a result over
    ``max_bytes`` is written to a temporary Zarr store and comes back as dask (``folder``
    says where; removed when Python exits); the contrast limits are chosen here, off the
    viewer's thread. ``options``: those of :func:`deblur` but ``out``."""
    import dask.array as da

    t0 = time.perf_counter()
    if options.get("method", "model") == "model" and options.get("model") is None:
        check_deblur_input(image)  # say what is wrong with the image before loading
        if ctx is not None:
            ctx.report(0.0, "loading the default deblur model")
        options["model"] = load_default_deblur(options.get("device"))
    out, folder = scratch_output(image.shape, output_dtype(image), max_bytes=max_bytes,
                                 prefix="lsmfm-deblur-")
    data = deblur(image, ctx=ctx, out=out, **options)
    if folder is not None:
        data = da.from_zarr(out)
    if ctx is not None:
        ctx.report(1.0, "choosing contrast limits")
    limits = contrast_limits(data)
    return DeblurResult(data, seconds=time.perf_counter() - t0, folder=folder,
                        model=options.get("model"), contrast_limits=limits)


# ------------------------------------------------------------------ Richardson-Lucy


def rl_tile(shape: Sequence[int]) -> tuple[int, int, int]:
    """The Richardson-Lucy windows (z, y, x) on a volume of ``shape``: :data:`RL_TILE`
    clipped to it."""
    return tuple(min(t, int(s)) for t, s in zip(RL_TILE, shape, strict=True))  # type: ignore


def _resolve_psf(psf_sigma, psf_sigma_um, voxel_size, psf, shape, tile) -> np.ndarray:
    """The PSF kernel, refused when wider than the volume, cut to the kernel a window of
    ``tile`` can use (at most 2 tile + 1 voxels per axis: no change for any PSF that
    fits the window)."""
    given = [v is not None for v in (psf_sigma, psf_sigma_um, psf)]
    if sum(given) != 1:
        raise ValueError(
            "Richardson-Lucy needs exactly one PSF: a Gaussian sigma in voxels (psf_sigma), "
            "in micrometres (psf_sigma_um, with the voxel size) or a PSF (array or TIFF file)"
        )
    if psf is not None:
        kernel = read_psf(psf) if isinstance(psf, str | Path) else check_psf(psf)
        return crop_psf(kernel, tile)
    if psf_sigma is not None:
        sigma = psf_sigma_voxels(psf_sigma)
    else:
        sigma = psf_sigma_voxels(psf_sigma_um, unit="um", voxel_size=voxel_size)
    check_psf_sigma(sigma, shape)
    size = gaussian_size(sigma)
    if any(k > 2 * t + 1 for k, t in zip(size, tile, strict=True)):
        return gaussian_psf(sigma, [min(k, 2 * t + 1) for k, t in zip(size, tile, strict=True)])
    return gaussian_psf(sigma)


def _deblur_rl(image: Any, psf: np.ndarray, iterations: int, ctx: Any, out: Any,
               tile: tuple[int, int, int]) -> Any:
    if out is None:
        out = np.empty(image.shape, output_dtype(image))
    if tuple(out.shape) != tuple(image.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(image.shape)}")
    # windows overlap by at least twice the PSF's half-width: their edges blend away
    overlap = max(0.25, *(min(0.5, 2 * (p // 2) / t) for p, t in zip(psf.shape, tile,
                                                                     strict=True)))

    def fn(windows: np.ndarray) -> np.ndarray:
        if not np.isfinite(windows).all():
            raise ValueError("the image contains NaN or infinite voxels; replace them first")
        return np.stack([richardson_lucy(w[0], psf, iterations)[None] for w in windows])

    dtype = out.dtype

    def sink(sl, values):
        out[sl] = to_units(values[0], 0.0, 1.0, dtype)

    predict_tiled(fn, image, out_channels=1, tile=tile, overlap=overlap, blend="gaussian",
                  sink=sink, ctx=ctx, message="Richardson-Lucy")
    return out


# ------------------------------------------------------------------ shipped weights


def train_default_deblur(
    out: str | Path,
    *,
    steps: int = 3000,
    seed: int = 0,
    device: str = "auto",
    foundation: str | None = "auto",
    overwrite: bool = False,
    ctx: Any = None,
    init: str | Path | None = None,
    sharp: Sequence[str | Path] = (),
    sharp_share: float = 0.5,
    **overrides: Any,
) -> dict:
    """Train the shipped deblur model on synthetic pairs and save it to ``out``
    (``lsmfm train-deblur``).

    ``init``: a saved deblur model to continue from (its network and settings; the
    ``overrides``, e.g. other loss weights, replace its settings), instead of a new one.
    ``sharp``: real sharp volumes (TIFF / Zarr files) imaged through the same synthetic
    optics for a ``sharp_share`` of every batch (:class:`~.pairs.RealPairs`).

    ``foundation``: "auto" starts from the embedded default foundation when one is
    installed, else from a random-initialised :data:`DEBLUR_SPEC` backbone; "small"
    always uses the latter; or a path to foundation weights. Returns the fit summary
    plus the folder written.
    """
    import torch

    from napari_lsmfm.model import Foundation, FoundationSpec, load_foundation
    from napari_lsmfm.model.checkpoints import DEFAULT_MODEL_DIR

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    volumes = [_read_sharp(path) for path in sharp]
    if init is not None:
        model = Deblurrer.load(init, device=device)
        model.config = DeblurConfig.from_dict(
            {**model.config.to_dict(), "steps": steps, "seed": seed, **overrides}
        )
        if model.config.psf_condition:
            model.net.enable_psf_condition()
            model.to_device(device)
        fit = model.fit(None, None, ctx, steps=steps, seed=seed, sharp=volumes,
                        sharp_share=sharp_share)
        model.save(out, overwrite=overwrite)
        return {"folder": str(out), "init": str(init), "steps_done": fit.steps_done,
                "best_loss": fit.best_loss, "seconds": fit.seconds}
    if foundation == "auto":
        foundation = "default" if (DEFAULT_MODEL_DIR / "config.json").is_file() else "small"
    if foundation == "small":
        torch.manual_seed(seed)
        fm = Foundation(FoundationSpec.from_dict(DEBLUR_SPEC), source="memory")
        fm.to_device(device)
    elif foundation == "default":
        fm = load_foundation(None, device=device)
    else:
        fm = load_foundation(foundation, device=device)
    model = Deblurrer(fm, DeblurConfig(steps=steps, seed=seed, **overrides))
    fit = model.fit(None, None, ctx, steps=steps, seed=seed, sharp=volumes,
                    sharp_share=sharp_share)
    model.save(out, overwrite=overwrite)
    return {"folder": str(out), "foundation": fm.source, "steps_done": fit.steps_done,
            "best_loss": fit.best_loss, "seconds": fit.seconds}


def _read_sharp(path: str | Path) -> np.ndarray:
    """A real sharp volume for training, read whole (3D; a 2D or 4D file is refused)."""
    from napari_lsmfm.io import open_volume

    data = np.asarray(open_volume(path).data)
    if data.ndim != 3:
        raise ValueError(f"{path}: a sharp training volume must be 3D (Z, Y, X), got shape "
                         f"{data.shape}")
    return data
