"""Instance labels split block by block and stitched across block borders: objects
across every kind of border (faces, edges, the corner of 8 blocks, three blocks in a
row, one voxel across, diagonally through a corner) keep one id and the result is the
whole-volume labelling up to the ids; touching objects of two classes stay apart;
a watershed split of touching balls matches the whole volume's; a crashed run resumes
to the same result; odd plans, one block, an empty volume."""

from __future__ import annotations

import functools
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor, as_completed

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage

from napari_lsmfm.scale.blocks import BlockPlan, Ledger
from napari_lsmfm.scale.stitch import (
    block_objects,
    class_components,
    default_halo,
    load_table,
    overlap_pairs,
    relabel_block,
    stitch,
    stitch_instances,
)

SHAPE = (48, 48, 46)  # blocks of 16: borders at 16 and 32 on every axis, last x block 14
BLOCK = 16


def ball(vol, centre, radius, value=1):
    zz, yy, xx = np.indices(vol.shape, sparse=True)
    z, y, x = centre
    vol[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = value


def diagonal(vol, start, stop, value=1):
    for t in range(start, stop):
        vol[t, t, t] = value


# one object each; (name, painter) with the border kind it crosses (or not)
OBJECTS = {
    "z face": lambda v: v.__setitem__((slice(12, 20), slice(4, 10), slice(4, 10)), 1),
    "y face": lambda v: v.__setitem__((slice(4, 10), slice(12, 21), slice(36, 42)), 1),
    "x face": lambda v: v.__setitem__((slice(36, 42), slice(4, 10), slice(28, 36)), 1),
    "edge z-y": lambda v: v.__setitem__((slice(13, 19), slice(29, 35), slice(20, 26)), 1),
    "corner of 8": lambda v: ball(v, (32, 32, 32), 5),
    "three in a row": lambda v: v.__setitem__((slice(24, 27), slice(4, 7), slice(2, 45)), 1),
    "one voxel across": lambda v: v.__setitem__((slice(5, 6), slice(40, 41), slice(20, 33)), 1),
    "touching a border": lambda v: v.__setitem__((slice(40, 44), slice(20, 26), slice(8, 16)), 1),
    "touching from beyond": lambda v: v.__setitem__((slice(40, 44), slice(36, 42), slice(16, 22)),
                                                    1),
    "near a border": lambda v: v.__setitem__((slice(24, 28), slice(18, 30), slice(2, 14)), 1),
}


def same_objects(found: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to a permutation of ids; ``found``'s ids consecutive from 1."""
    assert np.array_equal(found > 0, expected > 0)
    fg = expected > 0
    pairs = np.unique(np.stack([found[fg], expected[fg]]), axis=1)
    ids = np.unique(found[fg])
    assert pairs.shape[1] == len(ids) == len(np.unique(expected[fg]))
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))


def run_blocks(classes, split=class_components, *, block=BLOCK, halo=3, scratch, **kw):
    plan = BlockPlan.build(classes.shape, block)
    out = np.zeros(classes.shape, np.uint32)
    n = stitch_instances(plan, classes, out, split, halo=halo, scratch=scratch, **kw)
    return n, out


def scene() -> np.ndarray:
    vol = np.zeros(SHAPE, np.uint8)
    for paint in OBJECTS.values():
        paint(vol)
    return vol


def test_all_borders_at_once_equal_the_whole_volume_labelling(tmp_path):
    vol = scene()
    expected, n_expected = ndimage.label(vol)
    assert n_expected == len(OBJECTS)  # the painted objects do not touch
    # a real zarr output chunked like the plan; a dask class map
    out = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=SHAPE,
                            chunks=(BLOCK,) * 3, dtype=np.uint32, fill_value=0)
    plan = BlockPlan.build(SHAPE, BLOCK, chunks=out.chunks)
    assert len(plan.neighbours(plan.index((1, 1, 1)))) == 26
    n = stitch_instances(plan, da.from_array(vol, chunks=10), out, class_components,
                         halo=3, scratch=tmp_path / "scratch")
    found = out[...]
    ids = {}
    for name, paint in OBJECTS.items():  # each object alone: the ids it got
        alone = np.zeros(SHAPE, np.uint8)
        paint(alone)
        ids[name] = set(np.unique(found[alone > 0]).tolist())
    assert {name: len(i) for name, i in ids.items()} == dict.fromkeys(OBJECTS, 1)
    assert len(set.union(*ids.values())) == len(OBJECTS)  # distinct objects, distinct ids
    assert n == n_expected
    same_objects(found, expected)


