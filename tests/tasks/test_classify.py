"""Classification of objects, points and tiles: few-shot, zero-shot, unknown, the table,
save / load and the messages for bad input (tiny foundations, small volumes)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from napari_lsmfm.model import Foundation, FoundationSpec, build_lsmfm_text_tower
from napari_lsmfm.tasks import load_model, task_class
from napari_lsmfm.tasks.classify import (
    ClassificationResult,
    Classifier,
    ClassifyConfig,
    Examples,
    read_examples_csv,
    read_points_csv,
)


def tiny_foundation(text: bool = False) -> Foundation:
    torch.manual_seed(0)
    if not text:
        spec = FoundationSpec("unet", embed_dim=8, channels=(8, 16), strides=(2,),
                              num_res_units=0, variant="image_only")
        return Foundation(spec, source="memory")
    tower = build_lsmfm_text_tower(["nucleus", "nuclei", "vessel", "blob", "rod"], 16,
                                   width=16, layers=0, heads=2)
    spec = FoundationSpec("unet", embed_dim=8, channels=(8, 16), strides=(2,),
                          num_res_units=0, variant="image_text", proj_dim=16,
                          text=tower.config())
    return Foundation(spec, source="memory")


def scene(seed: int = 0):
    """(16, 48, 48) float32: bright balls (radius 2.5) and long dim rods, with labels; the
    kind of each label; one voxel inside each object."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 5, (16, 48, 48)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint16)
    z, y, x = np.mgrid[:16, :48, :48]
    kinds, inside = {}, {}
    value = 1
    for row in range(3):
        for col in range(4):
            cy, cx, cz = 6 + 12 * row, 6 + 11 * col, 8
            if (row + col) % 2 == 0:
                mask = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= 2.5 ** 2
                image[mask] += 400
                kinds[value] = "ball"
            else:
                mask = (abs(z - cz) <= 1) & (abs(y - cy) <= 1) & (abs(x - cx) <= 4)
                image[mask] += 150
                kinds[value] = "rod"
            labels[mask] = value
            inside[value] = (cz, cy, cx)
            value += 1
    return image, labels, kinds, inside


def examples_of(kinds, inside, per_class=2):
    picked = {"ball": [], "rod": []}
    for value, kind in kinds.items():
        if len(picked[kind]) < per_class:
            picked[kind].append(value)
    values = picked["ball"] + picked["rod"]
    return Examples([inside[v] for v in values], [kinds[v] for v in values])


@pytest.fixture(scope="module")
def fm():
    return tiny_foundation()


def test_objects_few_shot_table_and_layers(fm, tmp_path):
    image, labels, kinds, inside = scene()
    clf = Classifier(fm, patch=(8, 16, 16), steps=60)
    report = clf.fit(image, examples_of(kinds, inside), objects=labels)
    assert report["classes"] == ["ball", "rod"] and report["mode"] == "objects"
    result = clf.predict(image, objects=labels)
    assert isinstance(result, ClassificationResult)
    truth = [kinds[v] for v in sorted(kinds)]
    got = [c for c in result.classes]
    assert np.mean([a == b for a, b in zip(got, truth, strict=True)]) >= 0.9
    rows = result.table()
    assert [r["label"] for r in rows] == sorted(kinds)  # input (label) order
    assert {"z", "y", "x", "label", "class", "confidence", "unknown"} <= set(rows[0])
    path = result.to_csv(tmp_path / "t.csv")
    with open(path) as handle:
        written = list(csv.DictReader(handle))
    assert list(written[0]) == ["z", "y", "x", "label", "class", "confidence"]
    assert [int(r["label"]) for r in written] == sorted(kinds)
    layers = result.layers("img", scale=(2, 1, 1))
    (cmap, kw, kind), (pts, pkw, pkind) = layers
    assert kind == "labels" and kw["name"] == "img classes" and cmap.shape == labels.shape
    assert set(np.unique(cmap)) <= {0, 1, 2, 3} and kw["scale"] == (2.0, 1.0, 1.0)
    assert kw["features"]["class"][:3] == ["background", "ball", "rod"]
    assert pkind == "points" and set(pkw["features"]) >= {"label", "class", "confidence",
                                                          "unknown"}


