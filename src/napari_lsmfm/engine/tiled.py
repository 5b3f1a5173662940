"""Tiled prediction over volumes larger than memory: windows, blending, block output.

One engine for every dense task (segmentation, deblurring, feature extraction). A
window function ``fn`` maps a batch of windows ``(B, 1, z, y, x)`` float32 to
``(B, C, z, y, x)`` (numpy or torch). :func:`predict_tiled` runs it on a fixed
global grid of windows and stitches the results in one of two ways:

- ``blend="gaussian"``: every window's output is weighted by a Gaussian that falls
  off towards the window's border (sigma = ``sigma_scale`` x tile, as in MONAI) and
  accumulated with the weights; the result is the weighted mean, so overlapping
  windows blend without seams. ``"constant"`` is the plain mean.
- ``blend="crop"`` (overlap-tile): every voxel is taken from the single window in
  which it lies most centrally (the cores meet half-way through each overlap). No
  accumulator is needed, so this suits outputs with many channels (feature maps).

Why our own loop rather than MONAI's ``sliding_window_inference``: MONAI needs the
whole input and the whole output in memory. Here the output is produced block by
block (a block = a region of the output, sized by ``max_block_bytes``); for each
block only the windows that touch it are read from the (numpy, dask or zarr) input,
run, blended into a block buffer and written to ``out`` (numpy or zarr), so memory
is bounded by the block, never by the volume. A floating-point numpy ``out`` is
itself the accumulator (one block: every window runs once, whatever the channels).
The window grid is global, so the result does not depend on the block size: a
block-wise prediction equals the in-memory one. A window that straddles two Gaussian
blocks is run once per block; blocks are as large as the budget allows, so this is
rare. The same grid gives
:func:`predict_points`, the output at scattered voxels (e.g. brushed ones) without
computing the rest of the volume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .device import DeviceMemoryError, free_device_memory, is_out_of_memory
from .grid import TileGrid, gaussian_weights, region_box
from .jobs import span

__all__ = [
    "DeviceMemoryError",
    "TileGrid",
    "gaussian_weights",
    "predict_points",
    "predict_tiled",
]

BLENDS = ("gaussian", "constant", "crop")
DEFAULT_TILE = (64, 128, 128)
DEFAULT_BLOCK_BYTES = 1 << 30


WindowFn = Callable[[np.ndarray], Any]
Sink = Callable[[tuple[slice, ...], np.ndarray], None]


# ------------------------------------------------------------------------ running


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    detach = getattr(value, "detach", None)
    if detach is not None:  # torch
        return detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


class _Runner:
    """Calls ``fn`` on batches, halving the batch when the device runs out of memory."""

    def __init__(self, fn: WindowFn, batch_size: int, tile: Sequence[int]) -> None:
        self.fn = fn
        self.batch_size = max(1, int(batch_size))
        self.tile = tuple(tile)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        outs = []
        i = 0
        while i < len(windows):
            chunk = windows[i : i + self.batch_size]
            try:
                out = _to_numpy(self.fn(chunk))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                free_device_memory()
                if self.batch_size == 1:
                    raise DeviceMemoryError(
                        f"the device ran out of memory on one window of {self.tile} voxels; "
                        "use a smaller tile, or the CPU (device 'cpu')"
                    ) from exc
                self.batch_size = max(1, self.batch_size // 2)
                continue
            if out.ndim != 5 or out.shape[0] != len(chunk) or out.shape[2:] != chunk.shape[2:]:
                raise ValueError(
                    f"the window function returned shape {out.shape} for windows "
                    f"{chunk.shape}; expected (B, C, z, y, x) at the window size"
                )
            outs.append(out)
            i += len(chunk)
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)


def _read(volume: Any, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    region = volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    compute = getattr(region, "compute", None)
    if compute is not None:  # dask
        region = compute()
    return np.asarray(region, dtype=np.float32)


def _block_shape(
    lo: Sequence[int], hi: Sequence[int], grid: TileGrid, bytes_per_voxel: int,
    max_bytes: int, chunks: Sequence[int] | None,
) -> tuple[int, int, int]:
    """The largest block (z first halved) whose buffers fit ``max_bytes``."""
    size = [b - a for a, b in zip(lo, hi, strict=True)]
    block = list(size)
    while math.prod(block) * bytes_per_voxel > max_bytes:
        ratios = [b / t for b, t in zip(block, grid.tile, strict=True)]
        a = int(np.argmax(ratios))
        if block[a] <= max(1, grid.tile[a] // 2):
            break  # never below half a window: recomputation would dominate
        block[a] = max(1, (block[a] + 1) // 2)
    if chunks is not None:  # whole output chunks where possible (no read-modify-write)
        block = [
            min(s, max(c, (b // c) * c)) for b, c, s in zip(block, chunks, size, strict=True)
        ]
    return tuple(block)  # type: ignore[return-value]


def _crop_blocks(
    lo: Sequence[int], hi: Sequence[int], grid: TileGrid, block: Sequence[int]
) -> list[list[tuple[int, int]]]:
    """Per axis, block intervals made of whole window cores (no window runs twice)."""
    per_axis = []
    for a in range(3):
        bounds = [b for b in grid.cores[a] if lo[a] < b < hi[a]]
        edges = [lo[a]] + bounds + [hi[a]]
        intervals, start = [], edges[0]
        for e0, e1 in itertools.pairwise(edges):
            if e1 - start > block[a] and e0 > start:
                intervals.append((start, e0))
                start = e0
        intervals.append((start, hi[a]))
        per_axis.append(intervals)
    return per_axis


def _plain_blocks(
    lo: Sequence[int], hi: Sequence[int], block: Sequence[int]
) -> list[list[tuple[int, int]]]:
    return [
        [(s, min(s + block[a], hi[a])) for s in range(lo[a], hi[a], block[a])] for a in range(3)
    ]


def predict_tiled(
    fn: WindowFn,
    volume: Any,
    *,
    out_channels: int,
    tile: Sequence[int] | int = DEFAULT_TILE,
    overlap: float = 0.25,
    blend: str = "gaussian",
    region: Sequence[slice] | None = None,
    out: Any = None,
    sink: Sink | None = None,
    dtype: Any = np.float32,
    batch_size: int = 1,
    sigma_scale: float = 0.125,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    ctx: Any = None,
    progress: tuple[float, float] = (0.0, 1.0),
    message: str = "predicting",
    align: int = 1,
    overlap_io: bool = True,
) -> Any:
    """Run ``fn`` over a (Z, Y, X) volume window by window and stitch the outputs.

    Args:
        fn: maps windows ``(B, 1, z, y, x)`` float32 (raw intensities, as read from
            ``volume``; normalise inside ``fn``) to ``(B, C, z, y, x)``, numpy or torch.
            Return a new array each call: the engine scales it in place.
        volume: (Z, Y, X) numpy, dask or zarr array; read one block (plus the margin
            of its windows) at a time.
        out_channels: C, the channels ``fn`` returns.
        tile: window size (z, y, x) in voxels, clipped to the volume.
        overlap: fraction of the window shared with its neighbour, in [0, 1).
        blend: "gaussian" (weighted mean, seamless), "constant" (plain mean) or "crop"
            (each voxel from the window where it is most central; light on memory).
        region: three slices of the volume to predict (default: all of it); windows
            still come from the global grid, so a region equals the same part of a
            whole-volume prediction.
        out: a numpy or zarr array (C, *region shape) to fill; None allocates numpy.
        sink: instead of ``out``, ``sink(slices, values)`` receives each finished
            block: ``slices`` index the region (z, y, x), ``values`` is float32 (C, ...).
        dtype: dtype of the allocated output.
        batch_size: windows per call of ``fn``; halved when the device runs out of memory.
        sigma_scale: Gaussian sigma as a fraction of the tile.
        max_block_bytes: memory for the per-block buffers.
        ctx: a JobContext: progress per batch (values tile=, tiles=); cancelling stops
            at the next batch with ``Cancelled`` (the output is then partial).
        progress: the part of ``ctx``'s [0, 1] this call covers.
        align: window origins on multiples of this (for networks that fold blocks of
            voxels into channels, so every window folds the same blocks).

    Returns:
        ``out`` (or the new numpy array), or None when a ``sink`` is given.

    Raises:
        DeviceMemoryError: one window does not fit in the device's memory.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if len(getattr(volume, "shape", ())) != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {getattr(volume, 'shape', None)}")
    grid = TileGrid.build(volume.shape, tile, overlap, align)
    lo, hi = region_box(region, volume.shape)
    rshape = tuple(b - a for a, b in zip(lo, hi, strict=True))
    channels = int(out_channels)
    if sink is None and out is None:
        out = np.zeros((channels, *rshape), dtype=dtype)
    if out is not None and tuple(out.shape) != (channels, *rshape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(channels, *rshape)}")
    crop = blend == "crop"
    chunks = None
    if out is not None and getattr(out, "chunks", None) is not None and not isinstance(
        out, np.ndarray
    ):
        chunks = tuple(int(c) for c in out.chunks[1:])
    # a float numpy output is its own accumulator: one block, every window run once
    direct = sink is None and isinstance(out, np.ndarray) and out.dtype.kind == "f"
    if direct:
        blocks = [tuple(zip(lo, hi, strict=True))]
    else:
        bytes_per_voxel = 4 * (channels if crop else channels + 1) + 4
        block = _block_shape(lo, hi, grid, bytes_per_voxel, int(max_block_bytes), chunks)
        axes = _crop_blocks(lo, hi, grid, block) if crop else _plain_blocks(lo, hi, block)
        blocks = list(itertools.product(*axes))
    plan = [(b, grid.touching([i[0] for i in b], [i[1] for i in b], crop)) for b in blocks]
    total = sum(len(w) for _, w in plan)
    weights = gaussian_weights(grid.tile, sigma_scale) if blend == "gaussian" else None
    runner = _Runner(fn, batch_size, grid.tile)
    ctx = span(ctx, *progress)
    if ctx is not None:
        ctx.report(0.0, f"{message}: 0/{total} tiles", tile=0, tiles=total)
    with _Pipeline(volume, grid, overlap_io) as pipe:
        done = 0
        pipe.read_ahead(plan[0][1])
        for k, (box, origins) in enumerate(plan):
            b_lo = [i[0] for i in box]
            b_hi = [i[1] for i in box]
            bshape = tuple(b - a for a, b in zip(b_lo, b_hi, strict=True))
            if direct:
                values = out
                values[...] = 0
            else:
                values = np.zeros((channels, *bshape), np.float32)
            wsum = None if crop else _weight_sum(origins, grid, b_lo, b_hi, weights)
            # the hull of this block's windows, read once (one dask compute per block);
            # the next block's is read meanwhile
            h_lo, hull = pipe.hull()
            if k + 1 < len(plan):
                pipe.read_ahead(plan[k + 1][1])
            i = 0
            while i < len(origins):  # the batch may shrink on the way (out of memory)
                batch = origins[i : i + runner.batch_size]
                i += len(batch)
                windows = np.stack([hull[_window_slices(o, h_lo, grid.tile)] for o in batch])
                outputs = runner(windows[:, None])
                if outputs.shape[1] != channels:
                    raise ValueError(
                        f"the window function returned {outputs.shape[1]} channels, "
                        f"expected {channels}"
                    )
                # blended in a thread while the next batch runs (in the order run: the
                # sums are those of a sequential loop, bit for bit)
                pipe.accumulate(values, wsum, outputs, batch, b_lo, b_hi, weights, crop)
                done += len(batch)
                if ctx is not None:
                    frac = done / max(total, 1)
                    ctx.report(frac, f"{message}: {done}/{total} tiles", tile=done, tiles=total)
            pipe.wait()
            if direct:
                continue
            rel = tuple(slice(a - r, b - r) for a, b, r in zip(b_lo, b_hi, lo, strict=True))
            if sink is not None:
                sink(rel, values)
            else:
                out[(slice(None), *rel)] = values.astype(out.dtype, copy=False)
    return out if sink is None else None


