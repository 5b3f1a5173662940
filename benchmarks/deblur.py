"""Deblurring quality and speed: blurred input vs Richardson-Lucy vs the deblur model,
in three columns.

    python benchmarks/deblur.py --quick                  # fewer, smaller volumes
    python benchmarks/deblur.py [--model FOLDER] [--threads N] [--columns ...]

Columns:

- in-distribution: held-out synthetic volumes
  (:func:`napari_lsmfm.tasks.deblur.synthetic_pair`, seeds below ``TRAIN_SEED_BASE``,
  which training never uses): nuclei, vessels and plaques, each through several Gaussian
  PSFs inside the training draws (lateral sigma 0.5-1.6 voxels, axial 1.5-4x) at 1000
  and 100 photons, with Poisson and read noise, light-sheet shadows and uneven
  illumination;
- shifted: the same generator outside every training draw: lateral sigma 2.2 and 0.35
  voxels (axial 3x and 6x), 10 and 10 000 photons (training: 30-3000), objects twice as
  large and half as large (voxel size 0.5 and 2), three times as dense;
- real: real volumes of ``reference/data.md`` (``benchmarks/datasets.py``), each
  normalised to [0, 1] by its 0.1st-99.9th percentiles as the ground truth and imaged
  through our optics (:func:`napari_lsmfm.synth.degrade`: Gaussian PSF 2.5, 1, 1 voxels,
  300 photons, read noise 2, background 20; no shadows), as the issue measured:
  napari-cellseg3d's two nuclei stacks, epitools' epithelium, sdeconv's pollen and
  stardist's img3d (another project's synthetic nuclei); plus sdeconv's own pair, the
  pollen blurred with its measured PSF and Poisson noise by its authors (Richardson-Lucy
  gets that PSF, the model the Gaussian of its second moments). The volumes the shipped
  model was trained on (``TRAINED_ON``: cellseg3d's c5image and epitools, through random
  optics) are held out of this column and shown apart as "real, trained on".

Protocol. The ground truth is the sharp emitting density in [0, 1] (what the PSF
blurred). Every result (the blurred input, Richardson-Lucy, the model) is in camera
counts; each is mapped to the ground truth's units by the same least-squares affine
fit (scale and offset against the ground truth), so no method gains from its intensity
units. PSNR with data range 1; SSIM in 3D (``skimage.metrics.structural_similarity``
on the whole volume, data range 1, 7-voxel window). Richardson-Lucy gets the true PSF
and is scored at 5, 10, 20 and 40 iterations; the best PSNR is reported with its
iteration count (an oracle choice in its favour). The model is told the same PSF
(a PSF-conditioned model uses it; a blind one ignores it), and a conditioned model is
also scored blind, with no PSF. Speed: voxels per second of a timed
second run, Richardson-Lucy at its best iteration count, the model through
``Deblurrer.predict`` (normalisation, tiling, conversion back to uint16 included), both
with the same number of CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # datasets.py beside this script

ITERATIONS = (5, 10, 20, 40)
COLUMNS = ("in-distribution", "shifted", "real", "real, trained on")
REAL = ("cellseg3d", "cellseg3d-small", "epitools", "pollen", "stardist")
TRAINED_ON = ("cellseg3d", "epitools")  # the shipped model's real training volumes
REAL_PSF = (2.5, 1.0, 1.0)
REAL_PHOTONS = 300.0


def affine_to(truth: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``image`` mapped to ``truth``'s units by a least-squares scale and offset."""
    x = image.astype(np.float64).ravel()
    t = truth.astype(np.float64).ravel()
    xm, tm = x.mean(), t.mean()
    var = ((x - xm) ** 2).mean()
    scale = ((x - xm) * (t - tm)).mean() / var if var > 0 else 0.0
    return (scale * (image.astype(np.float64) - xm) + tm).astype(np.float32)


def scores(truth: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, 3D SSIM) of ``image`` against ``truth`` in [0, 1] after the affine fit."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    mapped = affine_to(truth, image)
    psnr = peak_signal_noise_ratio(truth, mapped, data_range=1.0)
    ssim = structural_similarity(truth, mapped, data_range=1.0, win_size=7)
    return float(psnr), float(ssim)