def test_a_diagonal_through_a_corner_needs_only_corner_contact(tmp_path):
    # voxels (t, t, t): block (0,0,0) and block (1,1,1) meet only at a corner point
    vol = np.zeros(SHAPE, np.uint8)
    diagonal(vol, 8, 25)
    corners = functools.partial(class_components, connectivity=3)
    n, out = run_blocks(vol, corners, scratch=tmp_path / "a")
    assert n == 1 and np.array_equal(out, vol.astype(np.uint32))
    n, out = run_blocks(vol, class_components, scratch=tmp_path / "b")  # faces only
    assert n == ndimage.label(vol)[1] == 17


def test_touching_objects_of_two_classes_stay_apart(tmp_path):
    vol = np.zeros(SHAPE, np.uint8)
    vol[4:12, 4:12, 8:16] = 1  # ends at the x border 16 ...
    vol[4:12, 4:12, 16:24] = 2  # ... where the other class begins
    vol[20:30, 30:34, 30:34] = 1  # and two classes meeting at the corner (32, 32, 32)
    vol[30:40, 32:36, 32:36] = 2
    n, out = run_blocks(vol, scratch=tmp_path)
    assert n == 4
    same_objects(out, class_components(vol))
    for value in (1, 2):  # no object has voxels of both classes
        assert not set(np.unique(out[vol == value])) & set(np.unique(out[vol == 3 - value]))


def test_touching_balls_split_by_watershed_match_the_whole_volume(tmp_path):
    shape = (48, 48, 48)
    vol = np.zeros(shape, np.uint8)
    for centre in [(24, 18, 24), (24, 30, 24), (10, 10, 36), (36, 38, 10)]:
        ball(vol, centre, 6.5)  # the first two touch, both cut by the z and x borders
    from napari_lsmfm.tasks.segment.result import class_instances  # imports torch

    split = functools.partial(class_instances, wanted=(1,), voxel_size=None, diameter=13.0)
    whole = split(vol)
    assert whole.max() == 4
    n, out = run_blocks(vol, split, block=24, halo=default_halo(13), scratch=tmp_path)
    assert n == 4
    same_objects(out, whole)


def test_overlap_rule_joins_the_smaller_objects_majority_not_a_sliver():
    mine = np.zeros(40, np.uint32)
    theirs = np.zeros(40, np.uint32)
    mine[0:10] = 1  # object 1: 8 voxels agree with their 1, a 2-voxel sliver on their 2
    theirs[0:8] = 1
    theirs[8:30] = 2
    mine[35] = 3  # a one-voxel object (a thin one grazing the region) inside their 4
    theirs[33:40] = 4
    pairs = {tuple(p) for p in overlap_pairs(mine, theirs)}
    assert pairs == {(1, 1), (3, 4)}
    assert {tuple(p) for p in overlap_pairs(mine, theirs, 0.0)} == {(1, 1), (1, 2), (3, 4)}
    assert {tuple(p) for p in overlap_pairs(mine, theirs, 0.9)} == {(1, 1), (3, 4)}
    with pytest.raises(ValueError, match="min_overlap"):
        overlap_pairs(mine, theirs, 1.5)


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """The scene stitched in one run without a ledger: (n, labels)."""
    return run_blocks(scene(), scratch=tmp_path_factory.mktemp("once"))


class Crash(RuntimeError):
    pass


def crash_after(k: int, phase):
    """An executor that runs ``k`` blocks of ``phase`` (their work done) and then dies
    before reporting the next one's result, as a killed worker would."""
    def run(fn, indices):
        for count, index in enumerate(indices):
            result = fn(index)
            if fn.func is phase and count == k:
                raise Crash(f"killed after block {index}")
            yield index, result
    return run


