"""The trainable deblur model on a foundation: fitted, used and saved as one unit."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from napari_lsmfm.engine.device import memory_guard, with_smaller_tiles
from napari_lsmfm.engine.grid import region_box
from napari_lsmfm.engine.store import (
    check_foundation,
    foundation_record,
    load_task_model,
    save_task_model,
)
from napari_lsmfm.engine.tiled import predict_tiled
from napari_lsmfm.engine.train import FitReport, TrainLoop, grad_scaler
from napari_lsmfm.model.foundation import normalize_window

from .config import DeblurConfig
from .intensity import (
    HEADROOM,
    INTENSITY_PERCENTILES,
    check_deblur_input,
    deblur_range,
    output_dtype,
    to_units,
    volume_sample,
)
from .losses import DeblurLoss
from .net import DeblurNet, backbone_copy, psf_code
from .pairs import synthetic_batches, volume_batches
from .result import DeblurResult
from .rl import psf_sigma_voxels

__all__ = ["Deblurrer", "next_batch", "optimiser", "training_code"]


class Deblurrer:
    """A trainable deblur model on a foundation: the unit that is fitted, used and saved.

    >>> model = Deblurrer(foundation)                 # backbone copied, head at identity
    >>> model.fit(steps=400)                          # synthetic pairs
    >>> model.fit(image, (3, 1, 1), steps=200)        # the user's volume and its PSF
    >>> sharp = model.predict(image).data             # (Z, Y, X), the image's dtype
    >>> model.save("my_deblur"); Deblurrer.load("my_deblur")
    """

    task: ClassVar[str] = "deblur"

    def __init__(self, foundation: Any, config: DeblurConfig | None = None, **overrides: Any):
        if config is None:
            config = DeblurConfig(**overrides)
        elif overrides:
            config = DeblurConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.origin = foundation_record(foundation)
        torch.manual_seed(config.seed)
        self.net = DeblurNet(backbone_copy(foundation), config.hidden, config.unshuffle,
                             config.psf_condition)
        device = config.device if config.device else foundation.device
        self.to_device(device)
        self.net.eval()
        self.history: list[float] = []
        self.best_loss: float | None = None
        self.trained_on: list[dict] = []

    @property
    def device(self) -> torch.device:
        return self.net.foundation.device

    @property
    def trained(self) -> bool:
        return bool(self.trained_on)

    def to_device(self, device: str | torch.device = "auto") -> Deblurrer:
        """Move the network to ``device`` (auto / cpu / cuda:N / mps; mixed precision on
        CUDA)."""
        self.net.foundation.to_device(device)
        self.net.to(self.net.foundation.device)
        return self

    # ----------------------------------------------------------------- training

    def fit(self, image: Any = None, targets: Sequence[float] | None = None, ctx: Any = None,
            *, steps: int | None = None, lr: float | None = None, seed: int | None = None,
            psf_sigma_vox: Sequence[float] | None = None,
            voxel_size: Sequence[float] | None = None, axial: bool | None = None,
            synthetic_share: float = 0.5, sharp: Sequence[Any] = (),
            sharp_share: float = 0.5) -> FitReport:
        """Train the whole network (finetuned end to end).

        Without ``image``: on synthetic pairs (see :mod:`.pairs`), lr default 2e-3; a
        ``sharp_share`` of each batch from real ``sharp`` volumes through the same optics. With
        an ``image`` ((Z, Y, X) numpy, dask or zarr; patches are read as needed): on the
        volume itself, without sharp ground truth, lr default 2e-4 (a gentle finetune).

        Args:
            targets (or ``psf_sigma_vox``): for an image, its known (estimated) PSF, the
                Gaussian sigmas (z, y, x) in voxels; the volume blurred further with it
                and noised to its own noise level is taught back to the volume.
            steps / lr / seed: training steps, learning rate and seed (default: config's).
            voxel_size: (z, y, x) micrometres, for resampling lateral lines to the axial
                spacing; None = isotropic voxels.
            axial: learn axial restoration from lateral planes; None = when the axial
                sigma exceeds 1.2 x the lateral one.
            synthetic_share: fraction of each batch drawn from synthetic pairs with sharp
                ground truth (rehearsal): the volume's own pairs only show blur-twice ->
                blur-once, and alone they teach the network to leave some blur in.

        Returns a :class:`~napari_lsmfm.engine.train.FitReport`. Cancelling keeps the best
        weights so far (``stopped=True``); before any step it raises ``Cancelled``.
        """
        cfg = self.config
        seed = cfg.seed if seed is None else int(seed)
        if image is None:
            if targets is not None or psf_sigma_vox is not None:
                raise ValueError("a PSF is for fitting on a volume: give the image too")
            sampler, val_batch = synthetic_batches(cfg, seed, [np.asarray(v) for v in sharp],
                                                   sharp_share)
            report = self._train(sampler, val_batch, steps or cfg.steps, lr or cfg.lr or 2e-3,
                                 ctx, "training on synthetic pairs" + (
                                     " and real sharp volumes" if len(sharp) else ""), seed)
            real = {"real_volumes": [list(np.shape(v)) for v in sharp],
                    "real_share": float(sharp_share)} if len(sharp) else {}
            self.trained_on.append({"kind": "synthetic", "steps": report.steps_done,
                                    "seed": seed, **real})
            return report
        if (targets is None) == (psf_sigma_vox is None):
            raise ValueError("fitting on a volume needs its PSF: give the Gaussian sigmas "
                             "(z, y, x) in voxels once (targets or psf_sigma_vox)")
        sample = volume_sample(image)
        check_deblur_input(image, sample)
        sigma = psf_sigma_voxels(psf_sigma_vox if targets is None else targets)
        if axial is None:
            axial = sigma[0] > 1.2 * 0.5 * (sigma[1] + sigma[2])
        sampler, val_batch = volume_batches(
            image, deblur_range(image, sample), sigma, cfg, seed, axial=bool(axial),
            voxel_size=voxel_size, synthetic_share=synthetic_share)
        report = self._train(sampler, val_batch, steps or cfg.steps, lr or cfg.lr or 2e-4, ctx,
                             "finetuning on the volume", seed)
        self.trained_on.append({"kind": "self", "steps": report.steps_done,
                                "psf_sigma_vox": list(sigma), "axial": bool(axial),
                                "synthetic_share": float(synthetic_share)})
        return report

    def _train(self, sampler: Any, val_batch: Any, steps: int, lr: float, ctx: Any,
               message: str, seed: int) -> FitReport:
        t0 = time.perf_counter()
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        cfg, net, device = self.config, self.net, self.device
        torch.manual_seed(seed)
        loss_fn = DeblurLoss.from_config(cfg).to(device)
        opt, sched = optimiser(net, lr, steps)
        scaler = grad_scaler(net.foundation.autocast_dtype, device)
        vx, vy, vs = (t.to(device) for t in val_batch)
        drop = np.random.default_rng(seed + 1)
        vcode = training_code(net, vs, drop, cfg.psf_dropout)
        guard = (f"training on {cfg.batch_size} patches of {cfg.patch_size} on {device}",
                 "use a smaller patch_size or batch_size, or the CPU")

        def evaluate() -> float:
            net.eval()
            with torch.no_grad():
                value = float(loss_fn(net(vx, vcode), vy))
            net.train()
            return value

        # the next batch is made in a thread while the network trains on this one (numpy's
        # FFTs and torch's kernels both release the GIL)
        prefetch = ThreadPoolExecutor(1, thread_name_prefix="deblur-batches")
        upcoming, taken = prefetch.submit(sampler.sample, cfg.batch_size), 0

        def step() -> float:
            nonlocal upcoming, taken
            x, y, sig = next_batch(upcoming, ctx)
            taken += 1
            if taken < steps:
                upcoming = prefetch.submit(sampler.sample, cfg.batch_size)
            x, y = x.to(device), y.to(device)
            with memory_guard(*guard):
                code = training_code(net, sig.to(device), drop, cfg.psf_dropout)
                loss = loss_fn(net(x, code), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
            return loss.item()

        try:
            report = TrainLoop(net, step, evaluate, steps, eval_every=cfg.eval_every, ctx=ctx,
                               message=message, start_best=True).run()
        finally:
            # a batch still being made is left to finish on its own: Stop does not wait
            prefetch.shutdown(wait=False, cancel_futures=True)
            net.eval()
        self.history = report.history
        self.best_loss = report.best_loss
        return report.update(seconds=time.perf_counter() - t0)

    # ----------------------------------------------------------------- predict

    def window_fn(self, intensity_range: tuple[float, float],
                  psf_sigma: Sequence[float] | None = None):
        """fn(windows (B, 1, z, y, x) raw float32) -> deblurred (B, 1, z, y, x) in [0, 1].
        ``psf_sigma``: the PSF's Gaussian sigmas (z, y, x) in voxels, for a PSF-conditioned
        model (None: unknown)."""
        net, device = self.net, self.device

        def fn(windows: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(normalize_window(windows, intensity_range, "deblurring"))
            with torch.inference_mode():
                code = psf_code(psf_sigma, x.shape[0], device) if net.psf_condition else None
                return net(x.to(device), code)

        return fn

    def memory(self, shape: Any) -> dict:
        """The memory estimate of prediction windows on a volume of ``shape``, as keyword
        arguments of :func:`~napari_lsmfm.engine.device.with_smaller_tiles` (the network
        sees 1 / unshuffle^3 of the voxels, in unshuffle^3 times the channels)."""
        f = self.net.unshuffle
        fm = self.net.foundation
        return {"shape": tuple(shape), "multiple": f * fm.size_multiple,
                "voxel_bytes": fm.voxel_bytes(2 * f**3) / f**3 + 16.0}

    def predict(self, image: Any, ctx: Any = None, *, region: Any = None, out: Any = None,
                intensity_range: tuple[float, float] | None = None,
                psf_sigma: Sequence[float] | None = None, blend: str = "gaussian"
                ) -> DeblurResult:
        """Deblur a (Z, Y, X) numpy, dask or zarr volume, window by window.

        Returns a :class:`~.result.DeblurResult` whose ``data`` is ``out`` (a numpy or
        zarr array of the image's (or the region's) shape, filled block by block; None
        allocates numpy of the image's dtype): the deblurred volume in the image's units,
        integers rounded and clipped to the dtype's range. ``region``: three slices (or
        (start, stop) pairs) of the image to deblur, None = all of it. ``intensity_range``
        fixes the normalisation (default :func:`~.intensity.deblur_range` of the whole
        image). ``ctx``: progress per window; cancel raises ``Cancelled``. ``psf_sigma``:
        the PSF's Gaussian sigmas (z, y, x) in voxels when known; a PSF-conditioned model
        (``config.psf_condition``) then deblurs for that PSF, otherwise blind; a blind
        model ignores it. ``blend``: how overlapping windows are stitched: "gaussian"
        (seamless) or "crop" (each voxel from the window it is most central in: no
        accumulator and no window twice; block-wise prediction uses it).
        """
        t0 = time.perf_counter()
        if psf_sigma is not None:
            psf_sigma = tuple(float(v) for v in psf_sigma_voxels(psf_sigma))
        sample = volume_sample(image)
        check_deblur_input(image, sample)
        irange = tuple(intensity_range) if intensity_range else deblur_range(image, sample)
        slices = None
        if region is not None:
            lo_corner, hi_corner = region_box(region, image.shape)
            slices = tuple(slice(a, b) for a, b in zip(lo_corner, hi_corner, strict=True))
            image = image[slices]
        if out is None:
            out = np.empty(image.shape, output_dtype(image))
        if tuple(out.shape) != tuple(image.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(image.shape)}")
        lo, hi = irange
        dtype = out.dtype

        def sink(sl, values):
            out[sl] = to_units(values[0], lo, hi, dtype)

        self.net.eval()
        cfg = self.config
        with_smaller_tiles(
            lambda tile: predict_tiled(
                self.window_fn(irange, psf_sigma), image, out_channels=1, tile=tile,
                overlap=cfg.overlap, blend=blend, sink=sink,
                max_block_bytes=cfg.block_bytes, ctx=ctx, message="deblurring",
                align=cfg.unshuffle,
            ),
            cfg.tile, ctx, self.device, **self.memory(image.shape),
        )
        return DeblurResult(out, seconds=time.perf_counter() - t0, model=self, region=slices)

    # ------------------------------------------------------------------ save/load

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Save the network and settings (:func:`~napari_lsmfm.engine.store.save_task_model`);
        returns the folder."""
        config = {
            "config": self.config.to_dict(),
            "head": self.net.head.settings(),
            "foundation": self.origin,
            "normalization": {
                "method": "percentile", "low": INTENSITY_PERCENTILES[0],
                "high": INTENSITY_PERCENTILES[1], "headroom": HEADROOM, "per_volume": True,
                "output": "clamp(x + residual, 0, 1)",
            },
            "trained_on": self.trained_on,
            "best_loss": self.best_loss,
        }
        parts = {"head": self.net.head.state_dict(),
                 "backbone": self.net.foundation.backbone.state_dict()}
        return save_task_model(folder, task="deblur", config=config, parts=parts,
                               overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, foundation: Any = None, *, device: str | None = None
             ) -> Deblurrer:
        """Load a saved deblur model. It carries its whole network (backbone included), so
        no foundation weights are needed; a ``foundation`` given is checked to have the
        same architecture and lends its device. ``device``: where to run (default: the
        foundation's, else auto: CUDA, then MPS, then CPU)."""
        from napari_lsmfm.model import Foundation, FoundationSpec

        config, parts = load_task_model(folder, task="deblur")
        record = config.get("foundation") or {}
        if foundation is not None:
            check_foundation(record, foundation, exact=False)
            device = device or str(foundation.device)
        try:
            spec = FoundationSpec.from_dict(record.get("spec") or {})
        except ValueError as err:
            raise ValueError(f"{folder}: the saved backbone spec is unusable ({err})") from None
        shell = Foundation(spec, build_text=False, source=str(record.get("source")))
        cfg = DeblurConfig.from_dict(config.get("config") or {})
        cfg.device = device or "auto"  # never the device it was trained on
        model = cls(shell, cfg)
        model.origin = dict(record)
        try:
            model.net.foundation.backbone.load_state_dict(parts["backbone"])
            model.net.head.load_state_dict(parts["head"])
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{folder}: the saved weights do not fit this model ({err})"[:300]
                             ) from None
        model.net.eval()
        model.config.device = None
        model.trained_on = list(config.get("trained_on") or [{"kind": "unknown"}])
        model.best_loss = config.get("best_loss")
        return model


