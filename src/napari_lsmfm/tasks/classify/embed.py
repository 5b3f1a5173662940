"""Patches -> foundation embeddings: a window around each object, point or tile goes
through the foundation once; its multi-scale features are pooled over the object's mask
(a Gaussian around a point, the whole tile), beside the pooled image embedding of the
window (the image-text space prompts are matched in) and the hand-made measures.

The volume is normalised once by its 1st-99th percentile range (``Foundation.intensity_range``,
the one normalisation, a strided sample for lazy volumes) and read a window at a time,
so a dask / zarr volume larger than memory works (tiles: the engine's window grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_lsmfm.engine.jobs import span

from .measures import measure_items

__all__ = ["ItemFeatures", "embed_items", "read_window"]


@dataclass
class ItemFeatures:
    """What the classifier knows about N items.

    foundation: (N, F) float32, the foundation's features pooled over each item's mask, per
        level of ``Foundation.features`` (and level 0 over the rest of the window).
    measures: (N, M) float32 hand-made shape and intensity measures (:mod:`.measures`).
    embedding: (N, P) float32 L2-normalised image embedding of each window (zero-shot).
    masked_embedding: (N, P) the same, pooled over the item's mask only; None without an
        image projection.
    """

    foundation: np.ndarray
    measures: np.ndarray
    embedding: np.ndarray
    masked_embedding: np.ndarray | None = None
    blocks: tuple[int, ...] = ()

    @property
    def probe_blocks(self) -> tuple[int, ...]:
        """Widths of the groups of :attr:`probe_inputs` (each level's pooled features, level
        0's context, then the measures), which the probe weighs as groups."""
        return (*(self.blocks or (self.foundation.shape[1],)), self.measures.shape[1])

    @property
    def probe_inputs(self) -> np.ndarray:
        """(N, F + M) float32: what the probe reads."""
        return np.concatenate([self.foundation, self.measures], 1).astype(np.float32)

    def take(self, index: Any) -> ItemFeatures:
        masked = None if self.masked_embedding is None else self.masked_embedding[index]
        return ItemFeatures(self.foundation[index], self.measures[index], self.embedding[index],
                            masked, self.blocks)


def read_window(volume: Any, lo: Sequence[int], size: Sequence[int], *, fill: str = "reflect"
                ) -> np.ndarray:
    """The window [lo, lo + size) of a (Z, Y, X) volume as numpy, padded where it leaves the
    volume (``fill``: "reflect" (edge where an axis is too short) or "zero")."""
    shape = volume.shape
    a = [max(0, int(lo[i])) for i in range(3)]
    b = [min(int(shape[i]), int(lo[i]) + int(size[i])) for i in range(3)]
    region = volume[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
    compute = getattr(region, "compute", None)
    region = np.asarray(compute() if compute is not None else region)
    pads = [(a[i] - int(lo[i]), int(lo[i]) + int(size[i]) - b[i]) for i in range(3)]
    if not any(p for pair in pads for p in pair):
        return region
    if fill == "zero":
        return np.pad(region, pads)
    mode = "reflect" if all(max(p) < s for p, s in zip(pads, region.shape, strict=True)) \
        else "edge"
    return np.pad(region, pads, mode=mode)


def _origins(items: Any, size: Sequence[int]) -> np.ndarray:
    if items.kind == "tiles":
        return items.boxes[:, :, 0]
    if items.kind == "objects":  # centred on the bounding box (a fragment's centroid may miss it)
        centre = (items.boxes[:, :, 0] + items.boxes[:, :, 1] - 1) / 2.0
    else:
        centre = items.centres
    return np.round(centre).astype(np.int64) - np.asarray(size) // 2


def _weights(items: Any, i: int, lo: np.ndarray, size: Sequence[int],
             spacing: np.ndarray, radius: float) -> np.ndarray:
    if items.kind == "objects":
        return (read_window(items.mask_source, lo, size, fill="zero") == items.labels[i]
                ).astype(np.float32)
    if items.kind == "tiles":
        return np.ones(tuple(size), np.float32)
    grid = np.meshgrid(*[(np.arange(lo[a], lo[a] + size[a]) - items.centres[i, a]) * spacing[a]
                         for a in range(3)], indexing="ij")
    return np.exp(-0.5 * sum(g ** 2 for g in grid) / radius ** 2).astype(np.float32)


def _pool(foundation: Any, x: Any, w: Any, keep: Sequence[int]) -> tuple[Any, Any, Any]:
    import torch
    import torch.nn.functional as F

    levels = foundation.features(x)
    dense = F.normalize(levels[0], dim=1)
    parts = []
    for k, level in enumerate(levels):
        if k not in keep:
            continue
        feats = dense if k == 0 else level
        wk = w if k == 0 else F.adaptive_avg_pool3d(w, level.shape[2:])
        total = wk.sum((2, 3, 4)).clamp_min(1e-6)
        parts.append((feats * wk).sum((2, 3, 4)) / total)
        if k == 0:
            rest = 1.0 - wk
            parts.append((feats * rest).sum((2, 3, 4)) / rest.sum((2, 3, 4)).clamp_min(1e-6))
    embedding = foundation.pool_embedding(levels[0])
    masked = None
    if foundation.image_proj is not None:
        # the projection without its global pool: the object's own embedding
        head = torch.nn.Sequential(*list(foundation.image_proj)[2:])
        masked = F.normalize(head(parts[0]), dim=-1)
    return torch.cat(parts, 1), embedding, masked, tuple(p.shape[1] for p in parts)


def embed_items(foundation: Any, image: Any, items: Any, irange: tuple[float, float], *,
                patch: Sequence[int], voxel_size: Sequence[float] | None = None,
                point_radius: float = 4.0, batch_size: int = 8, levels: Sequence[int] = (0, 1),
                ctx: Any = None) -> ItemFeatures:
    """Foundation features, measures and embeddings of every item of ``items``.

    Args:
        foundation: a :class:`~napari_lsmfm.model.Foundation` (on its device).
        image: (Z, Y, X) numpy, dask or zarr volume (raw intensities).
        items: :class:`~.examples.Items` (objects, points or tiles).
        irange: the volume's (low, high) normalisation range.
        patch: window (z, y, x) voxels around objects and points (tiles use their own size).
        voxel_size: (z, y, x) micrometres (shape measures, the Gaussian of points).
        levels: the ``Foundation.features`` levels pooled (0 = the dense output).
        ctx: JobContext: progress per batch; Stop raises ``Cancelled``.
    """
    import torch

    from napari_lsmfm.model.foundation import normalize_window

    size = tuple(items.tile) if items.kind == "tiles" else tuple(int(p) for p in patch)
    spacing = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), float)
    origins = _origins(items, size)
    n = len(items)
    parts: list[np.ndarray] = []
    blocks: tuple[int, ...] = ()
    levels = tuple(int(k) for k in levels)
    if not levels or min(levels) < 0 or max(levels) >= len(foundation.feature_channels):
        raise ValueError(f"levels must be among 0..{len(foundation.feature_channels) - 1} "
                         f"(this foundation's feature levels), got {levels}")
    embeds: list[np.ndarray] = []
    masked: list[np.ndarray] = []
    device = foundation.device
    step = max(1, int(batch_size))
    feed = span(ctx, 0.0, 0.9)
    for start in range(0, n, step):
        idx = range(start, min(n, start + step))
        windows = np.stack([read_window(image, origins[i], size) for i in idx]).astype(np.float32)
        x = torch.from_numpy(normalize_window(windows, irange, "classifying"))[:, None]
        w = np.stack([_weights(items, i, origins[i], size, spacing, point_radius) for i in idx])
        with torch.inference_mode():
            pooled, emb, memb, blocks = _pool(foundation, x.to(device),
                                              torch.from_numpy(w)[:, None].to(device), levels)
        parts.append(pooled.float().cpu().numpy())
        embeds.append(emb.float().cpu().numpy())
        if memb is not None:
            masked.append(memb.float().cpu().numpy())
        if feed is not None:
            done = min(n, start + step)
            feed.report(done / n, f"embedding {done}/{n} {items.kind}")
    measures = measure_items(items, image, irange, voxel_size, point_radius)
    if ctx is not None:
        ctx.report(1.0, f"embedded {n} {items.kind}")
    return ItemFeatures(np.concatenate(parts).astype(np.float32), measures,
                        np.concatenate(embeds).astype(np.float32),
                        np.concatenate(masked).astype(np.float32) if masked else None, blocks)
