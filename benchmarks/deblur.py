"""Deblurring quality and speed: blurred input vs Richardson-Lucy vs the deblur model.

    python benchmarks/deblur.py --quick                  # 12 volumes, about a minute
    python benchmarks/deblur.py [--model FOLDER] [--threads N]

Held-out synthetic volumes (:func:`napari_lsmfm.tasks.deblur.synthetic_pair`, seeds
below ``TRAIN_SEED_BASE``, which training never uses): nuclei, vessels and plaques,
each through several Gaussian PSFs (axial sigma > lateral) at 1000 and 100 photons,
with Poisson and read noise, light-sheet shadows and uneven illumination.

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

ITERATIONS = (5, 10, 20, 40)


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


def cases(quick: bool) -> list[dict]:
    kinds = ("nuclei", "vessels", "plaques")
    if quick:
        psfs = ((2.0, 0.8, 0.8), (3.0, 1.0, 1.0))
        shape = (40, 80, 80)
    else:
        psfs = ((2.0, 0.8, 0.8), (3.0, 1.0, 1.0), (4.0, 1.5, 1.5))
        shape = (64, 128, 128)
    out = []
    for k, kind in enumerate(kinds):
        for p, psf in enumerate(psfs):
            for photons in (1000.0, 100.0):
                # held-out seeds: far below TRAIN_SEED_BASE
                seed = 100 * k + 10 * p + (1 if photons < 500 else 0)
                out.append({"kind": kind, "psf": psf, "photons": photons, "seed": seed,
                            "shape": shape})
    return out


def run_case(case: dict, model, threads: int) -> dict:
    from napari_lsmfm.tasks.deblur import gaussian_psf, richardson_lucy, synthetic_pair

    pair = synthetic_pair(case["kind"], case["shape"], (1.0, 1.0, 1.0),
                          psf_sigma_vox=case["psf"], photons=case["photons"],
                          seed=case["seed"])
    truth, image = pair.sharp, pair.image
    voxels = image.size
    row = {"kind": case["kind"], "psf": list(case["psf"]), "photons": case["photons"]}
    row["input_psnr"], row["input_ssim"] = scores(truth, image)

    psf = gaussian_psf(case["psf"])
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
    model.predict(image, psf_sigma=case["psf"])  # warm-up (allocator, first-call overheads)
    t0 = time.perf_counter()
    restored = model.predict(image, psf_sigma=case["psf"]).data
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
        lines.append(
            f"| {r['kind']} | {','.join(f'{v:g}' for v in r['psf'])} | {r['photons']:g} | "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 small volumes, 2 PSFs")
    parser.add_argument("--model", default=None,
                        help="a saved deblur model folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both methods (default: all cores)")
    parser.add_argument("--device", default="cpu", help="device of the model (cpu, cuda, ...)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
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
    todo = cases(args.quick)
    for i, case in enumerate(todo):
        rows.append(run_case(case, model, threads))
        print(f"[{i + 1}/{len(todo)}] {case['kind']} psf={case['psf']} photons={case['photons']:g}"
              f": RL {rows[-1]['rl_psnr']:.2f} model {rows[-1]['model_psnr']:.2f}",
              file=sys.stderr)
    print(f"Deblurring, {'quick' if args.quick else 'full'} setting: {len(rows)} held-out "
          f"volumes of {todo[0]['shape']} voxels; {threads} CPU thread(s); model "
          f"{args.model or 'default'} on {model.device}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