class _Pipeline:
    """Reading of block hulls and blending of window outputs in two background threads
    (or inline when ``threaded`` is False), so they overlap the window function: on a
    GPU the device never waits for the host, and zarr / dask reads overlap compute."""

    def __init__(self, volume: Any, grid: TileGrid, threaded: bool) -> None:
        self.volume, self.grid, self.threaded = volume, grid, bool(threaded)
        self.reader = ThreadPoolExecutor(1, "tiled-read") if self.threaded else None
        self.blender = ThreadPoolExecutor(1, "tiled-blend") if self.threaded else None
        self.next_hull: Any = None
        self.pending: list[Future] = []

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:  # nothing may still write into the output once the call has returned
            for future in self.pending:
                future.exception()
        finally:
            for pool in (self.reader, self.blender):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)

    def _read_hull(self, origins) -> tuple[list[int], np.ndarray]:
        h_lo = [min(o[a] for o in origins) for a in range(3)]
        h_hi = [max(o[a] for o in origins) + self.grid.tile[a] for a in range(3)]
        return h_lo, _read(self.volume, h_lo, h_hi)

    def read_ahead(self, origins) -> None:
        self.next_hull = (self.reader.submit(self._read_hull, origins) if self.threaded
                          else origins)

    def hull(self) -> tuple[list[int], np.ndarray]:
        if self.threaded:
            return self.next_hull.result()
        return self._read_hull(self.next_hull)

    def accumulate(self, values, wsum, outputs, batch, b_lo, b_hi, weights, crop) -> None:
        def work() -> None:
            for o, y in zip(batch, outputs, strict=True):
                _accumulate(values, wsum, y, o, self.grid, b_lo, b_hi, weights, crop)

        if not self.threaded:
            work()
            return
        # one batch blending while the next runs: raise a failure, bound the memory
        self.wait(keep=0)
        self.pending.append(self.blender.submit(work))

    def wait(self, keep: int = 0) -> None:
        """Wait for all but ``keep`` of the blends in flight (raising their errors)."""
        while len(self.pending) > keep:
            self.pending.pop(0).result()


