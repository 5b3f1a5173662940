"""Instance labels of a volume larger than memory, split block by block and stitched
across block borders so an object cut by a border keeps one id.

Three phases; each block is an independent unit of work (only picklable arguments:
the plan, a block index, arrays or folder paths, a picklable ``split``), so a block can
run on another process or machine that shares the ``scratch`` folder:

1. :func:`block_objects`: split the block grown by a halo into objects, keep those
   present in the block's core, numbered 1..n (provisional local ids), and save to
   ``scratch`` the core and the halo bands the neighbours need.
2. :func:`stitch`: give block i's ids the offset ``sum(n of blocks before i)`` and join
   two provisional objects of neighbouring blocks (all 26: faces, edges, corners) when
   they overlap in the halo (:func:`overlap_pairs`); the joined groups, numbered 1..N,
   make the lookup table, saved as ``scratch/table.npz``.
3. :func:`relabel_block`: write the block's final ids into the output.

:func:`stitch_instances` runs the three with any executor and, given a ledger folder,
resumes where a crashed run stopped.

Which objects are joined. On the region R = (block i grown by the halo) ∩ (block j), i
labelled what it saw in its halo and j labelled its own core; an object a of i and an
object b of j are one object when they share at least ``min_overlap`` of the voxels of
the smaller of the two in R. The smaller one, because an object that only grazes R (a
thin object crossing the border by one voxel, a corner) has few voxels there, all of
which agree; IoU or the larger object's share would reject it. A share and not any
contact, because a split that cuts touching objects apart (a watershed) may put the cut
a few voxels apart in the two views; the sliver that lands on the wrong side is a small
share of either object and must not join the neighbours. With a split that sees the
same objects in both views (connected components), true pairs share all of their
voxels in R, and the result equals the split of the whole volume. ``min_overlap=0``
joins on any shared voxel (exact for connected components whatever their shape).

What distributed Cellpose does instead (``block_face_adjacency_graph``): it crops each
block's labels to its core, shrinks them by one voxel and joins labels that touch
across a face; it looks at faces only (an object crossing an edge or a corner
diagonally is missed) and the shrinking erases objects one or two voxels thick. The
halo overlap here compares the same voxels seen by both blocks, on faces, edges and
corners alike.

Scratch holds, per block, a compressed copy of its provisional core labels (so
relabelling reads provisional ids from there and can be rerun after a crash in the
middle of a block, and the output is written once, with final ids) and its halo bands;
remove the folder once the run is finished.
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.scale.blocks import BlockPlan, Ledger

__all__ = ["TABLE_FILE", "block_objects", "block_offsets", "block_pairs", "class_components",
           "default_halo", "load_table", "overlap_pairs", "relabel_block", "serial",
           "stitch", "stitch_instances"]

TABLE_FILE = "table.npz"

Runner = Callable[[Callable[[int], Any], Sequence[int]], Iterable[tuple[int, Any]]]


def default_halo(diameter_voxels: float | Sequence[float], *, minimum: int = 4
                 ) -> tuple[int, int, int]:
    """A halo of about one object diameter (voxels, per axis: give (z, y, x) diameters
    for anisotropic voxels), at least ``minimum`` voxels.

    One diameter: an object cut by a border reaches at most one diameter past it, so
    both blocks see it whole and split it as the whole volume would; their labels then
    agree in the halo (shares near 1) and watershed seeds are not moved by a truncated
    object. At least a few voxels: the overlap is measured on the halo's depth, which
    must outweigh a one-voxel disagreement at the border, and smoothing splits need some
    context."""
    sizes = ((float(diameter_voxels),) * 3 if np.ndim(diameter_voxels) == 0
             else tuple(float(d) for d in diameter_voxels))  # type: ignore[union-attr]
    if len(sizes) != 3 or not all(math.isfinite(d) and d >= 0 for d in sizes):
        raise ValueError(f"diameter_voxels must be one or three sizes >= 0, got {diameter_voxels}")
    return tuple(max(int(minimum), math.ceil(d)) for d in sizes)  # type: ignore[return-value]


def class_components(classes: np.ndarray, *, connectivity: int = 1) -> np.ndarray:
    """A ``split``: the connected components of each class value on its own (uint32 ids,
    unique across classes, 0 = background), so objects of two classes that touch stay
    apart. ``connectivity``: 1 = faces, 2 = edges too, 3 = corners too."""
    from scipy import ndimage

    classes = np.asarray(classes)
    structure = ndimage.generate_binary_structure(classes.ndim, connectivity)
    labels = np.zeros(classes.shape, np.uint32)
    offset = 0
    for value in np.unique(classes):
        if value == 0:
            continue
        found, n = ndimage.label(classes == value, structure=structure)
        mask = found > 0
        labels[mask] = found[mask] + offset
        offset += n
    return labels


def serial(fn: Callable[[int], Any], indices: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """The default executor: run ``fn`` on each block in turn, yielding (index, result)."""
    for index in indices:
        yield index, fn(index)


def _halo(halo: Sequence[int] | int) -> tuple[int, int, int]:
    halo = (halo,) * 3 if np.ndim(halo) == 0 else tuple(halo)  # type: ignore[arg-type]
    halo = tuple(int(h) for h in halo)
    if len(halo) != 3 or min(halo) < 1:
        raise ValueError(f"halo must be one or three sizes >= 1 voxel (the overlap is "
                         f"measured in it), got {halo}; see default_halo")
    return halo  # type: ignore[return-value]


def _intersect(a: Sequence[slice], b: Sequence[slice]) -> tuple[slice, ...]:
    return tuple(slice(max(x.start, y.start), min(x.stop, y.stop))
                 for x, y in zip(a, b, strict=True))


def _within(inner: Sequence[slice], outer: Sequence[slice]) -> tuple[slice, ...]:
    """``inner`` (volume coordinates) relative to the start of ``outer``."""
    return tuple(slice(i.start - o.start, i.stop - o.start)
                 for i, o in zip(inner, outer, strict=True))


def _small(labels: np.ndarray, n: int) -> np.ndarray:
    """``labels`` (ids <= n) in the narrowest unsigned type: smaller scratch files."""
    dtype = np.uint8 if n < 2**8 else np.uint16 if n < 2**16 else np.uint32
    return labels.astype(dtype, copy=False)


def _save(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` under a temporary name, then renamed (atomic)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def _block_file(scratch: str | os.PathLike, index: int) -> Path:
    return Path(scratch) / f"objects-{index}.npz"


def _open_block(plan: BlockPlan, scratch: str | os.PathLike, index: int) -> Any:
    path = _block_file(scratch, index)
    if not path.is_file():
        raise FileNotFoundError(f"no objects of block {index} in {scratch} ({path.name}); "
                                f"run block_objects on it first")
    saved = np.load(path)
    written = tuple(saved["plan"])
    if written != (*plan.shape, *plan.block):
        saved.close()
        raise ValueError(f"{path} was written for another block plan ({written}, not "
                         f"{(*plan.shape, *plan.block)}); use a fresh scratch folder")
    return saved


def block_objects(plan: BlockPlan, index: int, classes: Any, split: Callable[[np.ndarray], Any],
                  halo: Sequence[int] | int, scratch: str | os.PathLike) -> int:
    """Phase 1: the objects of block ``index``; returns their number n.

    Reads ``classes`` ((Z, Y, X) class map, 0 = background; zarr, numpy or dask) on the
    block grown by ``halo``, splits it with ``split`` (class map -> integer object ids,
    0 = none, same shape; e.g. :func:`class_components`), numbers the objects present in
    the block's core 1..n and saves to ``scratch/objects-<index>.npz`` (atomically): the
    core, and for each neighbour j the block's labels on (grown block ∩ j) (objects
    outside the core as 0) and its core labels on (j grown ∩ this block). Marks nothing:
    the caller records the block (``Ledger(store, "objects").mark(index, n=n)``)."""
    halo = _halo(halo)
    if tuple(classes.shape) != plan.shape:
        raise ValueError(f"classes has shape {tuple(classes.shape)}, the plan {plan.shape}")
    grown, box = plan.expanded(index, halo), plan.box(index)
    labels = np.asarray(split(np.asarray(classes[grown])))
    extent = tuple(s.stop - s.start for s in grown)
    if labels.shape != extent or labels.dtype.kind not in "iub":
        raise ValueError(f"split must return integer ids of the block's shape {extent}, got "
                         f"{labels.dtype} {labels.shape}")
    core = labels[_within(box, grown)]
    ids = np.unique(core)
    ids = ids[ids > 0]
    n = len(ids)
    local = np.zeros(labels.shape, np.uint32)
    if n:
        where = np.minimum(np.searchsorted(ids, labels), n - 1)
        hit = (labels > 0) & (ids[where] == labels)
        local[hit] = where[hit] + 1
    bands: dict[str, np.ndarray] = {}
    for j in plan.neighbours(index):
        seen = _intersect(grown, plan.box(j))  # inside j, seen by this block
        mine = _intersect(plan.expanded(j, halo), box)  # inside this block, seen by j
        bands[f"view-{j}"] = _small(local[_within(seen, grown)], n)
        bands[f"own-{j}"] = _small(local[_within(mine, grown)], n)
    Path(scratch).mkdir(parents=True, exist_ok=True)
    _save(_block_file(scratch, index), plan=np.array((*plan.shape, *plan.block), np.int64),
          halo=np.array(halo, np.int64), n=np.array(n, np.int64),
          core=_small(local[_within(box, grown)], n), **bands)
    return n


def overlap_pairs(mine: np.ndarray, theirs: np.ndarray, min_overlap: float = 0.5) -> np.ndarray:
    """The pairs (a, b), a an id in ``mine`` and b in ``theirs`` (two labellings of the
    same region, 0 = none), that share at least ``min_overlap`` of the voxels the
    smaller of the two has in the region (at least one voxel): (k, 2) int64."""
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in [0, 1], got {min_overlap}")
    mine = np.asarray(mine).ravel().astype(np.int64)
    theirs = np.asarray(theirs).ravel().astype(np.int64)
    if mine.shape != theirs.shape:
        raise ValueError(f"the two labellings differ in size: {mine.size} vs {theirs.size}")
    both = (mine > 0) & (theirs > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    span = int(theirs.max()) + 1
    keys, common = np.unique(mine[both] * span + theirs[both], return_counts=True)
    a, b = keys // span, keys % span
    smaller = np.minimum(np.bincount(mine)[a], np.bincount(theirs)[b])
    keep = common >= min_overlap * smaller
    return np.stack([a[keep], b[keep]], axis=1)


def block_offsets(plan: BlockPlan, counts: Mapping[int, int]) -> np.ndarray:
    """offsets[i] = the objects of the blocks before i (length len(plan) + 1, the last
    the total): block i's local id k is the provisional id offsets[i] + k."""
    missing = [i for i in plan if i not in counts]
    if missing:
        raise ValueError(f"no object count for blocks {missing[:10]} (of {len(missing)}); "
                         f"run block_objects on them first")
    sizes = np.array([int(counts[i]) for i in plan], np.int64)
    return np.concatenate([[0], np.cumsum(sizes)])


