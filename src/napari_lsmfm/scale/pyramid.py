"""The multiscale pyramid of an OME-Zarr output, for viewing a whole brain.

Level 0 is the prediction itself (array "0", written block by block). Each further
level halves y and x (and z while the voxels stay no longer in z than in y and x, so an
anisotropic light-sheet stack is not flattened early) until the smallest fits in
:data:`SMALLEST` voxels across. Levels are computed with dask from the level above,
chunk by chunk (memory bounded by a few chunks): labels by taking every second voxel
(OME-Zarr's nearest-neighbour rule, so ids stay ids), images by the mean. The
``multiscales`` metadata is written by ome-zarr-py
(:func:`ome_zarr.writer.write_multiscales_metadata`, OME-Zarr 0.4), so any OME-Zarr
reader (napari, Fiji's MoBIE, neuroglancer) opens the pyramid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SMALLEST", "level_factors", "write_pyramid"]

SMALLEST = 256


def level_factors(shape: Sequence[int], voxel_size: Sequence[float] | None,
                  smallest: int = SMALLEST) -> list[tuple[int, int, int]]:
    """The (z, y, x) downsampling factor of each level after level 0 (relative to level 0)."""
    spatial = [int(s) for s in shape[-3:]]
    size = [float(v) for v in voxel_size] if voxel_size is not None else [1.0, 1.0, 1.0]
    factors: list[tuple[int, int, int]] = []
    f = [1, 1, 1]
    while max(spatial[1] // f[1], spatial[2] // f[2]) > smallest:
        grow_z = size[0] * f[0] <= size[1] * f[1] and spatial[0] // (2 * f[0]) >= 1
        f = [f[0] * (2 if grow_z else 1), f[1] * 2, f[2] * 2]
        factors.append((f[0], f[1], f[2]))
    return factors


def write_pyramid(store: str | os.PathLike, *, kind: str, voxel_size: Sequence[float] | None,
                  name: str | None = None, smallest: int = SMALLEST, compute: bool = True) -> int:
    """Add the pyramid levels below array "0" of the OME-Zarr group ``store`` and write its
    multiscales metadata; returns the number of levels (level 0 included). ``kind``:
    "labels" (every second voxel) or "image" (mean). Rerunning rewrites the levels."""
    import dask.array as da
    import numcodecs
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    store = Path(store)
    group = zarr.open_group(str(store), mode="r+", zarr_format=2)
    base = group["0"]
    channels = base.ndim == 4
    factors = level_factors(base.shape, voxel_size, smallest)
    level0 = da.from_zarr(base)
    previous, prev_f = level0, (1, 1, 1)
    for i, f in enumerate(factors, start=1):
        step = tuple(a // b for a, b in zip(f, prev_f, strict=True))
        level = _downsample(previous, step, kind, channels)
        chunks = tuple(min(c, s) for c, s in zip(base.chunks, level.shape, strict=True))
        target = group.create_array(
            str(i), shape=level.shape, chunks=chunks, dtype=base.dtype, overwrite=True,
            compressors=numcodecs.Blosc(cname="zstd", clevel=5,
                                        shuffle=numcodecs.Blosc.BITSHUFFLE),
            fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"},
        )
        if compute:
            da.store(level.rechunk(target.chunks), target, lock=False)
        previous, prev_f = da.from_zarr(target), f
    size = [float(v) for v in voxel_size] if voxel_size is not None else [1.0, 1.0, 1.0]
    datasets = []
    for f in [(1, 1, 1), *factors]:
        scale = [s * k for s, k in zip(size, f, strict=True)]
        datasets.append({"path": str(len(datasets)), "coordinateTransformations": [
            {"type": "scale", "scale": ([1.0] if channels else []) + scale}]})
    keep = {k: v for k, v in dict(group.attrs).items() if k != "multiscales"}
    axes: list[dict[str, Any]] = [{"name": "c", "type": "channel"}] if channels else []
    unit = {"unit": "micrometer"} if voxel_size is not None else {}
    axes += [{"name": a, "type": "space", **unit} for a in "zyx"]
    write_multiscales_metadata(group, datasets, fmt=FormatV04(), axes=axes,
                               name=name or store.stem)
    if kind == "labels":
        keep.setdefault("image-label", {"version": "0.4"})
    group.attrs.update(keep)
    return 1 + len(factors)


def _downsample(level: Any, step: Sequence[int], kind: str, channels: bool) -> Any:
    import dask.array as da

    lead = (1,) if channels else ()
    if kind == "labels":
        return level[(slice(None),) * len(lead) + tuple(slice(None, None, s) for s in step)]
    # the mean; ragged ends keep their partial blocks (trim_excess=False pads them out)
    axes = {i + len(lead): s for i, s in enumerate(step) if s > 1}
    dtype = level.dtype
    pooled = da.coarsen(np.mean, level.astype(np.float32), axes, trim_excess=True)
    if np.dtype(dtype).kind in "iu":
        pooled = da.round(pooled)
    return pooled.astype(dtype)
