"""The object table, block by block: the same numbers for numpy, dask and zarr labels
(objects spanning blocks), classes by majority, confidence and uncertainty; a lazy
prediction is reviewed in a zarr working copy and never written."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_lsmfm.review import ReviewSession
from napari_lsmfm.review.objects import ObjectTable, box_of, iter_blocks

SHAPE = (10, 24, 36)


def blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    lab = np.zeros(SHAPE, np.uint16)
    lab[1:9, 3:20, 4:15] = 5  # spans several 4x8x8 blocks
    lab[2:5, 2:6, 20:33] = 7
    lab[6:10, 10:24, 18:36] = 1000
    holes = rng.random(SHAPE) < 0.1
    lab[holes & (lab == 5)] = 0
    return lab


def reference(lab: np.ndarray, oid: int) -> dict:
    zz, yy, xx = np.nonzero(lab == oid)
    return {"voxels": len(zz), "centroid": (zz.mean(), yy.mean(), xx.mean()),
            "bbox": tuple(slice(int(c.min()), int(c.max()) + 1) for c in (zz, yy, xx))}


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr"])
def test_table_is_exact_for_any_array_kind(kind, tmp_path):
    lab = blobs()
    if kind == "dask":
        source = da.from_array(lab, chunks=(3, 7, 9))
    elif kind == "zarr":
        source = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=SHAPE,
                                 chunks=(4, 8, 8), dtype=lab.dtype, zarr_format=2)
        source[:] = lab
    else:
        source = lab
    table = ObjectTable(SHAPE, voxel_size=(2.0, 0.5, 0.5), block=(4, 8, 8))
    records = table.scan(source)
    assert sorted(records) == [5, 7, 1000]
    for oid, rec in records.items():
        ref = reference(lab, oid)
        assert rec.voxels == ref["voxels"] and rec.bbox == ref["bbox"]
        np.testing.assert_allclose(rec.centroid, ref["centroid"])
        assert rec.volume_um3 == pytest.approx(ref["voxels"] * 0.5)
        assert rec.cls == 2 and rec.confidence is None and rec.uncertainty is None


def test_class_by_majority_confidence_and_uncertainty():
    lab = blobs()
    classes = np.where(lab > 0, 2, 0).astype(np.uint8)
    classes[1:9, 3:12, 4:15][lab[1:9, 3:12, 4:15] == 5] = 3  # most of object 5 is class 3
    classes[6:10, 10:24, 18:36] = 0  # no class under object 1000: class 2
    rng = np.random.default_rng(1)
    p = rng.random(SHAPE).astype(np.float32)
    probs = np.stack([1 - p, p])
    unc = rng.random(SHAPE).astype(np.float32)
    table = ObjectTable(SHAPE, classes=classes, probabilities=probs, channel_values=(0, 2),
                        uncertainty=unc, block=(4, 8, 8))
    records = table.scan(da.from_array(lab, chunks=(5, 12, 12)))
    assert (records[5].cls, records[7].cls, records[1000].cls) == (3, 2, 2)
    for oid, rec in records.items():
        inside = lab == oid
        assert rec.confidence == pytest.approx(probs.max(0)[inside].mean(), rel=1e-5)
        assert rec.uncertainty == pytest.approx(unc[inside].mean(), rel=1e-5)
    as_bytes = ObjectTable(SHAPE, probabilities=np.round(probs * 255).astype(np.uint8),
                           channel_values=(0, 2), block=(4, 8, 8)).scan(lab)
    assert as_bytes[7].confidence == pytest.approx(records[7].confidence, abs=0.01)


def test_scan_of_a_box_and_some_ids():
    lab = blobs()
    table = ObjectTable(SHAPE, block=(4, 8, 8))
    box = (slice(1, 9), slice(2, 20), slice(4, 33))
    part = table.scan(lab, box, ids=[7])
    assert list(part) == [7] and part[7].voxels == int((lab == 7).sum())
    assert box_of(lab == 7) == part[7].bbox
    assert box_of(np.zeros((2, 2, 2), bool)) is None
    boxes = list(iter_blocks(SHAPE, (4, 8, 8)))
    assert len(boxes) == 3 * 3 * 5 and sum(np.prod([s.stop - s.start for s in b])
                                           for b in boxes) == np.prod(SHAPE)


@pytest.mark.parametrize("kind", ["dask", "zarr"])
def test_lazy_prediction_is_reviewed_in_a_zarr_copy(kind, tmp_path):
    lab = blobs()
    if kind == "dask":
        source = da.from_array(lab, chunks=(4, 8, 8))
    else:
        source = zarr.open_array(str(tmp_path / "pred.zarr"), mode="w", shape=SHAPE,
                                 chunks=(4, 8, 8), dtype=lab.dtype, zarr_format=2)
        source[:] = lab
    state = tmp_path / "pred.lsmfm-review.json"
    s = ReviewSession(source, block=(4, 8, 8), state_path=state)
    assert isinstance(s.labels, zarr.Array)
    assert (tmp_path / "pred.lsmfm-review.labels.zarr").is_dir()
    s.reject(7)
    s.merge(5, 1000)
    expected = np.where(lab == 7, 0, np.where(lab == 1000, 5, lab))
    np.testing.assert_array_equal(s.labels[:], expected)
    np.testing.assert_array_equal(np.asarray(source[:]), lab)  # the input is never written
    assert s.record(5).voxels == int(((lab == 5) | (lab == 1000)).sum())
    again = ReviewSession(source, block=(4, 8, 8), state_path=state)
    np.testing.assert_array_equal(again.labels[:], expected)
    assert again.undo()
    np.testing.assert_array_equal(again.labels[:], np.where(lab == 7, 0, lab))


def test_lazy_prediction_without_state_uses_a_temporary_copy():
    lab = blobs()
    s = ReviewSession(da.from_array(lab, chunks=(4, 8, 8)), block=(4, 8, 8))
    folder = s.labels.store.root if hasattr(s.labels.store, "root") else None
    s.reject(5)
    assert s.labels[3, 10, 10] == 0
    s.close()
    if folder is not None:
        assert not folder.exists()