def test_points_and_tiles(fm):
    image, labels, kinds, inside = scene()
    ex = examples_of(kinds, inside)
    clf = Classifier(fm, patch=(8, 16, 16), steps=40)
    clf.fit(image, ex)
    pts = np.array([inside[v] for v in sorted(kinds)], float)[::-1]  # any order
    result = clf.predict(image, points=pts)
    assert result.kind == "points" and len(result.table()) == len(pts)
    np.testing.assert_allclose([[r["z"], r["y"], r["x"]] for r in result.table()], pts)
    with pytest.raises(ValueError, match="learnt from points"):
        clf.predict(image, objects=labels)
    tiles = Classifier(fm, steps=20)
    tiles.fit(image, Examples([(4, 4, 4), (12, 40, 40)], ["dark", "bright"]), tiles=(8, 24, 24))
    out = tiles.predict(image, tiles=(8, 24, 24))
    assert out.grid == (2, 2, 2) and out.class_map().shape == (2, 2, 2)
    (tile_map, kw, kind), = out.layers("img")
    assert kind == "labels" and kw["scale"] == (8.0, 24.0, 24.0)


def test_unknown_class_is_rejected(fm):
    image, labels, kinds, inside = scene()
    # a third kind never shown: big cubes
    image[2:8, 2:10, 36:44] += 900
    labels[2:8, 2:10, 36:44] = 99
    clf = Classifier(fm, patch=(8, 16, 16), steps=60, known_rate=1.0)
    report = clf.fit(image, examples_of(kinds, inside, per_class=3), objects=labels)
    assert report["calibrated"] and np.isfinite(report["threshold"])
    result = clf.predict(image, objects=labels)
    row = next(r for r in result.table() if r["label"] == 99)
    assert row["class"] == "unknown" and row["unknown"]
    assert result.values[list(result.labels).index(99)] == 3  # the unknown value
    clf.config.open_set = False
    assert "unknown" not in clf.predict(image, objects=labels).classes
    fixed = Classifier(fm, patch=(8, 16, 16), steps=20, unknown_threshold=2.0)  # cos <= 1
    fixed.fit(image, examples_of(kinds, inside), objects=labels)
    assert set(fixed.predict(image, objects=labels).classes) == {"unknown"}


def test_save_load_and_registry(fm, tmp_path):
    image, labels, kinds, inside = scene()
    clf = Classifier(fm, patch=(8, 16, 16), steps=30)
    clf.fit(image, examples_of(kinds, inside), objects=labels)
    clf.save(tmp_path / "probe")
    assert task_class("classify") is Classifier
    loaded = load_model(tmp_path / "probe", fm)
    assert isinstance(loaded, Classifier) and loaded.class_names == clf.class_names
    a, b = clf.predict(image, objects=labels), loaded.predict(image, objects=labels)
    assert a.classes == b.classes
    np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)
    # the open set keeps its examples: the same scores and threshold after loading
    assert loaded.openset.examples is not None
    assert loaded.openset.neighbours == clf.openset.neighbours
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert loaded.openset.threshold == pytest.approx(clf.openset.threshold, abs=1e-6)
    with pytest.raises(ValueError, match="other foundation weights"):
        Classifier.load(tmp_path / "probe", tiny_foundation(text=True))


