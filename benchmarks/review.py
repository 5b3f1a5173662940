"""Expert review by clicks (issue 17): how much a few click corrections improve the quick
model's prediction, with a simulated expert, in the three columns of issue 14.

    OMP_NUM_THREADS=2 python benchmarks/review.py [--split report|validation] [--clicks 10]
        [--columns in-distribution shifted foreign] [--quick] [--weights W]

For every held-out volume (the volumes, strokes and splits of
``fewshot_segmentation.py``: strokes on 2 z planes): the quick model (``Segmenter``,
default settings) is fitted on the strokes and predicts instances; a
``ReviewSession`` opens on them; then the simulated expert clicks (VISTA3D's rule,
:func:`napari_lsmfm.review.clicks.simulate_click`: a random voxel of the largest error
component after a 3x3x3 erosion, positive when false negatives outnumber false positives
there), and each click goes through ``ReviewSession.click`` with a
:class:`~napari_lsmfm.review.ClickCorrector` (the neighbourhood re-predicted with the
model conditioned on every click so far). Scores of the reviewed labels after 0, 1, 5
and 10 clicks: foreground Dice, and per-object F1 at IoU 0.5 where the truth has
instances (a semantic class such as vessels: its connected components are the objects,
F1 not reported). Seconds per click: the whole ``session.click`` (conditioning, region
prediction, applying the mask), on this machine's threads (``OMP_NUM_THREADS``).

Splits: ``--split validation`` (seed 7001) for tuning, ``--split report`` (seed 9001,
the default) is what we report. The last line is machine-readable:
``review: dice_gain_10=... seconds_per_click=...`` (means over the volumes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).parent))
from _fewshot import brush_lines, dice, machine, table  # noqa: E402
from fewshot_segmentation import SEEDS, SYNTH, foreign, synthetic  # noqa: E402

from napari_lsmfm.model import load_foundation  # noqa: E402
from napari_lsmfm.review import ClickCorrector, ReviewSession  # noqa: E402
from napari_lsmfm.review.clicks import simulate_click  # noqa: E402
from napari_lsmfm.tasks import Segmenter  # noqa: E402
from napari_lsmfm.tasks.instance_metrics import object_f1  # noqa: E402

CHECKPOINTS = (0, 1, 5, 10)


class TruthCorrector(ClickCorrector):
    """``--oracle``: the upper bound of a local correction: the region a click names (as
    :class:`ClickCorrector` chooses it), its mask taken from the ground truth."""

    def __init__(self, truth_fg, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.truth = truth_fg

    def correct(self, session, point, positive):
        region, _ = super().correct(session, point, positive)
        return region, self.truth[region]


def review_volume(foundation, vol, brushes, n_clicks: int, seed: int,
                  corrector_args: dict | None = None, oracle: bool = False) -> dict:
    """Fit, predict, open a session, click ``n_clicks`` times; scores at the checkpoints
    and the seconds of each click."""
    seg = Segmenter(foundation, voxel_size=vol.voxel_size, seed=0)
    t0 = time.perf_counter()
    fit = seg.fit(vol.image, brushes)
    fit_s = time.perf_counter() - t0
    result = seg.predict(vol.image, instances=vol.instances or [], probabilities=True)
    classes = np.asarray(result.classes)
    start = (np.asarray(result.instances) if vol.instances
             else ndi.label(classes == 2)[0])
    session = ReviewSession(start.astype(np.uint32), image=vol.image, classes=classes,
                            probabilities=result.probabilities,
                            channel_values=seg.channel_values, voxel_size=vol.voxel_size)
    corrector = (TruthCorrector(vol.labels > 0, seg, vol.image, **(corrector_args or {}))
                 if oracle else ClickCorrector(seg, vol.image, **(corrector_args or {})))
    truth_fg = vol.labels > 0
    truth_objects = vol.labels if vol.instances else None
    rng = np.random.default_rng(seed)

    def score():
        fg = np.asarray(session.labels) > 0
        f1 = (object_f1(np.asarray(session.labels), truth_objects)
              if truth_objects is not None else float("nan"))
        return dice(fg, truth_fg), f1

    scores = {0: score()}
    seconds, kinds = [], []
    for k in range(1, n_clicks + 1):
        click = simulate_click(np.asarray(session.labels) > 0, truth_fg, rng)
        if click is None:  # nothing left to correct
            scores[k] = scores[k - 1]
            continue
        point, positive = click
        t = time.perf_counter()
        try:
            session.click(point, positive, corrector)
        except ValueError as err:  # a refused click (ReviewError) changes nothing
            kinds.append(f"refused: {err}")
        seconds.append(time.perf_counter() - t)
        kinds.append("+" if positive else "-")
        scores[k] = score()
    return {"candidate": fit["candidate"], "fit_s": fit_s, "scores": scores,
            "seconds": seconds, "clicks": "".join(c for c in kinds if len(c) == 1)}


def volumes_of(column: str, seed: int, split: str, quick: bool) -> dict:
    if column == "foreign":
        vols = foreign(split)
    else:
        vols = {name: synthetic(dict(p), seed, quick) for name, p in SYNTH[column].items()}
    return dict(list(vols.items())[:1]) if quick else vols


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=tuple(SEEDS), default="report")
    parser.add_argument("--columns", nargs="+", default=["in-distribution", "shifted", "foreign"])
    parser.add_argument("--clicks", type=int, default=max(CHECKPOINTS))
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--weights", default=None, help="foundation weights (default: embedded)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: half-size synthetic volumes, one setting per column")
    parser.add_argument("--reach", type=int, default=None, help="ClickCorrector reach")
    parser.add_argument("--radius", type=int, default=None, help="ClickCorrector radius")
    parser.add_argument("--strength", type=float, default=None, help="ClickCorrector strength")
    parser.add_argument("--steps", type=int, default=None, help="ClickCorrector steps")
    parser.add_argument("--wand", type=float, default=None,
                        help="ClickCorrector wand (negative: none, the model's mask alone)")
    parser.add_argument("--oracle", action="store_true",
                        help="each click's region set to the truth: the bound of local fixes")
    args = parser.parse_args(argv)
    corrector_args = {k: v for k, v in (("reach", args.reach), ("radius", args.radius),
                                         ("strength", args.strength), ("steps", args.steps),
                                         ("wand", args.wand))
                      if v is not None}
    if corrector_args.get("wand", 0.0) < 0:
        corrector_args["wand"] = None

    foundation = load_foundation(args.weights, device="cpu")
    seed = SEEDS[args.split]
    checkpoints = [c for c in CHECKPOINTS if c <= args.clicks]
    print(f"machine: {machine()}")
    print(f"split: {args.split} (seed {seed}; "
          f"{'never tuned on' if args.split == 'report' else 'for tuning'}), "
          f"{args.slices} brushed slices, {args.clicks} clicks per volume, "
          f"corrector {corrector_args or 'defaults'}")
    rows = []
    t_all = time.perf_counter()
    for column in args.columns:
        offset = 3 if (column == "foreign" and args.split == "validation") else 0
        for name, vol in volumes_of(column, seed, args.split, args.quick).items():
            brushes = brush_lines(vol.labels, args.slices, seed=seed, offset=offset)
            got = review_volume(foundation, vol, brushes, args.clicks, seed, corrector_args,
                                args.oracle)
            row = {"column": column, "setting": name, "candidate": got["candidate"]}
            for c in checkpoints:
                row[f"dice@{c}"], row[f"f1@{c}"] = got["scores"][c]
            row["gain"] = row[f"dice@{checkpoints[-1]}"] - row["dice@0"]
            row["s/click"] = statistics.mean(got["seconds"]) if got["seconds"] else float("nan")
            row["max s"] = max(got["seconds"]) if got["seconds"] else float("nan")
            row["clicks"] = got["clicks"]
            rows.append(row)
            print(f"  {column:15s} {name:36s} dice " + " ".join(
                f"{row[f'dice@{c}']:.3f}" for c in checkpoints) + "  f1 " + " ".join(
                f"{row[f'f1@{c}']:.3f}" for c in checkpoints)
                + f"  {row['s/click']:.2f} s/click  [{got['candidate']}, fit "
                f"{got['fit_s']:.1f}s, clicks {got['clicks']}]", flush=True)
    cols = ["column", "setting", "candidate",
            *[f"dice@{c}" for c in checkpoints], *[f"f1@{c}" for c in checkpoints],
            "gain", "s/click", "max s", "clicks"]
    print()
    print(table(rows, cols))
    means = []
    for column in args.columns:
        mine = [r for r in rows if r["column"] == column]
        line = {"column": column}
        for key in [*[f"dice@{c}" for c in checkpoints], *[f"f1@{c}" for c in checkpoints],
                    "gain", "s/click"]:
            vals = [r[key] for r in mine if r[key] == r[key]]
            line[key] = statistics.mean(vals) if vals else float("nan")
        means.append(line)
    print("\nMeans per column:")
    print(table(means, ["column", *[f"dice@{c}" for c in checkpoints],
                        *[f"f1@{c}" for c in checkpoints], "gain", "s/click"]))
    gain = statistics.mean(r["gain"] for r in rows)
    per_click = [r["s/click"] for r in rows if r["s/click"] == r["s/click"]]
    spc = statistics.mean(per_click) if per_click else float("nan")
    slowest = max((r["max s"] for r in rows if r["max s"] == r["max s"]), default=float("nan"))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; slowest click {slowest:.2f} s")
    print(f"review: dice_gain_{checkpoints[-1]}={gain:.4f} seconds_per_click={spc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
