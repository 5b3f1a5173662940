"""Prediction throughput: MONAI's plain sliding window vs our tiled engine vs ``lsmfm predict``.

    python benchmarks/throughput.py --quick                    # a smoke run, ~2 minutes
    python benchmarks/throughput.py [--shape 128 256 256] [--tile 64 128 128]
        [--overlap 0.25] [--device cpu|cuda|all] [--repeats 3] [--tasks segment deblur]
        [--threads N]

For each task (the quick-mode segmenter, the deblur model) and device, on the same
model, window and overlap, every method runs in its own subprocess (so its peak
resident memory, ``VmHWM``, is its own) and is timed ``--repeats`` times (median):

- ``monai``: ``monai.inferers.sliding_window_inference`` as it is plainly used: the
  whole volume in memory, ``roi_size`` = the window, ``sw_batch_size`` 1, ``mode``
  "gaussian", then argmax to a uint8 class map (segmentation) or the deblurred volume
  back to uint16 (deblur). Its predictor is the model's own window function
  (normalisation inside) followed, for segmentation, by the head's softmax: MONAI
  blends probabilities, our engine blends the features and applies the head after.
- ``engine``: ``Segmenter.predict`` (no feature cache, class map only) /
  ``Deblurrer.predict``, i.e. the tiled engine with this repository's accelerators
  (:mod:`napari_lsmfm.engine.accel`); ``engine, accel off``: the same with
  ``LSMFM_CHANNELS_LAST=0`` (what the accelerators gain).
- ``lsmfm predict``: ``napari_lsmfm.scale.run.predict_volume`` (TIFF in, OME-Zarr out),
  when it is installed; also on a half-empty volume (half of it constant background)
  to show the background skip.

Columns: voxels per second, its ratio to MONAI's, the peak resident memory, and the
agreement with MONAI's output (segmentation: fraction of voxels with the same class;
deblur: the largest difference, and the 99.9th percentile, in [0, 1] units of the
normalised intensity range; the largest sit where windows meet, as MONAI's Gaussian
importance map has other tails than ours).
The volume is the shipped nuclei sample tiled to ``--shape``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
SAMPLE = REPO / "sample_data" / "nuclei.tif"


# ------------------------------------------------------------------ the machine


def machine() -> str:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ inputs


def make_inputs(work: Path, shape: tuple[int, ...], tile: tuple[int, ...], overlap: float,
                tasks: list[str]) -> dict:
    """The volume (and a half-empty copy) as .npy and .tif, and a quick segmenter trained
    on the nuclei sample (three brushed planes), saved."""
    import tifffile
    import torch

    from napari_lsmfm.model import load_foundation
    from napari_lsmfm.tasks.segment import Segmenter

    img = tifffile.imread(SAMPLE)
    reps = [-(-s // i) for s, i in zip(shape, img.shape, strict=True)]
    vol = np.ascontiguousarray(np.tile(img, reps)[: shape[0], : shape[1], : shape[2]])
    half = vol.copy()
    # constant background from the block boundary nearest the middle (blocks of whole
    # window steps, see lsmfm_run), so about half of the blocks hold no structure
    step = max(1, round(tile[0] * (1 - overlap)))
    half[max(step, round(shape[0] / 2 / step) * step) :] = np.percentile(img, 1)
    paths = {}
    for name, array in (("volume", vol), ("half", half)):
        np.save(work / f"{name}.npy", array)
        tifffile.imwrite(work / f"{name}.tif", array)
        paths[name] = str(work / f"{name}")
    if "segment" in tasks:
        labels = tifffile.imread(SAMPLE.with_name("nuclei_labels.tif"))
        brush = np.zeros(labels.shape, np.uint8)
        rng = np.random.default_rng(0)
        for z in (labels.shape[0] // 4, labels.shape[0] // 2, 3 * labels.shape[0] // 4):
            brush[z][labels[z] > 0] = 2
            brush[z][(labels[z] == 0) & (rng.random(labels[z].shape) < 0.1)] = 1
        torch.manual_seed(0)
        seg = Segmenter(load_foundation(None, device="cpu"), voxel_size=(2.0, 1.0, 1.0),
                        candidate="foundation", tile=tile, overlap=overlap)
        seg.fit(img, brush)
        seg.save(work / "segmenter", overwrite=True)
    return paths


# ------------------------------------------------------------------ one measurement


def load_model(task: str, work: Path, device: str, tile, overlap):
    if task == "segment":
        from napari_lsmfm.tasks.segment import Segmenter

        model = Segmenter.load(work / "segmenter", device=device)
        model.config.cache_bytes = 0  # window by window, as for a volume too big to cache
        return model, str(work / "segmenter")
    from napari_lsmfm.tasks.deblur import DEFAULT_DEBLUR_DIR, load_default_deblur

    model = load_default_deblur(device)
    model.config.tile, model.config.overlap = tuple(tile), float(overlap)
    return model, str(DEFAULT_DEBLUR_DIR)


def monai_run(task: str, model, image: np.ndarray, tile, overlap) -> np.ndarray:
    import torch
    from monai.inferers import sliding_window_inference

    from napari_lsmfm.tasks.deblur.intensity import deblur_range, to_units, volume_sample

    device = model.device
    if task == "segment":
        irange = model.foundation.intensity_range(image)
        fn = model.quick_features.window_fn(irange)
        head = model.head.to(device).eval()

        def predictor(x):
            feats = torch.as_tensor(fn(x.cpu().numpy())).to(device)
            b, c = feats.shape[:2]
            flat = feats.movedim(1, -1).reshape(-1, c)
            probs = torch.softmax(head(flat), -1)
            return probs.reshape(b, *feats.shape[2:], -1).movedim(-1, 1)
    else:
        irange = deblur_range(image, volume_sample(image))
        fn = model.window_fn(irange)

        def predictor(x):
            return fn(x.cpu().numpy())

    x = torch.from_numpy(image.astype(np.float32))[None, None]
    with torch.inference_mode():
        y = sliding_window_inference(x, tuple(tile), 1, predictor, overlap=overlap,
                                     mode="gaussian", sw_device=device, device="cpu")
    if task == "segment":  # the model's prior shift, as Segmenter.predict applies it
        from napari_lsmfm.tasks.segment.refine import apply_offsets

        offsets = model.refinement.offsets if model.refinement is not None else None
        probs = apply_offsets(y[0].numpy(), offsets, axis=0)
        values = np.asarray(model.channel_values, np.uint8)
        return values[probs.argmax(0)]
    return to_units(y[0, 0].numpy(), irange[0], irange[1], image.dtype)


def engine_run(task: str, model, image: np.ndarray) -> np.ndarray:
    if task == "segment":
        return model.predict(image, probabilities=False, uncertainty=False).classes
    return model.predict(image).data


def lsmfm_run(model_dir: str, tif: str, work: Path, device: str, tile, repeat: int) -> dict:
    from napari_lsmfm.scale.run import predict_volume

    out = work / f"out_{Path(tif).stem}_{repeat}.ome.zarr"
    # blocks of two window steps per axis: a benchmark volume holds several, so the
    # half-empty one has blocks to skip (with crop stitching, no window runs twice
    # whatever the block size)
    return predict_volume(model_dir, tif, str(out), overwrite=True, device=device,
                          tile=tuple(tile), block=tuple(tile))


def worker(args: argparse.Namespace) -> None:
    """One method, one task, one device, ``repeats`` times: prints a JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    model, model_dir = load_model(args.task, work, args.device, args.tile, args.overlap)
    name = "half" if args.method == "lsmfm-half" else "volume"
    image = np.load(work / f"{name}.npy")
    times, result, stats = [], None, {}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        if args.method == "monai":
            result = monai_run(args.task, model, image, args.tile, args.overlap)
        elif args.method == "engine":
            result = engine_run(args.task, model, image)
        else:
            stats = lsmfm_run(model_dir, str(work / f"{name}.tif"), work, args.device,
                              args.tile, r)
            if args.method == "lsmfm":  # its class map / deblurred volume, to compare
                import zarr

                result = zarr.open_array(str(work / f"out_volume_{r}.ome.zarr" / "0"))[:]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if result is not None:
        np.save(work / f"result_{args.task}_{args.device}_{args.method}_{args.tag}.npy", result)
    seconds = statistics.median(times)
    print(json.dumps({"seconds": seconds, "voxels": int(image.size), "times": times,
                      "rss_mib": peak_rss_mib(), "stats": {k: v for k, v in stats.items()
                                                           if isinstance(v, (int, float))}}))