def _window_slices(origin, offset, tile) -> tuple[slice, ...]:
    return tuple(slice(origin[a] - offset[a], origin[a] - offset[a] + tile[a]) for a in range(3))


def _overlap(origin, grid, b_lo, b_hi, crop):
    """(window slices, block slices) of the part of a window (or its core) in a block."""
    if crop:
        core = grid.core_of(origin)
        g_lo = [max(core[a].start, b_lo[a]) for a in range(3)]
        g_hi = [min(core[a].stop, b_hi[a]) for a in range(3)]
    else:
        g_lo = [max(origin[a], b_lo[a]) for a in range(3)]
        g_hi = [min(origin[a] + grid.tile[a], b_hi[a]) for a in range(3)]
    if any(b <= a for a, b in zip(g_lo, g_hi, strict=True)):
        return None
    src = tuple(slice(g_lo[a] - origin[a], g_hi[a] - origin[a]) for a in range(3))
    dst = tuple(slice(g_lo[a] - b_lo[a], g_hi[a] - b_lo[a]) for a in range(3))
    return src, dst


def _weight_sum(origins, grid, b_lo, b_hi, weights) -> np.ndarray:
    """The total blending weight of every voxel of a block (known before any window runs)."""
    shape = tuple(h - lo for lo, h in zip(b_lo, b_hi, strict=True))
    wsum = np.zeros(shape, np.float32)
    for o in origins:
        part = _overlap(o, grid, b_lo, b_hi, crop=False)
        if part is not None:
            wsum[part[1]] += 1.0 if weights is None else weights[part[0]]
    return np.maximum(wsum, 1e-12, out=wsum)


