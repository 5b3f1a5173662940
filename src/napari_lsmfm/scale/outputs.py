"""The input and the OME-Zarr outputs of a block-wise run, and its later phases.

Outputs are made under their final names as OME-Zarr 0.4 groups (array "0" in chunks
that divide the blocks, so two workers never write one chunk), marked partial with the
run's block plan until complete. A rerun refuses a partial output unless resuming (then
the plan, shapes and model must match) or overwriting (then it is removed first).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .blocks import LEDGER_DIR, BlockPlan
from .cluster import cluster_client, dask_executor, local_executor

DEFAULT_DIAMETER = 16.0

__all__ = ["executor", "finish", "make_instances", "open_input", "open_outputs", "pyramid",
           "split_classes"]


def open_input(image: Any) -> tuple[Any, tuple[float, ...] | None, list[Any]]:
    """(the (Z, Y, X) data, its voxel size or None, its pyramid levels) of a path or array."""
    from napari_lsmfm.io.check import check_volume

    if isinstance(image, str | os.PathLike):
        from napari_lsmfm.io import open_volume

        vol = open_volume(image)
        check_volume(vol.data)
        return vol.data, vol.voxel_size, list(vol.metadata.get("multiscale_levels") or [])[1:]
    if len(getattr(image, "shape", ())) != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {getattr(image, 'shape', None)}")
    check_volume(image)
    return image, None, []


def open_outputs(paths: Mapping[str, Path], specs: Mapping[str, tuple[tuple[int, ...], Any]],
                 kinds: Mapping[str, str], *, plan: BlockPlan, chunks: Sequence[int],
                 voxel_size: Sequence[float] | None, resume: bool, overwrite: bool,
                 ) -> dict[str, Path]:
    """Create (or, resuming, reopen) every output; returns name -> path."""
    import zarr

    from napari_lsmfm.engine.store import remove_path
    from napari_lsmfm.io.output import partial_attrs, partial_info, partial_message
    from napari_lsmfm.io.write import create_zarr, volume_stem

    made: dict[str, Path] = {}
    record = {"plan": plan.to_dict(), "chunks": [int(c) for c in chunks]}
    for name, path in paths.items():
        shape, dtype = specs[name]
        exists = path.exists() or path.is_symlink()
        mark = partial_info(path) if exists else None
        if exists and resume and mark is not None and not mark.get("temporary"):
            if mark.get("plan") != record["plan"] or mark.get("chunks") != record["chunks"]:
                raise ValueError(f"{path} was started with other blocks ({mark.get('plan')}); "
                                 "resume with the same --block and --tile, or rerun with "
                                 "--overwrite")
            array = zarr.open_array(str(path / "0"), mode="r")
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{path} cannot be resumed: it holds {tuple(array.shape)} "
                                 f"{array.dtype}, this run writes {tuple(shape)} "
                                 f"{np.dtype(dtype)}; rerun with --overwrite")
            made[name] = path
            continue
        if exists and overwrite:
            remove_path(path)
        elif exists and mark is not None:
            raise ValueError(partial_message(path, resume=True))
        elif exists:
            raise FileExistsError(errno.EEXIST, "already exists; pass --overwrite to replace "
                                  "it", str(path))
        lead = (1,) * (len(shape) - 3)
        create_zarr(path, shape, dtype, voxel_size=voxel_size, kind=kinds[name],
                    chunks=(*lead, *chunks), name=volume_stem(path),
                    attrs=partial_attrs(command="predict", target=str(path), resumable=True,
                                        **record))
        made[name] = path
    return made


@contextmanager
def executor(in_process: bool, workers: int | None, scheduler: str | None,
             ctx: Any = None) -> Iterator[Any]:
    """The block executor of a run (here, or on a dask.distributed cluster)."""
    if in_process:
        yield local_executor(ctx)
        return
    with cluster_client(scheduler=scheduler, workers=workers) as client:
        yield dask_executor(client, ctx)


def split_classes(classes: np.ndarray, *, wanted: Sequence[int],
                  voxel_size: Sequence[float] | None, diameter: float | None) -> np.ndarray:
    """Objects of the classes ``wanted`` in a block of the class map (the segmentation
    task's own splitting: connected parts, touching objects cut by a watershed)."""
    from napari_lsmfm.tasks.segment.result import class_instances

    return class_instances(np.asarray(classes), wanted, voxel_size, diameter=diameter)


def make_instances(run: Any, task: Any, plan: BlockPlan, paths: Mapping[str, Any],
                   halo: Sequence[int], voxel_size: Sequence[float] | None,
                   classes: Sequence[int] | None, ctx: Any = None) -> int:
    """The instance labels of a finished class map, block by block, stitched across block
    borders (:mod:`.stitch`); returns the number of objects."""
    import zarr

    from napari_lsmfm.tasks.segment.result import instance_classes

    from .stitch import default_halo, stitch_instances

    wanted = instance_classes(list(classes) if classes else True, task.classes)
    diameter = task.config.object_diameter
    size = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), float)
    # objects about DEFAULT_DIAMETER voxels across when the model does not say
    across = DEFAULT_DIAMETER if diameter is None else float(diameter) / float(size.min())
    split = partial(split_classes, wanted=wanted, voxel_size=voxel_size, diameter=diameter)
    store = Path(paths["classes"])
    class_map = zarr.open_array(str(store / "0"), mode="r")
    out = zarr.open_array(str(Path(paths["instances"]) / "0"), mode="r+")
    if ctx is not None:
        ctx.report(None, "splitting objects")
    return stitch_instances(plan, class_map, out, split, halo=default_halo(across),
                            scratch=store / LEDGER_DIR / "stitch", run=run,
                            ledger_store=str(store))


def pyramid(path: Path, kind: str, voxel_size: Sequence[float] | None) -> int:
    """Write the multiscale levels of one output (:func:`~.pyramid.write_pyramid`)."""
    from .pyramid import write_pyramid

    return write_pyramid(path, kind=kind, voxel_size=voxel_size)


def finish(made: Mapping[str, Path]) -> None:
    """Clear the partial marks and remove the block records: the outputs are complete."""
    from napari_lsmfm.io.output import clear_partial

    for path in made.values():
        shutil.rmtree(path / LEDGER_DIR, ignore_errors=True)
        clear_partial(path)
