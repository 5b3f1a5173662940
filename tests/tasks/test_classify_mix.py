"""The forest beside the probe (saved and loaded with it; its share chosen by
cross-validation when asked) and the transductive open-set test (label spreading over the
items' graph)."""

from __future__ import annotations

import numpy as np
import pytest
from test_classify import examples_of, scene, tiny_foundation

from napari_lsmfm.tasks.classify import Classifier
from napari_lsmfm.tasks.classify.mix import choose_forest_weight, folds_of
from napari_lsmfm.tasks.classify.openset import SPREAD_MIN_ITEMS, OpenSet, spread_mass


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
                 / (len(pos) * len(neg)))


def clusters(seed: int = 0):
    """Standardised items of two known classes and one never shown: the unknown group
    lies beside class 0 in direction (cosine 0.8 to its centre), in a tight group of its
    own; the first 6 of each known class are the examples."""
    rng = np.random.default_rng(seed)
    d = 6
    centres = np.eye(d)[:3] * 4.0
    centres[2] = 4.0 * (0.8 * np.eye(d)[0] + 0.6 * np.eye(d)[2])
    items, kind = [], []
    for c, n in ((0, 60), (1, 60), (2, 40)):
        items.append(centres[c] + rng.normal(0, 1.0 if c < 2 else 0.5, (n, d)))
        kind += [c] * n
    z, kind = np.concatenate(items), np.asarray(kind)
    ex = np.concatenate([np.flatnonzero(kind == 0)[:6], np.flatnonzero(kind == 1)[:6]])
    return z, kind, ex


def test_spreading_finds_a_group_never_shown():
    z, kind, ex = clusters()
    test = np.setdiff1d(np.arange(len(z)), ex)
    with_graph = OpenSet.fit(z[ex], kind[ex], 2, known_rate=0.9, spread_from=0)
    alone = OpenSet.fit(z[ex], kind[ex], 2, known_rate=0.9)
    unknown = kind[test] == 2
    s_graph, u_graph = with_graph.judge(z[test])
    s_alone, u_alone = alone.judge(z[test])
    assert auroc(~unknown, s_graph) > auroc(~unknown, s_alone) + 0.02
    assert auroc(~unknown, s_graph) > 0.9
    assert u_graph[unknown].mean() > 0.5 and u_graph[~unknown].mean() < 0.3
    # too few items for a graph: the similarity alone decides
    few = test[:SPREAD_MIN_ITEMS - 1]
    np.testing.assert_allclose(with_graph.judge(z[few])[0], with_graph.scores(z[few]))


def test_spread_mass_leave_one_out_is_without_the_own_label():
    z, kind, ex = clusters(1)
    items = z[np.setdiff1d(np.arange(len(z)), ex)][::4]
    mass, loo = spread_mass(z[ex], items)
    assert mass.shape == (len(items),) and loo.shape == (len(ex),)
    assert np.all(loo > 0) and np.all(mass > 0)
    # the leave-one-out mass is what the example gets as an unlabelled item of the same
    # graph (spreading is linear in the labels)
    for i in (0, 7):
        others = np.delete(ex, i)
        as_item, _ = spread_mass(z[others], np.concatenate([z[ex[i]][None], items]))
        assert as_item[0] == pytest.approx(loo[i], rel=1e-6)


def test_choose_forest_weight_follows_the_held_out_loss():
    targets = np.repeat([0, 1, 2], 5)
    assert folds_of(np.array([0, 1, 2])) is None  # one example each: nothing to hold out
    folds = folds_of(targets)
    assert sorted(np.bincount(folds)) == [3] * 5  # stratified: one of each class per fold

    def right(train, held):
        return np.eye(3)[targets[held]] * 0.9 + 0.1 / 3

    def wrong(train, held):
        return np.eye(3)[(targets[held] + 1) % 3] * 0.9 + 0.1 / 3

    assert choose_forest_weight(targets, 3, wrong, right)[0] == 1.0
    weight, losses = choose_forest_weight(targets, 3, right, wrong)
    assert weight == 0.0 and losses[0.0] < losses[0.5] < losses[1.0]
    assert choose_forest_weight(targets, 3, right, right)[0] == 0.5  # a tie: half and half


@pytest.mark.parametrize("choose", [False, True])
def test_forest_is_mixed_saved_and_loaded(tmp_path, choose):
    fm = tiny_foundation()
    image, labels, kinds, inside = scene()
    clf = Classifier(fm, patch=(8, 16, 16), steps=30, choose_mix=choose)
    report = clf.fit(image, examples_of(kinds, inside, per_class=3), objects=labels)
    assert clf.forest is not None
    assert report["forest_weight"] in ((0.0, 0.75, 1.0) if choose else (0.75,))
    assert bool(report["mix_losses"]) == choose
    result = clf.predict(image, objects=labels)
    assert result.classes.count("ball") >= 5  # two clean kinds: the mix still sorts them
    clf.save(tmp_path / "m")
    loaded = Classifier.load(tmp_path / "m", fm)
    assert loaded.forest_weight == clf.forest_weight
    again = loaded.predict(image, objects=labels)
    np.testing.assert_allclose(again.probabilities, result.probabilities, atol=1e-5)
    none = Classifier(fm, patch=(8, 16, 16), steps=30, forest_weight=0.0).fit(
        image, examples_of(kinds, inside, per_class=3), objects=labels)
    assert none["forest_weight"] == 0.0
