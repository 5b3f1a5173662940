"""What "adapt to this volume" buys (issue 14, item 5): quick mode on the default
foundation against quick mode on the foundation adapted to each volume, on the volumes,
strokes and splits of ``fewshot_segmentation.py``.

    python benchmarks/adapt.py [--split validation|report] [--adapt 300:1e-4 ...]
        [--columns in-distribution shifted foreign] [--settings NAME ...] [--quick]

For every volume: the strokes of ``fewshot_segmentation.py`` (2 brushed z planes:
object interiors as class 2, thin background lines as class 1); quick mode with its
candidate chosen on the strokes ("auto", the default) and with the foundation + filters
MLP forced ("foundation"), since auto may pick a filters-only candidate and then the
foundation's weights cannot show. The same two again on the foundation adapted to the
volume (``napari_lsmfm.pretrain.adapt.adapt_foundation``: its steps and learning rate
from ``--adapt STEPS:LR[:PATCH[:BATCH]][:NAME=VALUE]``, at the zoom quick mode derives from the same
strokes), for each ``--adapt`` setting. Same strokes, same seeds, same candidates.
Scores: foreground Dice; which candidate auto chose; the adaptation's seconds and its
loss at the start and the end. Markdown tables; the last line is ``SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _fewshot import brush_lines, machine, table  # noqa: E402
from fewshot_segmentation import SEEDS, SYNTH, foreign, run, synthetic  # noqa: E402

from napari_lsmfm.model import load_foundation  # noqa: E402
from napari_lsmfm.pretrain.adapt import adapt_foundation  # noqa: E402
from napari_lsmfm.tasks import Segmenter  # noqa: E402
from napari_lsmfm.tasks.segment import SegmentConfig, SparseLabels  # noqa: E402
from napari_lsmfm.tasks.segment.scale import object_scale  # noqa: E402

CANDIDATES = ("auto", "foundation")


def parse_setting(text: str) -> dict:
    """``STEPS:LR[:PATCH[:BATCH]][:NAME=VALUE...]`` -> keyword arguments of
    ``adapt_foundation`` (e.g. ``300:1e-4:ema_decay=1``)."""
    parts = text.split(":")
    out: dict = {"steps": int(parts[0]), "lr": float(parts[1]) if len(parts) > 1 else 2e-5}
    positional = [p for p in parts[2:] if "=" not in p]
    for name, value in zip(("patch", "batch"), positional, strict=False):
        out[name] = int(value)
    for part in parts[2:]:
        if "=" in part:
            name, value = part.split("=", 1)
            out[name] = float(value)
    return out


def quick_runs(foundation, vol, brushes) -> dict:
    """Dice and chosen candidate of quick mode, auto and foundation forced."""
    out = {}
    for candidate in CANDIDATES:
        seg = Segmenter(foundation, voxel_size=vol.voxel_size, seed=0, candidate=candidate)
        row = run(seg, vol, brushes)
        out[candidate] = {"dice": row["dice"], "candidate": row["candidate"],
                          "train_s": row["train_s"]}
    return out


def volumes(column: str, split: str, quick: bool) -> dict:
    if column == "foreign":
        return foreign(split)
    return {name: synthetic(dict(p), SEEDS[split], quick) for name, p in SYNTH[column].items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=tuple(SEEDS), default="report")
    parser.add_argument("--columns", nargs="+", default=["in-distribution", "shifted", "foreign"])
    parser.add_argument("--settings", nargs="+", default=None,
                        help="only these settings (volumes) of the columns, by name")
    parser.add_argument("--adapt", nargs="+", default=["300:2e-5"],
                        help="adaptation settings STEPS:LR[:PATCH[:BATCH]]")
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: small volumes")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    foundation = load_foundation(None, device="cpu")
    seed = SEEDS[args.split]
    print(f"machine: {machine()}")
    print(f"split: {args.split} (seed {seed}), {args.slices} brushed slices, "
          f"adaptation settings {args.adapt}")
    t_all = time.perf_counter()
    rows = []
    for column in args.columns:
        vols = volumes(column, args.split, args.quick)
        if args.settings:
            vols = {k: v for k, v in vols.items() if k in args.settings}
        offset = 3 if (column == "foreign" and args.split == "validation") else 0
        for name, vol in vols.items():
            brushes = brush_lines(vol.labels, args.slices, seed=seed, offset=offset)
            sparse = SparseLabels.from_array(brushes, vol.image.shape)
            zoom = object_scale(SegmentConfig(voxel_size=vol.voxel_size), sparse.coords,
                                sparse.values, vol.image.shape)["zoom"]
            base = quick_runs(foundation, vol, brushes)
            for setting in args.adapt:
                kwargs = parse_setting(setting)
                adapted, report = adapt_foundation(foundation, vol.image, zoom=zoom, **kwargs)
                got = quick_runs(adapted, vol, brushes)
                row = dict(column=column, setting=name, adapt=setting, zoom=zoom,
                           adapt_s=report["seconds"], first_loss=report["first_loss"],
                           loss=report["loss"])
                for c in CANDIDATES:
                    row[f"{c} base"] = base[c]["dice"]
                    row[f"{c} adapted"] = got[c]["dice"]
                    row[f"{c} gain"] = got[c]["dice"] - base[c]["dice"]
                row["auto picks (base / adapted)"] = (f"{base['auto']['candidate']} / "
                                                      f"{got['auto']['candidate']}")
                rows.append(row)
                print(f"  {column:15s} {name:36s} {setting:12s} zoom {zoom:.2f} "
                      f"auto {row['auto base']:.3f} -> {row['auto adapted']:.3f} "
                      f"({row['auto picks (base / adapted)']}), foundation "
                      f"{row['foundation base']:.3f} -> {row['foundation adapted']:.3f}, "
                      f"adapt {report['seconds']:.0f} s, loss {report['first_loss']:.3f} -> "
                      f"{report['loss']:.3f}", flush=True)
    print()
    print(table(rows, ["column", "setting", "adapt", "auto base", "auto adapted",
                       "auto picks (base / adapted)", "foundation base", "foundation adapted",
                       "adapt_s", "first_loss", "loss"]))
    means = summarise(rows, args.columns, args.adapt)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    print("SUMMARY " + json.dumps({"split": args.split, "seed": seed, "adapt": args.adapt,
                                   "settings": sorted({r["setting"] for r in rows}),
                                   "mean": means}))
    return 0


def summarise(rows, columns, settings) -> dict:
    """Mean Dice per column and adaptation setting: base, adapted, gain (both candidates),
    and the mean adaptation seconds."""
    out_rows, means = [], {}
    for setting in settings:
        for column in columns:
            mine = [r for r in rows if r["adapt"] == setting and r["column"] == column]
            if not mine:
                continue
            line = {"adapt": setting, "column": column, "volumes": len(mine)}
            for key in ("auto base", "auto adapted", "auto gain", "foundation base",
                        "foundation adapted", "foundation gain", "adapt_s"):
                line[key] = statistics.mean(r[key] for r in mine)
            out_rows.append(line)
            means.setdefault(setting, {})[column] = {
                k: round(v, 4) for k, v in line.items() if isinstance(v, float)}
    print("\nMean foreground Dice per column (gain = adapted - base):")
    print(table(out_rows, ["adapt", "column", "volumes", "auto base", "auto adapted",
                           "auto gain", "foundation base", "foundation adapted",
                           "foundation gain", "adapt_s"]))
    return means


if __name__ == "__main__":
    raise SystemExit(main())