def cases(quick: bool, columns=COLUMNS) -> list[dict]:
    kinds = ("nuclei", "vessels", "plaques")
    if quick:
        psfs = ((2.0, 0.8, 0.8), (3.0, 1.0, 1.0))
        shape = (40, 80, 80)
    else:
        psfs = ((2.0, 0.8, 0.8), (3.0, 1.0, 1.0), (4.0, 1.5, 1.5))
        shape = (64, 128, 128)
    out = []
    if "in-distribution" in columns:
        for k, kind in enumerate(kinds):
            for p, psf in enumerate(psfs):
                for photons in (1000.0, 100.0):
                    # held-out seeds: far below TRAIN_SEED_BASE
                    seed = 100 * k + 10 * p + (1 if photons < 500 else 0)
                    out.append({"column": "in-distribution", "kind": kind, "psf": psf,
                                "photons": photons, "seed": seed, "shape": shape})
    if "shifted" in columns:
        shifted = [((6.6, 2.2, 2.2), 1000.0, 1.0, 1.0), ((2.1, 0.35, 0.35), 1000.0, 1.0, 1.0),
                   ((3.0, 1.0, 1.0), 10.0, 1.0, 1.0), ((3.0, 1.0, 1.0), 10000.0, 1.0, 1.0),
                   ((3.0, 1.0, 1.0), 300.0, 0.5, 1.0), ((3.0, 1.0, 1.0), 300.0, 2.0, 3.0)]
        for k, kind in enumerate(kinds):
            for j, (psf, photons, voxel, density) in enumerate(shifted[:4 if quick else 6]):
                out.append({"column": "shifted", "kind": kind, "psf": psf, "photons": photons,
                            "voxel": voxel, "density": density, "seed": 5000 + 100 * k + j,
                            "shape": shape})
    for j, name in enumerate(REAL):
        column = "real, trained on" if name in TRAINED_ON else "real"
        if column in columns:
            out.append({"column": column, "kind": name, "psf": REAL_PSF,
                        "photons": REAL_PHOTONS, "seed": 7000 + j})
    if "real" in columns:
        out.append({"column": "real", "kind": "sdeconv pair", "psf": None, "photons": None,
                    "seed": 0})
    return out