def test_prompts_zero_shot_and_as_priors(tmp_path):
    fm = tiny_foundation(text=True)
    image, labels, kinds, inside = scene()
    clf = Classifier(fm, patch=(8, 16, 16), prompts=("ball: nucleus blob", "rod: vessel"))
    report = clf.fit(image)
    assert report["zero_shot"] and clf.class_names == ("ball", "rod")
    result = clf.predict(image, objects=labels)  # any input kind
    assert len(result.classes) == len(kinds) and set(result.classes) <= {"ball", "rod"}
    assert np.allclose(result.probabilities.sum(1), 1, atol=1e-5)
    clf.save(tmp_path / "zs")
    again = Classifier.load(tmp_path / "zs", fm).predict(image, objects=labels)
    assert again.classes == result.classes
    mixed = Classifier(fm, patch=(8, 16, 16), steps=30, prompts=("ball: nucleus",))
    mixed.fit(image, examples_of(kinds, inside), objects=labels)
    assert 0 < mixed.prompt_weight < 1 and mixed.text_rows == (0,)
    with pytest.raises(ValueError, match="prompt class 'plaque' has no example"):
        Classifier(fm, prompts=("plaque",)).fit(image, examples_of(kinds, inside),
                                               objects=labels)


def test_bad_inputs_say_what_to_do(fm, tmp_path):
    image, labels, kinds, inside = scene()
    clf = Classifier(fm, patch=(8, 16, 16), steps=5)
    one = Examples([inside[1], inside[3]], ["ball", "ball"])
    with pytest.raises(ValueError, match="only one class"):
        clf.fit(image, one, objects=labels)
    empty_class = Examples([inside[1], inside[2]], ["ball", "rod"], classes=["ball", "rod", "x"])
    with pytest.raises(ValueError, match="class 'x' has no example"):
        clf.fit(image, empty_class, objects=labels)
    with pytest.raises(ValueError, match="outside the volume"):
        clf.fit(image, Examples([(0, 0, 0), (40, 0, 0)], ["a", "b"]))
    with pytest.raises(ValueError, match="no objects"):
        clf.fit(image, examples_of(kinds, inside), objects=np.zeros_like(labels))
    with pytest.raises(ValueError, match="not on an object"):
        clf.fit(image, Examples([(0, 0, 0), inside[2]], ["a", "b"]), objects=labels)
    with pytest.raises(ValueError, match="image-only.*text tower"):
        Classifier(fm, prompts=("a", "b")).fit(image)
    with pytest.raises(ValueError, match="give examples"):
        clf.fit(image)
    with pytest.raises(ValueError, match="not trained"):
        Classifier(fm).predict(image, points=[(1, 1, 1)])
    (tmp_path / "bad.csv").write_text("z,y,klass\n1,2,a\n")
    with pytest.raises(ValueError, match="missing column"):
        read_examples_csv(tmp_path / "bad.csv")
    (tmp_path / "noclass.csv").write_text("z,y,x\n1,2,3\n")
    with pytest.raises(ValueError, match="missing column class"):
        read_examples_csv(tmp_path / "noclass.csv")
    with pytest.raises(ValueError, match="head must be"):
        ClassifyConfig(head="forest")


def test_csv_formats(tmp_path):
    (tmp_path / "napari.csv").write_text("index,axis-0,axis-1,axis-2\n0,1,2,3\n1,4,5,6\n")
    np.testing.assert_array_equal(read_points_csv(tmp_path / "napari.csv"),
                                  [[1, 2, 3], [4, 5, 6]])
    (tmp_path / "ex.csv").write_text("z,y,x,class\n1,2,3,nucleus\n4,5,6,vessel\n")
    ex = read_examples_csv(tmp_path / "ex.csv")
    assert ex.names == ["nucleus", "vessel"] and ex.points.shape == (2, 3)


def test_describe_in_words():
    fm = tiny_foundation(text=True)
    image, labels, kinds, inside = scene()
    words = Classifier(fm, patch=(8, 16, 16)).describe(image, objects=labels, top=2)
    assert len(words) == len(kinds)
    for item in words:
        assert item[0][0] in ("nuclei", "vessels", "plaques", "unknown")
        assert len(item) in (1, 2) and all(-1.0 <= s <= 1.0 for _, s in item)