@pytest.mark.parametrize("phase", [block_objects, relabel_block])
def test_a_crashed_run_resumes_to_the_same_result(phase, one_run, tmp_path):
    vol = scene()
    plan = BlockPlan.build(SHAPE, BLOCK)
    n_once, once = one_run
    calls = []

    def split(classes):
        calls.append(1)
        return class_components(classes)

    out = np.zeros(SHAPE, np.uint32)
    kw = dict(halo=3, scratch=tmp_path / "scratch", ledger_store=tmp_path / "store")
    half = len(plan) // 2
    with pytest.raises(Crash):
        stitch_instances(plan, vol, out, split, run=crash_after(half, phase), **kw)
    recorded = Ledger(tmp_path / "store", "objects").done()
    assert len(recorded) == (half if phase is block_objects else len(plan))
    calls.clear()
    n = stitch_instances(plan, vol, out, split, **kw)
    assert len(calls) == len(plan) - len(recorded)  # recorded blocks are not split again
    assert n == n_once
    assert np.array_equal(out, once)  # a block relabelled twice is still right
    assert Ledger(tmp_path / "store", "relabel").done() == set(plan)
    calls.clear()
    assert stitch_instances(plan, vol, out, split, **kw) == n_once and not calls


def pool(fn, indices):
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as ex:
        futures = {ex.submit(fn, i): i for i in indices}
        for future in as_completed(futures):
            yield futures[future], future.result()


def test_blocks_run_in_other_processes_on_zarr_arrays(tmp_path):
    vol = scene()
    classes = zarr.create_array(store=str(tmp_path / "classes.zarr"), shape=SHAPE,
                                chunks=(BLOCK,) * 3, dtype=np.uint8)
    classes[...] = vol
    out = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=SHAPE,
                            chunks=(BLOCK,) * 3, dtype=np.uint32, fill_value=0)
    plan = BlockPlan.build(SHAPE, BLOCK)
    fn = functools.partial(block_objects, plan, classes=classes, split=class_components,
                           halo=3, scratch=str(tmp_path / "s"))
    assert pickle.loads(pickle.dumps(fn))(0) == fn(0)
    n = stitch_instances(plan, classes, out, class_components, halo=3, scratch=tmp_path / "s",
                         run=pool)
    same_objects(out[...], ndimage.label(vol)[0])
    assert n == len(OBJECTS)


def test_phases_by_hand_and_the_saved_table(tmp_path):
    vol = scene()
    plan = BlockPlan.build(SHAPE, (24, 16, 12))  # not cubic; the last x block is 10 wide
    counts = {i: block_objects(plan, i, vol, class_components, 3, tmp_path) for i in plan}
    table = stitch(plan, tmp_path, counts)
    saved, offsets = load_table(tmp_path)
    assert np.array_equal(saved, table) and table.dtype == np.uint32 and table[0] == 0
    assert len(table) == sum(counts.values()) + 1 and offsets[-1] == sum(counts.values())
    assert table.max() == len(OBJECTS)
    out = np.zeros(SHAPE, np.uint32)
    for i in reversed(list(plan)):
        relabel_block(plan, i, out, tmp_path)
    same_objects(out, ndimage.label(vol)[0])


def test_one_block_and_an_empty_volume(tmp_path):
    vol = scene()
    n, out = run_blocks(vol, block=SHAPE, scratch=tmp_path / "one")
    assert n == len(OBJECTS)
    same_objects(out, ndimage.label(vol)[0])
    empty = np.zeros((20, 30, 17), np.uint8)
    n, out = run_blocks(empty, block=8, scratch=tmp_path / "empty")
    assert n == 0 and not out.any()
    assert np.array_equal(load_table(tmp_path / "empty")[0], [0])


def test_mistakes_are_refused_with_what_to_do(tmp_path):
    vol = scene()
    plan = BlockPlan.build(SHAPE, BLOCK)
    with pytest.raises(ValueError, match="halo must be"):
        block_objects(plan, 0, vol, class_components, 0, tmp_path)
    with pytest.raises(ValueError, match="split must return"):
        block_objects(plan, 0, vol, lambda c: c[1:], 3, tmp_path)
    with pytest.raises(ValueError, match="no object count"):
        stitch(plan, tmp_path, {0: 1})
    with pytest.raises(FileNotFoundError, match="block_objects"):
        stitch(plan, tmp_path / "none", dict.fromkeys(plan, 0))
    with pytest.raises(ValueError, match="out has shape"):
        stitch_instances(plan, vol, np.zeros((4, 4, 4), np.uint32), class_components,
                         halo=3, scratch=tmp_path)


def test_default_halo_is_about_one_diameter():
    assert default_halo(13) == (13, 13, 13)
    assert default_halo((3.2, 12.5, 12.5)) == (4, 13, 13)  # anisotropic voxels, at least 4
    assert default_halo(0.5, minimum=2) == (2, 2, 2)
    with pytest.raises(ValueError, match="diameter_voxels"):
        default_halo((1, 2))