def next_batch(upcoming: Any, ctx: Any) -> Any:
    """The prefetched batch (a future); Stop is checked every 50 ms while it is being made
    (a new synthetic volume can take a second or more)."""
    while True:
        if ctx is not None:
            ctx.check()
        try:
            return upcoming.result(timeout=0.05)
        except FutureTimeout:
            continue


def optimiser(net: torch.nn.Module, lr: float, steps: int) -> tuple[Any, Any]:
    """AdamW and a one-cycle schedule peaking at ``lr`` (constant below 4 steps)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    if steps >= 4:  # warm-up of at least 2 steps (OneCycleLR divides by its length)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=steps, pct_start=max(min(0.1, 50 / steps), 2 / steps)
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def training_code(net: DeblurNet, sigmas: torch.Tensor, rng: np.random.Generator,
                  dropout: float) -> torch.Tensor | None:
    """The PSF condition of training patches (:func:`~.net.psf_code`), a ``dropout``
    share hidden; None for a blind network (``rng`` is then not drawn from)."""
    if not net.psf_condition:
        return None
    hide = torch.from_numpy(rng.random(len(sigmas)) < dropout)
    sigmas = sigmas.clone()
    sigmas[hide.to(sigmas.device)] = 0.0
    return psf_code(sigmas, len(sigmas), sigmas.device)