def test_self_training_only_with_few_examples(fm):
    image, labels, kinds, inside = scene()
    clf = Classifier(fm, patch=(8, 16, 16), steps=20)  # self_train_below = 3
    assert clf.fit(image, examples_of(kinds, inside, per_class=2), objects=labels)[
        "self_trained"]
    assert not clf.fit(image, examples_of(kinds, inside, per_class=3), objects=labels)[
        "self_trained"]
    clf.config.self_train_below = 10
    assert clf.fit(image, examples_of(kinds, inside, per_class=3), objects=labels)[
        "self_trained"]
    with pytest.raises(ValueError, match="self_train_below"):
        ClassifyConfig(self_train_below=-1)


def ball_scene(voxel, core: bool):
    """A ball of radius 6 um in a 40 um cube sampled at ``voxel`` um: uniform, or a bright
    core (a third of the radius) in a dim halo (a plaque); (image, labels)."""
    shape = tuple(int(round(40 / v)) for v in voxel)
    grid = np.meshgrid(*[(np.arange(s) + 0.5) * v - 20 for s, v in zip(shape, voxel,
                                                                      strict=True)],
                       indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grid))
    image = np.full(shape, 100.0, np.float32)
    image[r <= 6] += 300 if not core else 100
    if core:
        image[r <= 2] += 500
    return image, (r <= 6).astype(np.uint16)


def test_relative_measures_are_scale_free_and_see_a_core():
    from napari_lsmfm.tasks.classify import object_items
    from napari_lsmfm.tasks.classify.measures import (
        CLASSICAL_OBJECT_MEASURES,
        OBJECT_MEASURES,
        measure_items,
    )

    assert OBJECT_MEASURES[:len(CLASSICAL_OBJECT_MEASURES)] == CLASSICAL_OBJECT_MEASURES
    assert len(CLASSICAL_OBJECT_MEASURES) == 19 < len(OBJECT_MEASURES)
    names = list(OBJECT_MEASURES)

    def measures(voxel, core):
        image, labels = ball_scene(voxel, core)
        row = measure_items(object_items(labels), image, (100.0, 900.0), voxel)[0]
        return dict(zip(names, row, strict=True))

    fine, coarse = measures((1.0, 1.0, 1.0), False), measures((2.0, 1.0, 1.0), False)
    for name in ("relative_thickness", "profile_corr", "log_contrast_ratio"):
        assert abs(fine[name] - coarse[name]) < 0.15 * max(abs(fine[name]), 0.1), name
    plaque = measures((1.0, 1.0, 1.0), True)
    assert plaque["core_ratio"] > fine["core_ratio"] + 0.5
    assert plaque["profile_corr"] > fine["profile_corr"]
    assert plaque["bright_fraction"] < fine["bright_fraction"]


def test_open_set_scores_by_prototypes_and_neighbours(tmp_path):
    from napari_lsmfm.tasks.classify.openset import OpenSet

    rng = np.random.default_rng(0)
    axes = np.eye(6)
    # class 0 has two looks (axes 0 and 1), class 1 one (axis 2)
    z = np.concatenate([axes[0] + 0.1 * rng.normal(size=(3, 6)),
                        axes[1] + 0.1 * rng.normal(size=(3, 6)),
                        axes[2] + 0.1 * rng.normal(size=(4, 6))])
    targets = np.array([0] * 6 + [1] * 4)
    fitted = OpenSet.fit(z, targets, 2, known_rate=1.0)
    assert fitted.calibrated and fitted.neighbours == 3 and len(fitted.loo_scores) == 10
    prototypes_only = OpenSet(fitted.prototypes, fitted.threshold)
    look = axes[0:1] + 0.05
    # one look of class 0 is near its examples though far from the class's mean
    assert fitted.scores(look)[0] > prototypes_only.scores(look)[0]
    assert not fitted.unknown(look)[0]
    assert fitted.unknown(axes[4:5])[0]  # like no example: unknown
    assert fitted.threshold == pytest.approx(fitted.loo_scores.min())
