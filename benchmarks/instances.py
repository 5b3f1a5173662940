"""Instance splitting: per-object F1 at IoU 0.5 and object counts against the truth.

    python benchmarks/instances.py [--split val|test] [--modes gt blur fit]
        [--cases nuclei dense ...] [--speed] [--no-probability]

What is split (``--modes``):
  gt    the true foreground mask (labels > 0): splitting alone is measured.
  blur  a mimicked prediction: the true foreground blurred by the PSF, plus smooth
        noise, as a probability; its mask is probability > 0.5 (necks fill in, edges
        go ragged, as in a real prediction).
  fit   a real prediction: the random-forest pixel classifier trained on brushed
        strokes (4 z slices, ``_fewshot.brush``), its class-2 probability and mask.

Columns: touching (fraction of true objects sharing a face with another), true and
found objects, the mask's connected components, splits (found objects beyond one per
component: what the splitting added; for vessels, the shattering), F1 at IoU 0.5,
precision, recall, seconds of ``split_instances``.

Cases (``--cases``): synthetic nuclei at the default size and 2-3x larger and 2-3x
smaller (voxel size scaled, so objects span more or fewer voxels), densely packed
touching nuclei, isotropic voxels; the plaques and vessels (must not shatter: object
counts against the truth); and the foreign ``stardist`` 3D volume (another project's
synthetic nuclei, voxel size assumed 2, 1, 1 um: its objects are about twice as long in
y and x as in z), fetched from the stardist 0.9.2 wheel into a cache with pip.

``--split val`` draws seeds 7001-7002 (tune on these), ``--split test`` seeds 9001-9002
(report these); the shipped samples (seed 0) are in both. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))
from _fewshot import brush, table  # noqa: E402
from datasets import stardist_nuclei  # noqa: E402

from napari_lsmfm.synth import load_sample, make_volume  # noqa: E402
from napari_lsmfm.tasks import split_instances  # noqa: E402
from napari_lsmfm.tasks.instance_metrics import match_objects  # noqa: E402

SEEDS = {"val": (7001, 7002), "test": (9001, 9002)}

# name: make_volume arguments. Sizes: the nuclei are 3.5-8 um in radius; a voxel size
# scaled by s makes them 1/s as many voxels across.
NUCLEI = {
    "nuclei": dict(shape=(48, 128, 128), voxel_size=(2.0, 1.0, 1.0)),
    "dense": dict(shape=(48, 128, 128), voxel_size=(2.0, 1.0, 1.0), density=3.0),
    "isotropic": dict(shape=(64, 96, 96), voxel_size=(1.0, 1.0, 1.0), density=2.0),
    "large x2": dict(shape=(64, 160, 160), voxel_size=(1.0, 0.5, 0.5), density=2.0),
    "large x3": dict(shape=(64, 192, 192), voxel_size=(0.67, 0.33, 0.33), density=2.0),
    "small x0.5": dict(shape=(32, 96, 96), voxel_size=(4.0, 2.0, 2.0), density=2.0),
    "small x0.33": dict(shape=(32, 64, 64), voxel_size=(3.0, 3.0, 3.0), density=2.0),
}
OTHER = ("plaques", "vessels", "plaques sample", "vessels sample", "stardist")


def volumes(cases, seeds):
    """(case, seed, image, truth objects, voxel size) for every case and seed."""
    for case in cases:
        if case == "stardist":
            data = stardist_nuclei()  # the voxel size assumed here: 2, 1, 1 um
            yield case, "-", data.image, data.labels, (2.0, 1.0, 1.0)
        elif case.endswith("sample"):
            kind = case.split()[0]
            image, labels, voxel_size = load_sample(kind)
            yield case, 0, image, truth_objects(labels, kind), voxel_size
        else:
            for seed in seeds:
                if case in NUCLEI:
                    vol = make_volume("nuclei", seed=seed, **NUCLEI[case])
                else:
                    vol = make_volume(case, seed=seed)
                yield (case, seed, vol.image, truth_objects(vol.labels, vol.kind),
                       vol.voxel_size)


def truth_objects(labels: np.ndarray, kind: str) -> np.ndarray:
    """Instance ids; the semantic vessel labels become their connected trees."""
    if kind == "vessels":
        return ndi.label(labels > 0, structure=np.ones((3, 3, 3)))[0]
    return np.asarray(labels)


def predicted(mode: str, image, truth, voxel_size, seed: int):
    """(mask, probability or None) of the foreground for one split mode."""
    fg = truth > 0
    if mode == "gt":
        return fg, None
    if mode == "blur":
        rng = np.random.default_rng(seed)
        sigma = 1.0 / np.asarray(voxel_size) * min(voxel_size)  # 1 voxel along the finest
        sigma = np.maximum(sigma * 1.0, 0.5)
        noise = ndi.gaussian_filter(rng.standard_normal(fg.shape).astype(np.float32), sigma)
        noise *= 0.15 / max(float(noise.std()), 1e-6)
        prob = np.clip(ndi.gaussian_filter(fg.astype(np.float32), 1.5 * sigma) + noise, 0, 1)
        return prob > 0.5, prob
    if mode == "fit":
        from napari_lsmfm.tasks.baseline import PixelClassifier

        strokes = brush(truth, 4, seed=0)
        clf = PixelClassifier(voxel_size=voxel_size, n_estimators=30, seed=0, n_jobs=1)
        result = clf.fit(image, strokes).predict(image)
        return np.asarray(result.classes) == 2, result.probabilities[1]
    raise ValueError(f"unknown mode {mode!r}")


def touching_fraction(truth: np.ndarray) -> float:
    """Fraction of true objects that share a face with another object."""
    ids = set()
    for axis in range(3):
        a = np.moveaxis(truth, axis, 0)
        lo, hi = a[:-1], a[1:]
        edge = (lo != hi) & (lo > 0) & (hi > 0)
        ids.update(np.unique(lo[edge]).tolist())
        ids.update(np.unique(hi[edge]).tolist())
    n = len(np.unique(truth)) - 1
    return len(ids) / n if n else 0.0


def run(cases, modes, seeds, use_probability: bool, **split_kw) -> list[dict]:
    takes_probability = "probability" in inspect.signature(split_instances).parameters
    rows = []
    for case, seed, image, truth, voxel_size in volumes(cases, seeds):
        touching = touching_fraction(truth)
        for mode in modes:
            mask, prob = predicted(mode, image, truth, voxel_size,
                                   seed if isinstance(seed, int) else 0)
            kw = dict(split_kw)
            if use_probability and takes_probability and prob is not None:
                kw["probability"] = prob
            t0 = time.perf_counter()
            labels = split_instances(mask, voxel_size=voxel_size, **kw)
            seconds = time.perf_counter() - t0
            score = match_objects(labels, truth)
            comps = ndi.label(mask)[0]
            # objects beyond one per mask component: what the splitting added
            kept = len(np.unique(comps[labels > 0]))
            rows.append({"case": case, "seed": seed, "mode": mode, "touching": touching,
                         "true": score.n_true, "found": score.n_pred,
                         "components": int(comps.max()), "splits": score.n_pred - kept,
                         "F1@0.5": score.f1,
                         "precision": score.precision, "recall": score.recall,
                         "seconds": seconds})
    return rows


def speed(**split_kw) -> str:
    """Seconds to split a 64 x 256 x 256 dense-nuclei mask (true foreground)."""
    vol = make_volume("nuclei", shape=(64, 256, 256), density=3.0, seed=SEEDS["val"][0])
    t0 = time.perf_counter()
    labels = split_instances(vol.labels > 0, voxel_size=vol.voxel_size, **split_kw)
    seconds = time.perf_counter() - t0
    f1 = match_objects(labels, vol.labels).f1
    return (f"64x256x256 dense nuclei (true mask): {seconds:.2f} s, "
            f"{int(labels.max())} objects for {len(np.unique(vol.labels)) - 1}, F1 {f1:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SEEDS), default="test")
    parser.add_argument("--modes", nargs="+", default=["gt", "blur", "fit"])
    parser.add_argument("--cases", nargs="+", default=[*NUCLEI, *OTHER])
    parser.add_argument("--speed", action="store_true", help="also time a 64x256x256 volume")
    parser.add_argument("--no-probability", action="store_true",
                        help="split from the mask alone, even where a probability exists")
    args = parser.parse_args(argv)
    unknown = set(args.cases) - set(NUCLEI) - set(OTHER)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}: choose from {[*NUCLEI, *OTHER]}")
    rows = run(args.cases, args.modes, SEEDS[args.split], not args.no_probability)
    cols = ["case", "seed", "mode", "touching", "true", "found", "components", "splits", "F1@0.5",
            "precision", "recall", "seconds"]
    print(table(rows, cols))
    for mode in args.modes:
        f1 = [r["F1@0.5"] for r in rows if r["mode"] == mode and r["case"] in NUCLEI]
        if f1:
            print(f"\nmean F1@0.5 over the nuclei cases, {mode}: {np.mean(f1):.3f} "
                  f"(min {np.min(f1):.3f})")
    if args.speed:
        print("\n" + speed())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
