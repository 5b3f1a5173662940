"""Few-shot segmentation from brushed slices: our quick and full modes against a
random-forest pixel classifier (the ilastik / napari-apoc approach) on the same strokes.

    python benchmarks/fewshot_segmentation.py [--slices 1 2 4 8] [--kinds nuclei vessels plaques]
        [--weights W] [--full-steps 200] [--quick] [--seed 9001] [--skip "full, random init"]

Held-out synthetic volumes (seed 9001, never used in training; settings are tuned on
seed 7001, ``--seed 7001``, so the reported volumes are not the tuned ones). For each
kind and number of brushed z slices: foreground Dice and per-object F1 at IoU 0.5, training and
prediction time, for: quick and full mode with the default weights and with the same
architecture randomly initialised, and the random forest. Ratios are against the
random forest measured in the same run. Prints markdown tables.

Full mode predicts a mix of its finetuned network and the quick model it started from
(``SegmentConfig.quick_weight``); the row "full, default, finetuned only" is the same
trained model predicting with the finetuned network alone (quick_weight 0), to show
what the mix adds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _fewshot import HELD_OUT_SEED, evaluate, held_out, machine, table  # noqa: E402

from napari_lsmfm.model import Foundation, load_foundation  # noqa: E402
from napari_lsmfm.tasks import Segmenter  # noqa: E402
from napari_lsmfm.tasks.baseline import PixelClassifier  # noqa: E402


def methods(weights: str | None, full_steps: int, quick_steps: int, only_quick: bool):
    pretrained = load_foundation(weights, device="cpu")
    torch.manual_seed(0)
    random_init = Foundation(pretrained.spec, source="random init").eval()

    def seg(foundation, mode, steps):
        return lambda vs: Segmenter(foundation, mode=mode, steps=steps, voxel_size=vs, seed=0)

    out = {
        "random forest": lambda vs: PixelClassifier(voxel_size=vs, seed=0),
        "quick, default": seg(pretrained, "quick", quick_steps),
        "quick, random init": seg(random_init, "quick", quick_steps),
    }
    if not only_quick:
        out["full, default"] = seg(pretrained, "full", full_steps)
        out["full, random init"] = seg(random_init, "full", full_steps)
    return pretrained, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["nuclei", "vessels", "plaques"])
    parser.add_argument("--slices", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--weights", default=None, help="foundation weights (default: embedded)")
    parser.add_argument("--quick-steps", type=int, default=300)
    parser.add_argument("--full-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED,
                        help="held-out volumes' seed (7001 for tuning, 9001 to report)")
    parser.add_argument("--quick", action="store_true", help="skip the full mode")
    parser.add_argument("--skip", nargs="+", default=[], metavar="METHOD",
                        help='methods to leave out, e.g. --skip "full, random init"')
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 128, 128])
    args = parser.parse_args(argv)

    foundation, makers = methods(args.weights, args.full_steps, args.quick_steps, args.quick)
    optional = [m for m in makers if m not in ("random forest", "quick, default")]
    if set(args.skip) - set(optional):
        parser.error(f"--skip takes some of {optional} (the forest and quick mode are the "
                     "baselines)")
    makers = {k: v for k, v in makers.items() if k not in args.skip}
    print(f"machine: {machine()}")
    print(f"foundation: {foundation.info()['architecture']} "
          f"{foundation.info()['parameters'] / 1e6:.2f} M parameters, source {foundation.source}")
    # the same trained full model, predicting with its finetuned network alone
    variants = {"full, default": {"full, default, finetuned only": _finetuned_only}}
    rows = []
    for kind in args.kinds:
        vol = held_out(kind, shape=tuple(args.shape), seed=args.seed)
        for n in args.slices:
            scores = {}
            for name, make in makers.items():
                got = evaluate(make(vol.voxel_size), vol, n, variants.get(name, {}))
                for variant, s in got.items():
                    label = variant or name
                    scores[label] = s
                    rows.append(dict(kind=kind, slices=n, method=label, dice=s.dice, f1=s.f1,
                                     train_s=s.train_s, predict_s=s.predict_s))
                    print(f"  {kind:8s} {n} slices {label:30s} dice {s.dice:.3f} "
                          f"f1 {s.f1:.3f} train {s.train_s:.1f}s predict {s.predict_s:.1f}s",
                          flush=True)
            rf = scores["random forest"]
            for r in rows[-len(scores):]:
                r["dice / RF"] = r["dice"] / rf.dice if rf.dice else float("nan")
    print()
    print(table(rows, ["kind", "slices", "method", "dice", "f1", "dice / RF",
                       "train_s", "predict_s"]))
    print()
    names = list(dict.fromkeys(r["method"] for r in rows))
    summary = []
    for name in names:
        mine = [r for r in rows if r["method"] == name]
        summary.append(dict(method=name, dice=statistics.mean(r["dice"] for r in mine),
                            f1=statistics.mean(r["f1"] for r in mine),
                            train_s=statistics.mean(r["train_s"] for r in mine),
                            predict_s=statistics.mean(r["predict_s"] for r in mine)))
    print("Mean over kinds and slice counts:")
    print(table(summary, ["method", "dice", "f1", "train_s", "predict_s"]))
    per_n = []
    for n in args.slices:
        row = {"slices": n}
        for name in names:
            row[name] = statistics.mean(
                r["dice"] for r in rows if r["method"] == name and r["slices"] == n
            )
        per_n.append(row)
    print("\nMean Dice over kinds, per number of brushed slices:")
    print(table(per_n, ["slices", *names]))
    dice_of = {(r["method"], r["kind"], r["slices"]): r["dice"] for r in rows}
    n_settings = len(args.kinds) * len(args.slices)
    for name in [m for m in names if m != "random forest"]:
        wins = sum(dice_of[(name, k, n)] > dice_of[("random forest", k, n)]
                   for k in args.kinds for n in args.slices)
        mean_wins = sum(r[name] > r["random forest"] for r in per_n)
        print(f"{name}: beats the random forest in {wins} of {n_settings} "
              f"settings, and in mean Dice at {mean_wins} of {len(per_n)} slice counts")
    for name in [m for m in names if m.startswith("full, default")]:
        wins = sum(dice_of[(name, k, n)] > dice_of[("quick, default", k, n)]
                   for k in args.kinds for n in args.slices)
        mean_wins = sum(r[name] > r["quick, default"] for r in per_n)
        print(f"{name}: beats quick (default) in {wins} of {n_settings} settings, and in "
              f"mean Dice at {mean_wins} of {len(per_n)} slice counts")
    return 0


def _finetuned_only(seg: Segmenter) -> None:
    seg.config.quick_weight = 0.0


if __name__ == "__main__":
    raise SystemExit(main())