def block_pairs(plan: BlockPlan, index: int, scratch: str | os.PathLike, offsets: np.ndarray,
                min_overlap: float = 0.5) -> np.ndarray:
    """Phase 2, one block: the provisional ids (k, 2) to join between this block's view
    of each neighbour and that neighbour's own labels, on the neighbour's side."""
    found = []
    with _open_block(plan, scratch, index) as saved:
        n, halo = int(saved["n"]), tuple(saved["halo"])
        if n != offsets[index + 1] - offsets[index]:
            raise ValueError(f"block {index} has {n} objects in {scratch}, the counts say "
                             f"{offsets[index + 1] - offsets[index]}; rerun it")
        for j in plan.neighbours(index):
            mine = saved[f"view-{j}"]
            if not mine.any():  # none of this block's objects reach j: nothing to join
                continue
            with _open_block(plan, scratch, j) as other:
                if tuple(other["halo"]) != halo:
                    raise ValueError(f"blocks {index} and {j} were split with different "
                                     f"halos; rerun with one halo in a fresh scratch folder")
                theirs = other[f"own-{index}"]
            pairs = overlap_pairs(mine, theirs, min_overlap)
            found.append(pairs + np.array([offsets[index], offsets[j]], np.int64))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def stitch(plan: BlockPlan, scratch: str | os.PathLike, counts: Mapping[int, int], *,
           min_overlap: float = 0.5, run: Runner | None = None) -> np.ndarray:
    """Phase 2: the lookup table ``table[provisional id] -> final id`` (uint32, 0 -> 0,
    final ids 1..N consecutive, in the order of the blocks), saved with the block
    offsets in ``scratch/table.npz`` (atomically; :func:`load_table`).

    ``counts``: block -> its number of objects (what :func:`block_objects` returned);
    ``run``: the executor for the blocks' :func:`block_pairs` (default :func:`serial`)."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    offsets = block_offsets(plan, counts)
    total = int(offsets[-1])
    if total >= 2**32:
        raise ValueError(f"{total} provisional objects do not fit uint32 ids")
    fn = functools.partial(block_pairs, plan, scratch=str(scratch), offsets=offsets,
                           min_overlap=min_overlap)
    found = [pairs for _, pairs in (run or serial)(fn, list(plan))]
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    # union-find over the provisional ids: the connected groups of the join graph
    graph = sparse.coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])),
                              shape=(total + 1, total + 1))
    _, group = connected_components(graph, directed=False)
    table = np.zeros(total + 1, np.uint32)
    if total:
        _, final = np.unique(group[1:], return_inverse=True)
        table[1:] = final.ravel() + 1
    Path(scratch).mkdir(parents=True, exist_ok=True)
    _save(Path(scratch) / TABLE_FILE, table=table, offsets=offsets)
    return table


@functools.lru_cache(maxsize=2)
def _read_table(path: str, stamp: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as saved:
        table, offsets = saved["table"], saved["offsets"]
    table.flags.writeable = offsets.flags.writeable = False
    return table, offsets


def load_table(scratch: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The (table, offsets) :func:`stitch` saved in ``scratch`` (read-only arrays, read
    once per process while the file stays the same)."""
    path = Path(scratch) / TABLE_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"no stitched table in {scratch}; run stitch first") from None
    return _read_table(str(path.resolve()), (st.st_ino, st.st_mtime_ns, st.st_size))