# ------------------------------------------------------------------ the table


def run_worker(args, task: str, device: str, method: str, tag: str, env: dict) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--task", task, "--device", device,
           "--method", method, "--tag", tag, "--work", args.work,
           "--repeats", str(args.repeats), "--overlap", str(args.overlap),
           "--tile", *map(str, args.tile)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env},
                          check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-300:]}
    return json.loads(lines[-1])


def agreement(task: str, work: Path, device: str, tag: str, method: str = "engine") -> str:
    ref = work / f"result_{task}_{device}_monai_monai.npy"
    mine = work / f"result_{task}_{device}_{method}_{tag}.npy"
    if not ref.is_file() or not mine.is_file():
        return "-"
    a, b = np.load(ref), np.load(mine)
    if task == "segment":
        return f"{(a == b).mean():.4f} same class"
    from napari_lsmfm.tasks.deblur.intensity import deblur_range, volume_sample

    image = np.load(work / "volume.npy")
    lo, hi = deblur_range(image, volume_sample(image))
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)) / (hi - lo)
    # the largest differences sit where windows meet: MONAI's Gaussian tails differ
    return f"max {diff.max():.2g}, 99.9% <= {np.percentile(diff, 99.9):.2g}"


def has_predict_volume() -> bool:
    try:
        from napari_lsmfm.scale.run import predict_volume  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256))
    p.add_argument("--tile", type=int, nargs=3, default=(64, 128, 128))
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--device", default="all", help="cpu, cuda, or all (cuda when present)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=None,
                   choices=("engine", "lsmfm", "lsmfm-half"),
                   help="only these rows (with MONAI's, the baseline)")
    p.add_argument("--tasks", nargs="+", default=["segment", "deblur"],
                   choices=["segment", "deblur"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="small volume, one repeat")
    # internal: one measurement in a subprocess
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.tile = tuple(args.tile)
        worker(args)
        return 0
    if args.quick:
        args.shape, args.tile, args.repeats = (64, 192, 192), (32, 96, 96), 1
    args.tile = tuple(min(t, s) for t, s in zip(args.tile, args.shape, strict=True))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    print(f"machine: {machine()}")
    print(f"volume {tuple(args.shape)} (nuclei sample tiled), window {args.tile}, "
          f"overlap {args.overlap}, median of {args.repeats} run(s), each method in its own "
          "process\n")
    with_lsmfm = has_predict_volume()
    with tempfile.TemporaryDirectory(prefix="lsmfm-throughput-") as tmp:
        args.work = tmp
        t0 = time.perf_counter()
        make_inputs(Path(tmp), tuple(args.shape), args.tile, args.overlap, args.tasks)
        print(f"(inputs and a quick segmenter made in {time.perf_counter() - t0:.0f} s)\n")
        header = (f"{'task':8} {'device':6} {'method':22} {'Mvox/s':>8} {'x MONAI':>8} "
                  f"{'peak RSS MiB':>12}  agreement with MONAI")
        print(header)
        print("-" * len(header))
        for task in args.tasks:
            for device in devices:
                rows = [("monai", "monai", "monai", {}),
                        ("engine", "engine", "engine", {}),
                        ("engine, accel off", "engine", "off", {"LSMFM_CHANNELS_LAST": "0"})]
                if with_lsmfm:
                    rows += [("lsmfm predict", "lsmfm", "lsmfm", {}),
                             ("lsmfm predict, half", "lsmfm-half", "half", {})]
                base = None
                if args.methods:  # MONAI's row stays: it is the baseline of the ratios
                    rows = [r for r in rows if r[1] == "monai" or r[1] in args.methods]
                for label, method, tag, env in rows:
                    res = run_worker(args, task, device, method, tag, env)
                    if "error" in res:
                        print(f"{task:8} {device:6} {label:22} failed: {res['error']}")
                        continue
                    rate = res["voxels"] / res["seconds"] / 1e6
                    base = rate if method == "monai" else base
                    ratio = f"{rate / base:.2f}" if base else "-"
                    agree = (agreement(task, Path(tmp), device, tag, method)
                             if method in ("engine", "lsmfm") else "")
                    if method.startswith("lsmfm"):
                        st = res.get("stats", {})
                        agree += (f"{'; ' if agree else ''}{st.get('skipped', 0)} of "
                                  f"{st.get('blocks', 0)} blocks skipped")
                    print(f"{task:8} {device:6} {label:22} {rate:8.3f} {ratio:>8} "
                          f"{res['rss_mib']:12.0f}  {agree}", flush=True)
                if not with_lsmfm:
                    print(f"{task:8} {device:6} {'lsmfm predict':22} missing: "
                          "napari_lsmfm.scale.run.predict_volume is not importable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