def volume_of(case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """(ground truth in [0, 1], blurred image, PSF array, PSF sigma for the model)."""
    from napari_lsmfm.tasks.deblur import gaussian_psf, synthetic_pair
    from napari_lsmfm.tasks.deblur.pairs import sharp_unit

    if not case["column"].startswith("real"):
        voxel = case.get("voxel", 1.0)
        pair = synthetic_pair(case["kind"], case["shape"], (voxel,) * 3,
                              psf_sigma_vox=case["psf"], photons=case["photons"],
                              seed=case["seed"], density=case.get("density", 1.0))
        return pair.sharp, pair.image, gaussian_psf(case["psf"]), tuple(case["psf"])
    import datasets

    if case["kind"] == "sdeconv pair":
        sharp, blurred, psf = datasets.sdeconv_pollen_pair()
        psf = psf.astype(np.float32) / psf.sum()
        return sharp_unit(sharp), blurred, psf, psf_moments(psf)
    from napari_lsmfm.synth import degrade

    truth = sharp_unit(datasets.LOADERS[case["kind"]]().image)
    image = degrade(truth, np.random.default_rng(case["seed"]), psf_sigma_vox=case["psf"],
                    photons=case["photons"], read_noise=2.0, background=20.0, stripes=0.0,
                    attenuation=0.0, illumination=0.0)
    return truth, image, gaussian_psf(case["psf"]), tuple(case["psf"])


def psf_moments(psf: np.ndarray) -> tuple[float, float, float]:
    """The Gaussian sigmas (z, y, x voxels) of a PSF array's second moments."""
    p = np.clip(psf.astype(np.float64), 0, None)
    p /= p.sum()
    grids = np.meshgrid(*[np.arange(n) for n in p.shape], indexing="ij")
    out = []
    for g in grids:
        mean = (g * p).sum()
        out.append(float(np.sqrt(((g - mean) ** 2 * p).sum())))
    return tuple(out)


def run_case(case: dict, model, threads: int) -> dict:
    from napari_lsmfm.tasks.deblur import richardson_lucy

    truth, image, psf, sigma = volume_of(case)
    voxels = image.size
    row = {"column": case["column"], "kind": case["kind"], "psf": list(sigma),
           "photons": case["photons"] or 0.0, "shape": list(image.shape),
           "voxel": case.get("voxel", 1.0), "density": case.get("density", 1.0)}
    row["input_psnr"], row["input_ssim"] = scores(truth, image)

    snapshots: dict[int, np.ndarray] = {}
    baseline = float(image.min())

    def keep(i: int, estimate: np.ndarray) -> None:
        if i in ITERATIONS:
            snapshots[i] = estimate + np.float32(baseline)

    richardson_lucy(image, psf, max(ITERATIONS), on_iteration=keep, workers=threads)
    rl = {n: scores(truth, snapshots[n]) for n in ITERATIONS}
    best = max(rl, key=lambda n: rl[n][0])
    row["rl_iterations"] = best
    row["rl_psnr"], row["rl_ssim"] = rl[best]
    row["rl_all"] = {str(n): round(v[0], 2) for n, v in rl.items()}
    t0 = time.perf_counter()
    richardson_lucy(image, psf, best, workers=threads)
    row["rl_vps"] = voxels / (time.perf_counter() - t0)

    # the model gets what Richardson-Lucy gets: the true PSF (a PSF-conditioned model uses
    # it, a blind one ignores it); a conditioned model is also scored blind
    conditioned = bool(getattr(model.net, "psf_condition", False))
    model.predict(image, psf_sigma=sigma)  # warm-up (allocator, first-call overheads)
    t0 = time.perf_counter()
    restored = model.predict(image, psf_sigma=sigma).data
    row["model_vps"] = voxels / (time.perf_counter() - t0)
    assert restored.dtype == image.dtype and restored.shape == image.shape
    row["model_psnr"], row["model_ssim"] = scores(truth, restored)
    if conditioned:
        row["blind_psnr"], row["blind_ssim"] = scores(truth, model.predict(image).data)
    return row


def table(rows: list[dict]) -> str:
    head = ("| structure | PSF sigma z,y,x (vox) | photons | input PSNR / SSIM | "
            "RL best PSNR / SSIM (iter) | model PSNR / SSIM | RL Mvox/s | model Mvox/s |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        kind = r["kind"]
        if r.get("voxel", 1.0) != 1.0 or r.get("density", 1.0) != 1.0:
            kind += f" (voxel {r['voxel']:g}, density x{r['density']:g})"
        lines.append(
            f"| {kind} | {','.join(f'{v:.3g}' for v in r['psf'])} | {r['photons']:g} | "
            f"{r['input_psnr']:.2f} / {r['input_ssim']:.3f} | "
            f"{r['rl_psnr']:.2f} / {r['rl_ssim']:.3f} ({r['rl_iterations']}) | "
            f"{r['model_psnr']:.2f} / {r['model_ssim']:.3f} | "
            f"{r['rl_vps'] / 1e6:.2f} | {r['model_vps'] / 1e6:.2f} |"
        )
    blind = all("blind_psnr" in r for r in rows)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in (
        "input_psnr", "input_ssim", "rl_psnr", "rl_ssim", "model_psnr", "model_ssim",
        "rl_vps", "model_vps")}
    lines.append(
        f"| **mean** | | | {mean['input_psnr']:.2f} / {mean['input_ssim']:.3f} | "
        f"{mean['rl_psnr']:.2f} / {mean['rl_ssim']:.3f} | "
        f"{mean['model_psnr']:.2f} / {mean['model_ssim']:.3f} | "
        f"{mean['rl_vps'] / 1e6:.2f} | {mean['model_vps'] / 1e6:.2f} |"
    )
    gain = mean["model_psnr"] - mean["rl_psnr"]
    if blind:
        bp = float(np.mean([r["blind_psnr"] for r in rows]))
        bs = float(np.mean([r["blind_ssim"] for r in rows]))
        lines.append(f"\nThe same model blind (no PSF given): mean PSNR / SSIM {bp:.2f} / "
                     f"{bs:.3f}, {bp - mean['rl_psnr']:+.2f} dB vs best RL (which has the PSF)")
    # speed: total voxels over total time, per method
    rl_time = sum(1.0 / r["rl_vps"] for r in rows)
    model_time = sum(1.0 / r["model_vps"] for r in rows)
    ratio = rl_time / model_time
    lines += [
        "",
        f"- model - best RL: {gain:+.2f} dB PSNR, {mean['model_ssim'] - mean['rl_ssim']:+.3f} "
        f"SSIM (mean); model better than RL in "
        f"{sum(r['model_psnr'] > r['rl_psnr'] for r in rows)}/{len(rows)} volumes",
        f"- model - input: {mean['model_psnr'] - mean['input_psnr']:+.2f} dB; "
        f"best RL - input: {mean['rl_psnr'] - mean['input_psnr']:+.2f} dB",
        f"- speed (same voxels, same threads): model {ratio:.2f}x Richardson-Lucy at its best "
        "iteration count",
        f"- target (>= 1 dB over best RL, and faster): "
        f"{'MET' if gain >= 1.0 and ratio > 1.0 else 'NOT MET'}",
    ]
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per column: means, the model against RL and against the input."""
    lines = ["| column | volumes | input PSNR | RL best PSNR | model (PSF given) | "
             "model blind (one click) | model - RL | blind - RL | worst blind - input |",
             "|" + "---|" * 9]
    for column in COLUMNS:
        part = [r for r in rows if r["column"] == column]
        if not part:
            continue

        def mean(key: str, part=part) -> float:
            return float(np.mean([r.get(key, r["model_psnr"]) for r in part]))

        worst = min(r.get("blind_psnr", r["model_psnr"]) - r["input_psnr"] for r in part)
        lines.append(f"| {column} | {len(part)} | {mean('input_psnr'):.2f} | "
                     f"{mean('rl_psnr'):.2f} | {mean('model_psnr'):.2f} | "
                     f"{mean('blind_psnr'):.2f} | {mean('model_psnr') - mean('rl_psnr'):+.2f} | "
                     f"{mean('blind_psnr') - mean('rl_psnr'):+.2f} | {worst:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 small volumes, 2 PSFs")
    parser.add_argument("--model", default=None,
                        help="a saved deblur model folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both methods (default: all cores)")
    parser.add_argument("--device", default="cpu", help="device of the model (cpu, cuda, ...)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--columns", nargs="+", choices=COLUMNS, default=list(COLUMNS))
    args = parser.parse_args(argv)

    import torch

    from napari_lsmfm.tasks.deblur import Deblurrer, load_default_deblur

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.model:
        model = Deblurrer.load(args.model, device=args.device)
    else:
        model = load_default_deblur(args.device)
    rows = []
    todo = cases(args.quick, args.columns)
    for i, case in enumerate(todo):
        rows.append(run_case(case, model, threads))
        print(f"[{i + 1}/{len(todo)}] {case['column']} {case['kind']} psf={case['psf']} "
              f"photons={case['photons']}: RL {rows[-1]['rl_psnr']:.2f} model "
              f"{rows[-1]['model_psnr']:.2f}", file=sys.stderr)
    print(f"Deblurring, {'quick' if args.quick else 'full'} setting: {len(rows)} held-out "
          f"volumes; {threads} CPU thread(s); model {args.model or 'default'} on "
          f"{model.device}\n")
    print(summary(rows))
    for column in COLUMNS:
        part = [r for r in rows if r["column"] == column]
        if part:
            shapes = sorted({tuple(r["shape"]) for r in part})
            print(f"\n### {column} ({len(part)} volumes, shapes {', '.join(map(str, shapes))})\n")
            print(table(part))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
