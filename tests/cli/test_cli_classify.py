"""``lsmfm classify``: objects, points and tiles; examples, prompts and a saved model;
one-line errors."""

import csv

import numpy as np
import pytest
import tifffile

from napari_lsmfm.cli import main
from napari_lsmfm.model import save_foundation


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tasks.test_classify import scene, tiny_foundation

    root = tmp_path_factory.mktemp("classify")
    image, labels, kinds, inside = scene()
    tifffile.imwrite(root / "img.tif", image)
    tifffile.imwrite(root / "labels.tif", labels)
    picks = [1, 3, 2, 4]
    with open(root / "examples.csv", "w") as handle:
        handle.write("z,y,x,class\n")
        for v in picks:
            handle.write(",".join(str(c) for c in inside[v]) + f",{kinds[v]}\n")
    with open(root / "points.csv", "w") as handle:
        handle.write("index,axis-0,axis-1,axis-2\n")
        for i, v in enumerate(sorted(kinds, reverse=True)):
            handle.write(f"{i}," + ",".join(str(c) for c in inside[v]) + "\n")
    save_foundation(tiny_foundation(), root / "fm")
    save_foundation(tiny_foundation(text=True), root / "fm_text")
    return root, kinds


def _rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_objects_examples_map_and_saved_model(files, capsys):
    root, kinds = files
    args = ["classify", str(root / "img.tif"), "--objects", str(root / "labels.tif"),
            "--examples", str(root / "examples.csv"), "--weights", str(root / "fm"), "--quiet"]
    assert main([*args, "--out", str(root / "t.csv"), "--map", str(root / "map.tif"),
                 "--save-model", str(root / "probe")]) == 0
    rows = _rows(root / "t.csv")
    assert list(rows[0]) == ["z", "y", "x", "label", "class", "confidence"]
    assert [int(r["label"]) for r in rows] == sorted(kinds)  # input order
    class_map = tifffile.imread(root / "map.tif")
    labels = tifffile.imread(root / "labels.tif")
    assert class_map.shape == labels.shape and set(np.unique(class_map[labels == 0])) == {0}
    assert main(["classify", str(root / "img.tif"), "--objects", str(root / "labels.tif"),
                 "--model", str(root / "probe"), "--out", str(root / "t2.csv"), "--quiet"]) == 0
    assert [r["class"] for r in _rows(root / "t2.csv")] == [r["class"] for r in rows]
    capsys.readouterr()
    assert main([*args, "--out", str(root / "t.csv")]) == 2  # exists, no --overwrite
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err


def test_points_with_prompts_and_tiles(files):
    root, kinds = files
    assert main(["classify", str(root / "img.tif"), "--points", str(root / "points.csv"),
                 "--prompts", "ball: nucleus;rod: vessel", "--weights", str(root / "fm_text"),
                 "--out", str(root / "p.csv"), "--quiet"]) == 0
    rows = _rows(root / "p.csv")
    assert len(rows) == len(kinds) and list(rows[0]) == ["z", "y", "x", "class", "confidence"]
    assert {r["class"] for r in rows} <= {"ball", "rod", "unknown"}
    (root / "tiles_ex.csv").write_text("z,y,x,class\n4,4,4,dark\n12,40,40,bright\n")
    assert main(["classify", str(root / "img.tif"), "--tiles", "8,24,24", "--examples",
                 str(root / "tiles_ex.csv"), "--weights", str(root / "fm"), "--out",
                 str(root / "tiles.csv"), "--map", str(root / "tiles.zarr"), "--quiet"]) == 0
    assert len(_rows(root / "tiles.csv")) == 8


@pytest.mark.parametrize("extra, message", [
    (["--points", "BAD", "--examples", "EX"], "missing column"),
    (["--points", "OUT", "--examples", "EX"], "outside the volume"),
    (["--objects", "LABELS", "--prompts", "a;b"], "text tower"),
    (["--objects", "LABELS"], "give --examples"),
    (["--points", "PTS", "--examples", "EX", "--map", "m.tif"], "--map needs"),
])
def test_bad_input_is_one_line(files, capsys, extra, message):
    root, _ = files
    (root / "bad.csv").write_text("z,y,w\n1,2,3\n")
    (root / "out.csv").write_text("z,y,x\n1,2,3\n500,2,3\n")
    names = {"BAD": root / "bad.csv", "OUT": root / "out.csv", "EX": root / "examples.csv",
             "LABELS": root / "labels.tif", "PTS": root / "points.csv", "m.tif": root / "m.tif"}
    extra = [str(names.get(a, a)) for a in extra]
    code = main(["classify", str(root / "img.tif"), *extra, "--weights", str(root / "fm"),
                 "--out", str(root / "never.csv"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert not (root / "never.csv").exists()