def relabel_block(plan: BlockPlan, index: int, out: Any, scratch: str | os.PathLike, *,
                  table: np.ndarray | None = None, offsets: np.ndarray | None = None) -> int:
    """Phase 3: ``out[box] = table[offsets[index] + local id]`` (0 stays 0) for block
    ``index``, its local ids read from scratch (so it can be rerun); ``table`` and
    ``offsets`` default to :func:`load_table`. Returns the block's number of objects."""
    if table is None or offsets is None:
        table, offsets = load_table(scratch)
    with _open_block(plan, scratch, index) as saved:
        core, n = saved["core"], int(saved["n"])
    if n != offsets[index + 1] - offsets[index]:
        raise ValueError(f"block {index} has {n} objects in {scratch} but the table was "
                         f"stitched with {offsets[index + 1] - offsets[index]}; stitch again")
    lut = np.array(table[offsets[index]:offsets[index] + n + 1], np.uint32)
    lut[0] = 0
    out[plan.box(index)] = lut[core]
    return n


def _clear(ledger: Ledger) -> None:
    for path in ledger.folder.glob("*.json") if ledger.folder.is_dir() else ():
        path.unlink(missing_ok=True)


def stitch_instances(plan: BlockPlan, classes: Any, out: Any, split: Callable[[np.ndarray], Any],
                     *, halo: Sequence[int] | int, scratch: str | os.PathLike,
                     run: Runner | None = None, ledger_store: str | os.PathLike | None = None,
                     min_overlap: float = 0.5) -> int:
    """Split ``classes`` into objects block by block and write them, stitched, into
    ``out`` (uint32 array of the plan's shape, e.g. zarr chunked by ``plan.block``);
    returns the number of objects.

    ``run(fn, indices)`` yields (index, fn(index)) as blocks finish (default
    :func:`serial`; plug in a process pool or dask.distributed: every ``fn`` pickles).
    ``ledger_store``: a folder where each finished block is recorded
    (``Ledger(store, "objects")``, ``Ledger(store, "relabel")``); a rerun skips them."""
    run = run or serial
    halo = _halo(halo)
    if tuple(out.shape) != plan.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the plan {plan.shape}")
    if np.dtype(out.dtype).kind not in "iu":
        raise ValueError(f"out must be an integer array (uint32), got {out.dtype}")
    objects = Ledger(ledger_store, "objects") if ledger_store is not None else None
    relabel = Ledger(ledger_store, "relabel") if ledger_store is not None else None
    counts: dict[int, int] = {}
    if objects is not None:
        counts = {i: int(r["n"]) for i, r in objects.records().items()
                  if "n" in r and _block_file(scratch, i).is_file()}
    todo = [i for i in plan if i not in counts]
    fn = functools.partial(block_objects, plan, classes=classes, split=split, halo=halo,
                           scratch=str(scratch))
    for index, n in run(fn, todo):
        counts[index] = int(n)
        if objects is not None:
            objects.mark(index, n=int(n))
    table_file = Path(scratch) / TABLE_FILE
    table = offsets = None
    if not todo and table_file.is_file() and relabel is not None:
        table, offsets = load_table(scratch)
        if not np.array_equal(offsets, block_offsets(plan, counts)):
            table = offsets = None
    if table is None:
        if relabel is not None:
            _clear(relabel)  # a new table: every block is relabelled with it
        table = stitch(plan, scratch, counts, min_overlap=min_overlap, run=run)
        offsets = block_offsets(plan, counts)
    total = int(table.max()) if table.size else 0
    if total > np.iinfo(np.dtype(out.dtype)).max:
        raise ValueError(f"{total} objects do not fit out's {out.dtype}; give a uint32 array")
    done = relabel.done() if relabel is not None else set()
    fn = functools.partial(relabel_block, plan, out=out, scratch=str(scratch))
    for index, n in run(fn, [i for i in plan if i not in done]):
        if relabel is not None:
            relabel.mark(index, n=int(n))
    return total
