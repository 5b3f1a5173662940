"""Quick-mode features: what the per-voxel head reads, per window and cached per volume.

For every voxel: the frozen foundation's dense features (or the levels asked for,
upsampled trilinearly), then the normalised intensity and the classical filter bank
(:mod:`napari_lsmfm.tasks.filters`; sigmas scaled by the voxel size). Computed window
by window with the tiled engine; a whole volume's features are kept as float16 in a
:class:`FeatureCache`, so refits after more strokes cost seconds.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_lsmfm.engine.device import with_smaller_tiles
from napari_lsmfm.engine.store import foundation_fingerprint
from napari_lsmfm.engine.tiled import predict_points, predict_tiled
from napari_lsmfm.model.foundation import normalize_window
from napari_lsmfm.tasks.filters import filter_bank, filter_bank_numpy, n_channels

__all__ = ["DEFAULT_SIGMAS", "FeatureCache", "QuickFeatures", "image_key", "point_features",
           "volume_features"]

DEFAULT_SIGMAS = (1.0, 2.0, 4.0)  # before a fit has measured the objects (:mod:`.scale`)
# runs the foundation beside scipy's filters (torch releases the GIL, scipy does not)
_BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="quick-foundation")


class QuickFeatures:
    """Per-window quick-mode features: foundation levels + intensity + classical filters.

    ``levels`` / ``sigmas`` default to the config's (``sigmas`` None there: 1, 2, 4, the
    sigmas of objects the foundation's training size); an empty ``levels`` = the filters
    alone. ``zoom``: the foundation sees each window resampled by this factor (objects
    at its training size; :mod:`.scale`) and its features are resampled back; the
    filters always run at the volume's own resolution.

    ``channels``: how many features per voxel (the head's input width);
    ``foundation_channels``: how many of them (the first) come from the foundation.
    """

    def __init__(self, foundation: Any, config: Any, *, levels: Any = None, sigmas: Any = None,
                 zoom: float = 1.0) -> None:
        self.foundation = foundation
        self.levels = tuple(config.feature_levels if levels is None else levels)
        if sigmas is None:
            sigmas = config.sigmas if config.sigmas is not None else DEFAULT_SIGMAS
        self.sigmas = tuple(float(s) for s in sigmas)
        self.spacing = tuple(config.voxel_size) if config.voxel_size else (1.0, 1.0, 1.0)
        self.zoom = float(zoom)
        chans = list(foundation.feature_channels)
        bad = [lv for lv in self.levels if not 0 <= lv < len(chans)]
        if bad:
            raise ValueError(
                f"feature_levels {bad} do not exist; this foundation has 0..{len(chans) - 1}"
            )
        self.foundation_channels = sum(chans[lv] for lv in self.levels)
        self.channels = self.foundation_channels + n_channels(self.sigmas)

    @classmethod
    def from_settings(cls, foundation: Any, config: Any, settings: dict) -> QuickFeatures:
        """The features a saved model's head reads (its ``features`` record)."""
        return cls(foundation, config, levels=settings.get("levels"),
                   sigmas=settings.get("sigmas"), zoom=settings.get("zoom", 1.0))

    def settings(self) -> dict:
        return {"levels": list(self.levels), "sigmas": list(self.sigmas),
                "spacing": list(self.spacing), "zoom": self.zoom, "channels": self.channels}

    def key(self, image_key: tuple, config: Any) -> tuple:
        """What the cached features of the image ``image_key`` depend on: the foundation's
        weights, these settings and the windows of ``config``."""
        return (image_key, foundation_fingerprint(self.foundation), repr(self.settings()),
                config.tile, config.overlap, config.feature_blend)

    def memory(self, shape: Any) -> dict:
        """The memory estimate of these windows on a volume of ``shape``, as keyword
        arguments of :func:`~napari_lsmfm.engine.device.with_smaller_tiles`."""
        voxel_bytes = self.foundation.voxel_bytes(self.channels)
        if self.levels and self.zoom > 1:  # the foundation sees the window enlarged
            voxel_bytes = int(voxel_bytes * self.zoom**3)
        return {"shape": tuple(shape), "voxel_bytes": voxel_bytes,
                "multiple": self.foundation.size_multiple}

    def window_fn(self, intensity_range: tuple[float, float]):
        """fn(windows (B, 1, z, y, x) raw float32) -> features (B, C, z, y, x) torch.

        On the CPU the foundation runs in a second thread while scipy's filters (which
        hold the GIL, on one core) run in this one, and both write straight into the
        output (no concatenation copies): the same values as one after the other."""

        def fn(windows: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(normalize_window(windows, intensity_range, "segmenting"))
            x = x.to(self.foundation.device)
            if x.device.type != "cpu":
                with torch.inference_mode():
                    parts = self.foundation_features(x) if self.levels else []
                    parts.append(filter_bank(x, self.sigmas, self.spacing))
                    return torch.cat(parts, 1)
            out = torch.empty((x.shape[0], self.channels, *x.shape[2:]), dtype=torch.float32)
            nf = self.foundation_channels
            running = _BACKGROUND.submit(self._foundation_into, x, out) if self.levels else None
            try:
                for b in range(x.shape[0]):  # scipy, as filter_bank does on the CPU
                    bank = filter_bank_numpy(x[b, 0].numpy(), self.sigmas, self.spacing)
                    out[b, nf:] = torch.from_numpy(bank)
            finally:
                if running is not None:
                    running.result()
            return out

        return fn

    def _foundation_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """The foundation's levels of ``x``, written into the first channels of ``out``
        (inference mode is per thread: entered here)."""
        with torch.inference_mode():
            c = 0
            for f in self.foundation_features(x):
                out[:, c : c + f.shape[1]] = f
                c += f.shape[1]

    def foundation_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The foundation's levels of normalised windows ``x`` (B, 1, z, y, x), at
        ``zoom`` and resampled back to the windows' size."""
        size = x.shape[2:]
        if self.zoom != 1.0:
            zoomed = [max(4, round(s * self.zoom)) for s in size]
            x = F.interpolate(x, size=zoomed, mode="area" if self.zoom < 1 else "trilinear",
                              **({} if self.zoom < 1 else {"align_corners": False}))
        if self.levels == (0,):
            levels = [self.foundation(x)]
        else:
            found = self.foundation.features(x)
            levels = [found[lv] for lv in self.levels]
        return [f if f.shape[2:] == size else
                F.interpolate(f, size=size, mode="trilinear", align_corners=False)
                for f in levels]


def volume_features(features: QuickFeatures, image: Any, irange: tuple[float, float],
                    config: Any, ctx: Any = None) -> np.ndarray:
    """The features of the whole ``image``: (C, Z, Y, X) float16 numpy, window by window
    (``config``'s tile, overlap, feature_blend, block_bytes; smaller windows when the
    device runs out of memory)."""
    fn = features.window_fn(irange)
    return with_smaller_tiles(lambda tile: predict_tiled(
        fn, image, out_channels=features.channels, tile=tile, overlap=config.overlap,
        blend=config.feature_blend, dtype=np.float16, max_block_bytes=config.block_bytes,
        ctx=ctx, message="features",
    ), config.tile, ctx, features.foundation.device, **features.memory(image.shape))


def point_features(features: QuickFeatures, image: Any, coords: np.ndarray,
                   irange: tuple[float, float], config: Any, ctx: Any = None) -> np.ndarray:
    """The features at voxels ``coords`` (N, 3) of ``image``: (N, C) float32, computed
    only in the windows that hold them (for volumes too big to cache)."""
    fn = features.window_fn(irange)
    return with_smaller_tiles(lambda tile: predict_points(
        fn, image, coords, out_channels=features.channels, tile=tile,
        overlap=config.overlap, blend=config.feature_blend, ctx=ctx, message="features",
    ), config.tile, ctx, features.foundation.device, **features.memory(image.shape))


class FeatureCache(dict):
    """Whole-volume feature arrays (C, Z, Y, X) float16 by :meth:`QuickFeatures.key`, the
    most recently used last, kept within a byte budget (the oldest go first)."""

    def recall(self, key: tuple) -> np.ndarray | None:
        """The cached array for ``key`` (now the most recently used), or None."""
        features = self.pop(key, None)
        if features is not None:
            self[key] = features
        return features

    def make_room(self, nbytes: int, budget: int) -> bool:
        """Drop the oldest arrays until ``nbytes`` more fit in ``budget``; False (nothing
        dropped) when ``nbytes`` alone exceeds it."""
        if nbytes > budget:
            return False
        while self and nbytes + sum(f.nbytes for f in self.values()) > budget:
            self.pop(next(iter(self)))
        return True


def image_key(image: Any) -> tuple:
    """Identify an image for the feature cache: content hash for numpy, graph name for dask."""
    shape = tuple(image.shape)
    name = getattr(image, "name", None)
    if isinstance(name, str) and hasattr(image, "dask"):
        return ("dask", name, shape)
    if isinstance(image, np.ndarray):
        data = image if image.nbytes <= 2**30 else image[:: max(1, image.shape[0] // 64)]
        digest = hashlib.blake2b(np.ascontiguousarray(data).view(np.uint8), digest_size=16)
        return ("numpy", digest.hexdigest(), shape, str(image.dtype))
    return ("object", id(image), shape)
