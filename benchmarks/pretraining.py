"""The value of pretraining: few-shot segmentation with the embedded default weights
against the same architecture randomly initialised.

    python benchmarks/pretraining.py [--weights W] [--slices 1 2 4] [--seeds 0 1 2]

Held-out synthetic volumes (seed 9001), quick mode with the foundation features alone
(`--features foundation`, no classical filters, so the comparison isolates the
backbone) and with the plugin's default feature set. Random initialisation is
repeated over ``--seeds`` and averaged. Prints markdown tables with the ratio
default / random init measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _fewshot import evaluate, held_out, machine, table  # noqa: E402

from napari_lsmfm.model import Foundation, load_foundation  # noqa: E402
from napari_lsmfm.tasks import Segmenter  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="pretrained weights (default: embedded)")
    parser.add_argument("--kinds", nargs="+", default=["nuclei", "vessels", "plaques"])
    parser.add_argument("--slices", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="random initialisations to average")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 128, 128])
    args = parser.parse_args(argv)

    pretrained = load_foundation(args.weights, device="cpu")
    randoms = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        randoms.append(Foundation(pretrained.spec, source=f"random init {seed}").eval())
    print(f"machine: {machine()}")
    info = pretrained.info()
    print(f"foundation: {info['architecture']} {info['parameters'] / 1e6:.2f} M parameters, "
          f"source {pretrained.source}")

    rows = []
    for feature_set, sigmas in (("foundation only", ()), ("foundation + filters", None)):
        extra = {} if sigmas is None else {"sigmas": sigmas}
        for kind in args.kinds:
            vol = held_out(kind, shape=tuple(args.shape))
            for n in args.slices:
                def run(f, vol=vol, n=n, extra=extra):
                    seg = Segmenter(f, mode="quick", steps=args.steps,
                                    voxel_size=vol.voxel_size, seed=0, **extra)
                    return evaluate(seg, vol, n)

                ours = run(pretrained)
                rand = [run(f) for f in randoms]
                rd = statistics.mean(s.dice for s in rand)
                rf1 = statistics.mean(s.f1 for s in rand)
                rows.append({
                    "features": feature_set, "kind": kind, "slices": n,
                    "dice default": ours.dice, "dice random": rd,
                    "f1 default": ours.f1, "f1 random": rf1,
                    "dice ratio": ours.dice / rd if rd else float("nan"),
                })
                print(f"  {feature_set:22s} {kind:8s} {n} slices: default {ours.dice:.3f} "
                      f"random {rd:.3f}", flush=True)
    print()
    print(table(rows, ["features", "kind", "slices", "dice default", "dice random",
                       "dice ratio", "f1 default", "f1 random"]))
    print()
    for feature_set in ("foundation only", "foundation + filters"):
        mine = [r for r in rows if r["features"] == feature_set]
        for n in args.slices:
            at_n = [r for r in mine if r["slices"] == n]
            print(f"{feature_set}, {n} slice(s): mean Dice default "
                  f"{statistics.mean(r['dice default'] for r in at_n):.3f} vs random "
                  f"{statistics.mean(r['dice random'] for r in at_n):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