def _accumulate(values, wsum, y, origin, grid, b_lo, b_hi, weights, crop) -> None:
    part = _overlap(origin, grid, b_lo, b_hi, crop)
    if part is None:
        return
    src, dst = part
    piece = y[(slice(None), *src)]
    if crop:
        values[(slice(None), *dst)] = piece
        return
    # add the window's normalised share: no division pass at the end, and in place
    share = (1.0 if weights is None else weights[src]) / wsum[dst]
    np.multiply(piece, share, out=piece)
    values[(slice(None), *dst)] += piece


def predict_points(
    fn: WindowFn,
    volume: Any,
    points: np.ndarray,
    *,
    out_channels: int,
    tile: Sequence[int] | int = DEFAULT_TILE,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 1,
    sigma_scale: float = 0.125,
    ctx: Any = None,
    progress: tuple[float, float] = (0.0, 1.0),
    message: str = "computing",
) -> np.ndarray:
    """The output :func:`predict_tiled` would give at scattered voxels, float32 (N, C).

    Runs only the windows that contribute to ``points`` ((N, 3) integer z, y, x), so
    e.g. features at brushed voxels cost a few windows, not the whole volume. The
    values equal ``predict_tiled(...)[:, z, y, x]`` with the same arguments.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    grid = TileGrid.build(volume.shape, tile, overlap)
    points = np.asarray(points, dtype=np.int64).reshape(-1, 3)
    n = len(points)
    channels = int(out_channels)
    values = np.zeros((n, channels), np.float32)
    if n == 0:
        return values
    crop = blend == "crop"
    weights = gaussian_weights(grid.tile, sigma_scale) if blend == "gaussian" else None
    wsum = np.zeros(n, np.float32)
    # which windows see which points
    members: dict[tuple[int, ...], np.ndarray] = {}
    per_axis = []
    for a in range(3):
        starts = np.asarray(grid.starts[a])
        coord = points[:, a]
        if crop:
            bounds = np.asarray(grid.cores[a])
            k = np.searchsorted(bounds, coord, side="right") - 1
            per_axis.append([(k == j) for j in range(len(starts))])
        else:
            per_axis.append([(coord >= s) & (coord < s + grid.tile[a]) for s in starts])
    for combo in itertools.product(*(range(len(s)) for s in grid.starts)):
        mask = per_axis[0][combo[0]] & per_axis[1][combo[1]] & per_axis[2][combo[2]]
        if mask.any():
            origin = tuple(grid.starts[a][combo[a]] for a in range(3))
            members[origin] = np.flatnonzero(mask)
    origins = list(members)
    runner = _Runner(fn, batch_size, grid.tile)
    total = len(origins)
    ctx = span(ctx, *progress)
    if ctx is not None:
        ctx.report(0.0, f"{message}: 0/{total} tiles", tile=0, tiles=total)
    i = 0
    while i < total:
        batch = origins[i : i + runner.batch_size]
        i += len(batch)
        windows = np.stack(
            [_read(volume, o, [o[a] + grid.tile[a] for a in range(3)]) for o in batch]
        )[:, None]
        outputs = runner(windows)
        if outputs.shape[1] != channels:
            raise ValueError(
                f"the window function returned {outputs.shape[1]} channels, expected {channels}"
            )
        for o, y in zip(batch, outputs, strict=True):
            idx = members[o]
            local = points[idx] - np.asarray(o)
            vals = y[:, local[:, 0], local[:, 1], local[:, 2]].T
            if crop:
                values[idx] = vals
            else:
                w = 1.0 if weights is None else weights[local[:, 0], local[:, 1], local[:, 2]]
                values[idx] += vals * np.asarray(w, np.float32).reshape(-1, 1)
                wsum[idx] += w
        if ctx is not None:
            done = i
            frac = done / max(total, 1)
            ctx.report(frac, f"{message}: {done}/{total} tiles", tile=done, tiles=total)
    if not crop:
        values /= np.maximum(wsum, 1e-12)[:, None]
    return values
