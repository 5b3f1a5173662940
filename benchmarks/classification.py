"""Object classification (issue 16): our probe on the foundation's embeddings and all the
measures of ``tasks/classify/measures.py`` against a random forest on the 19 classical
(CellProfiler-style) intensity and shape measures (``CLASSICAL_OBJECT_MEASURES``; the
column "forest+" is the same forest on all the measures, the scale-free ones too),
zero-shot from text prompts, and open-set AUROC with one class held out of the examples.

Held-out scenes mix three structure kinds in one volume (``napari_lsmfm.synth``):
nuclei, amyloid-like plaques, and vessel fragments (the vessel tree cut on a 24 um grid
into connected pieces), imaged together through one light-sheet forward model. Examples
are drawn from one scene (k per class, random, ``--reps`` draws) and the objects of
another scene are classified. Columns:

- in-distribution: the generator's defaults (2 x 1 x 1 um voxels, PSF 3 / 1 um, 1000
  photons), inside the pretraining draws;
- shifted: 1 x 0.5 x 0.5 um voxels, PSF 6 / 2.4 um, 50 photons, read noise 4, denser
  objects: every one outside the ranges the default foundation was pretrained on;
- foreign: no volume of reference/data.md has instance labels of several kinds (the
  only labelled one, stardist's img3d, has nuclei only), so there is no foreign column.

``--split validation`` is the pair of scenes the settings were tuned on (train seed 11,
test seed 12); ``--split report`` (default) uses seeds no tuning saw (train 21 / test 22,
shifted 31 / 32). Prints markdown tables.

    python benchmarks/classification.py [--split report|validation] [--reps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from napari_lsmfm.synth import degrade, gaussian_psf_sigma_vox, make_structures
from napari_lsmfm.tasks.classify.measures import CLASSICAL_OBJECT_MEASURES, OBJECT_MEASURES

CLASSES = ("nucleus", "vessel", "plaque")
KINDS = {"nuclei": "nucleus", "vessels": "vessel", "plaques": "plaque"}
PROMPTS = ("nucleus", "blood vessel", "amyloid plaque")
SETTINGS = {
    "in-distribution": {"shape": (48, 128, 128), "voxel": (2.0, 1.0, 1.0),
                        "densities": (0.6, 0.6, 2.5), "psf_um": (3.0, 1.0, 1.0),
                        "photons": 1000.0, "read_noise": 2.0},
    "shifted": {"shape": (48, 192, 192), "voxel": (1.0, 0.5, 0.5),
                "densities": (2.5, 2.0, 10.0), "psf_um": (6.0, 2.4, 2.4),
                "photons": 50.0, "read_noise": 4.0},
}
SEEDS = {"validation": {"in-distribution": (11, 12), "shifted": (13, 14)},
         "report": {"in-distribution": (21, 22), "shifted": (31, 32)}}
SHOTS = (1, 5, 20)


def mixed_scene(seed: int, shape, voxel, densities, psf_um, photons, read_noise,
                fragment_um: float = 24.0, min_voxels: int = 30):
    """(image uint16, labels int32, {label: class}) of one scene with all three kinds."""
    rng = np.random.default_rng(seed)
    cleans, labs = [], []
    for kind, density in zip(KINDS, densities, strict=True):
        clean, lab = make_structures(kind, shape, voxel, density, rng)
        cleans.append(clean)
        labs.append(lab)
    step = np.maximum(1, np.round(fragment_um / np.asarray(voxel)).astype(int))
    cells = sum(np.meshgrid(*[np.arange(s) // st * 10 ** (4 - 2 * a) for a, (s, st) in
                              enumerate(zip(shape, step, strict=True))], indexing="ij"))
    vessel = labs[1] > 0
    pieces = np.zeros(shape, np.int64)
    for cid in np.unique(cells[vessel]):
        comp, _ = ndimage.label(vessel & (cells == cid))
        pieces[comp > 0] = comp[comp > 0] + int(cid) * 1000
    labs[1] = np.unique(pieces, return_inverse=True)[1].reshape(shape)  # 1, 2, 3, ...
    labels = np.zeros(shape, np.int32)
    kinds: dict[int, str] = {}
    value = 1
    for kind, lab in zip(KINDS, labs, strict=True):  # later kinds win where they overlap
        for v in np.unique(lab[lab > 0]):
            labels[lab == v] = value
            kinds[value] = KINDS[kind]
            value += 1
    sizes = ndimage.sum(np.ones(shape), labels, np.arange(1, value))
    final = np.zeros(shape, np.int32)
    out: dict[int, str] = {}
    for v in range(1, value):
        if sizes[v - 1] >= min_voxels:
            final[labels == v] = len(out) + 1
            out[len(out) + 1] = kinds[v]
    image = degrade(np.max(cleans, 0), rng, psf_sigma_vox=gaussian_psf_sigma_vox(psf_um, voxel),
                    photons=photons, read_noise=read_noise, background=20.0, stripes=0.3,
                    attenuation=0.3, illumination=0.4)
    return image, final, out


def macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    scores = []
    for c in CLASSES:
        tp = np.sum((pred == c) & (truth == c))
        fp, fn = np.sum((pred == c) & (truth != c)), np.sum((pred != c) & (truth == c))
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(scores))


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count half)."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / max(len(pos) * len(neg), 1))


class Column:
    """One column: a train scene (examples) and a test scene (what is classified)."""

    def __init__(self, clf, params, seeds, voxel) -> None:
        self.clf = clf
        self.train = mixed_scene(seeds[0], **params)
        self.test = mixed_scene(seeds[1], **params)
        self.voxel = voxel
        self.items_tr = clf.items(self.train[0], objects=self.train[1])
        self.items_te = clf.items(self.test[0], objects=self.test[1])
        self.y_tr = np.array([self.train[2][int(v)] for v in self.items_tr.labels])
        self.y_te = np.array([self.test[2][int(v)] for v in self.items_te.labels])
        lab = self.train[1]
        self.inside = {int(v): np.argwhere(lab[tuple(slice(a, b) for a, b in box)] == v)[0]
                       + box[:, 0] for v, box in zip(self.items_tr.labels, self.items_tr.boxes,
                                                     strict=True)}
        t0 = time.perf_counter()
        self.f_tr = clf.features(self.train[0], self.items_tr)
        self.f_te = clf.features(self.test[0], self.items_te)
        self.embed_seconds = time.perf_counter() - t0

    def draw(self, k: int, rep: int, without: str | None = None) -> np.ndarray:
        rng = np.random.default_rng(1000 * k + rep)
        return np.concatenate([rng.choice(np.flatnonzero(self.y_tr == c), k, replace=False)
                               for c in CLASSES if c != without])

    def probe(self, idx: np.ndarray):
        from napari_lsmfm.tasks.classify import Examples

        ex = Examples([self.inside[int(self.items_tr.labels[i])] for i in idx],
                      list(self.y_tr[idx]))
        self.clf.fit(self.train[0], ex, objects=self.train[1])
        return self.clf.predict(self.test[0], objects=self.test[1])

    def forest(self, idx: np.ndarray, seed: int, columns: int | None = None) -> np.ndarray:
        """A random forest on the first ``columns`` measures (default: the classical 19,
        ``CLASSICAL_OBJECT_MEASURES``; None as given: all, the relative ones too)."""
        from sklearn.ensemble import RandomForestClassifier

        rf = RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
        rf.fit(self.f_tr.measures[idx, :columns], self.y_tr[idx])
        return rf.predict(self.f_te.measures[:, :columns])


def run_column(col: Column, reps: int) -> dict:
    out: dict = {"n_test": {c: int(np.sum(col.y_te == c)) for c in CLASSES}}
    for k in SHOTS:
        if min(np.sum(col.y_tr == c) for c in CLASSES) < k:
            continue
        acc, f1, racc, rf1, aacc, af1 = [], [], [], [], [], []
        for rep in range(reps):
            idx = col.draw(k, rep)
            res = col.probe(idx)
            pred = np.array(col.clf.class_names)[res.predicted]
            acc.append(np.mean(pred == col.y_te))
            f1.append(macro_f1(col.y_te, pred))
            rpred = col.forest(idx, rep, len(CLASSICAL_OBJECT_MEASURES))
            racc.append(np.mean(rpred == col.y_te))
            rf1.append(macro_f1(col.y_te, rpred))
            apred = col.forest(idx, rep, None)
            aacc.append(np.mean(apred == col.y_te))
            af1.append(macro_f1(col.y_te, apred))
        out[k] = {"acc": np.mean(acc), "f1": np.mean(f1), "rf_acc": np.mean(racc),
                  "rf_f1": np.mean(rf1), "acc_sd": np.std(acc), "rf_acc_sd": np.std(racc),
                  "all_acc": np.mean(aacc), "all_f1": np.mean(af1)}
    for k in (5, 20):
        aucs, rejected, accepted = [], [], []
        for held in CLASSES:
            for rep in range(max(1, reps // 2)):
                res = col.probe(col.draw(k, rep, without=held))
                positive = col.y_te == held
                aucs.append(auroc(positive, -res.scores))
                rejected.append(np.mean(res.unknown[positive]))
                accepted.append(1 - np.mean(res.unknown[~positive]))
        out[f"auroc{k}"] = (np.mean(aucs), np.mean(rejected), np.mean(accepted))
    return out


def zero_shot(fm, col: Column) -> tuple[float, float]:
    from napari_lsmfm.tasks.classify import Classifier

    zs = Classifier(fm, voxel_size=col.voxel, prompts=PROMPTS)
    zs.fit(col.test[0])
    res = zs.predict(col.test[0], objects=col.test[1])
    pred = np.array(CLASSES)[res.predicted]
    return float(np.mean(pred == col.y_te)), macro_f1(col.y_te, pred)


def zero_shot_tiles(fm, params: dict, seed: int, tile=(32, 64, 64)) -> tuple[float, int]:
    """Zero-shot accuracy on the tiles of single-kind volumes (one volume per kind, as the
    pretraining saw them), and the number of tiles."""
    from napari_lsmfm.synth import make_volume
    from napari_lsmfm.tasks.classify import Classifier

    zs = Classifier(fm, voxel_size=params["voxel"], prompts=PROMPTS)
    hits, n = 0, 0
    for i, (kind, density) in enumerate(zip(KINDS, params["densities"], strict=True)):
        vol = make_volume(kind, shape=params["shape"], voxel_size=params["voxel"],
                          density=min(density, 2.0), seed=seed + i, psf_sigma_um=params["psf_um"],
                          photons=params["photons"], read_noise=params["read_noise"])
        if n == 0:
            zs.fit(vol.image)
        res = zs.predict(vol.image, tiles=tile)
        hits += int(np.sum(np.array(CLASSES)[res.predicted] == KINDS[kind]))
        n += len(res.predicted)
    return hits / n, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=tuple(SEEDS), default="report")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from napari_lsmfm.model import load_foundation
    from napari_lsmfm.tasks.classify import Classifier

    torch.set_num_threads(args.threads)
    fm = load_foundation(None, device=args.device)
    t0 = time.perf_counter()
    results, zs = {}, {}
    for name, params in SETTINGS.items():
        clf = Classifier(fm, voxel_size=params["voxel"])
        col = Column(clf, params, SEEDS[args.split][name], params["voxel"])
        results[name] = run_column(col, args.reps)
        results[name]["embed_seconds"] = col.embed_seconds
        results[name]["n_objects"] = len(col.y_tr) + len(col.y_te)
        zs[name] = (*zero_shot(fm, col), max(np.mean(col.y_te == c) for c in CLASSES),
                    *zero_shot_tiles(fm, params, SEEDS[args.split][name][1]))
    names = list(results)
    print(f"## classification.py, split {args.split!r} (seeds {SEEDS[args.split]}), "
          f"{args.reps} example draws, {args.threads} threads, {args.device}\n")
    for name in names:
        r = results[name]
        print(f"- {name}: test objects {r['n_test']}, {r['n_objects']} objects embedded in "
              f"{r['embed_seconds']:.1f} s")
    print("\n### Accuracy / macro-F1 (probe on foundation embeddings + all "
          f"{len(OBJECT_MEASURES)} measures vs random forest on the classical "
          f"{len(CLASSICAL_OBJECT_MEASURES)} measures; forest+: the forest on all "
          f"{len(OBJECT_MEASURES)})\n")
    print("| examples per class | " + " | ".join(f"{n} probe | {n} forest | {n} forest+"
                                                 for n in names) + " |")
    print("|---|" + "---|---|---|" * len(names))
    for k in SHOTS:
        cells = []
        for n in names:
            r = results[n].get(k)
            cells += (["-", "-", "-"] if r is None else
                      [f"{r['acc']:.3f} / {r['f1']:.3f}", f"{r['rf_acc']:.3f} / {r['rf_f1']:.3f}",
                       f"{r['all_acc']:.3f} / {r['all_f1']:.3f}"])
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("\n### Zero-shot from text prompts (default weights; prompts "
          f"{'; '.join(PROMPTS)})\n")
    print("| column | objects: accuracy | macro-F1 | majority class | tiles of single-kind "
          "volumes: accuracy (tiles) | chance |")
    print("|---|---|---|---|---|---|")
    for n in names:
        acc, f1, major, tiles, n_tiles = zs[n]
        print(f"| {n} | {acc:.3f} | {f1:.3f} | {major:.3f} | {tiles:.3f} ({n_tiles}) | 0.333 |")
    print("\n### Open set: one class held out of the examples (AUROC of unknown vs known; "
          "at the calibrated threshold: held-out objects rejected / known accepted)\n")
    print("| column | AUROC, 5 per class | rejected / accepted | AUROC, 20 per class | "
          "rejected / accepted |")
    print("|---|---|---|---|---|")
    for n in names:
        a5, a20 = results[n]["auroc5"], results[n]["auroc20"]
        print(f"| {n} | {a5[0]:.3f} | {a5[1]:.2f} / {a5[2]:.2f} | {a20[0]:.3f} | "
              f"{a20[1]:.2f} / {a20[2]:.2f} |")
    print(f"\nTotal {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
