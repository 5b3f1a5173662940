"""The first minutes in the viewer: a real napari viewer, driven with a plain Qt event
loop, against the same jobs as fresh ``lsmfm`` processes (issue 15).

    xvfb-run -a python benchmarks/first_minutes.py          # or QT_QPA_PLATFORM=offscreen

Steps, each timed: open the nuclei sample -> dock the plugin's widgets (the default
foundation model starts loading in the background) -> brush (strokes painted into a
brush layer: the ground truth's eroded interiors on two slices as class 2, background
lines as class 1) -> the first model action, clicked at once (Train, quick mode: fit and
predict; ``--first deblur``: Deblur) -> Predict -> Load (the Foundation widget, default
model) -> Deblur. The same jobs run as fresh CLI processes, imports included
(``lsmfm segment ...``, ``lsmfm deblur ...``), before the viewer starts, so that this
process has imported neither torch nor MONAI when the widgets open. A 10 ms QTimer on
the UI thread records the event loop's largest gap in each step. A user clicks what is on
the screen, so opening the sample, adding the brush layer and docking the widgets each
end when the viewer has drawn them (0.3 s of event loop without a gap over 50 ms); the
time and stall that drawing costs count in that step's row.

The last line, for scripts:
``first-minutes: first_action_ratio=R1 train_ratio=R2 worst_stall_ms=S preload_s=P``
R1: the first action in the viewer (click to result) / the same job as a fresh CLI
process; R2: the quick fit in the viewer / the same fit in the CLI (the fits' own
``seconds``); S: the largest event-loop gap from the click (the docks drawn) to the
first training's last progress record; P: from the first widget opening to the default
model being ready.
Targets: R1 <= 1.5, R2 <= 1.3, S < 200, P <= 10.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PLUGIN = "napari-lsmfm"
WIDGETS = ("Foundation model", "Few-shot segmentation", "Deblur")
STEPS = 300


def brush_strokes(truth: np.ndarray, planes: tuple[int, ...]) -> np.ndarray:
    """Class 2: each object's interior (eroded by one pixel) on ``planes``; class 1:
    horizontal background lines every 16 rows, away from any object."""
    from scipy import ndimage

    strokes = np.zeros(truth.shape, np.uint8)
    for z in planes:
        fg = truth[z] > 0
        strokes[z][ndimage.binary_erosion(fg, iterations=1)] = 2
        far = ~ndimage.binary_dilation(fg, iterations=3)
        lines = np.zeros_like(fg)
        lines[8::16, 4:-4] = True
        strokes[z][lines & far] = 1
    return strokes


# --------------------------------------------------------------------------- CLI side
def run_cli(args: list[str]) -> tuple[float, dict]:
    """Wall time of ``lsmfm ARGS`` in a fresh process, and its JSON summary (stdout)."""
    exe = Path(sys.executable).parent / "lsmfm"
    t0 = time.perf_counter()
    quiet = ["--quiet"] if args[0] != "info" else []
    done = subprocess.run([str(exe), *args, *quiet], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"lsmfm {' '.join(args)} failed:\n{done.stderr}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return wall, (json.loads(lines[-1]) if lines else {})


# ------------------------------------------------------------------------ viewer side
class Ticker:
    """A 10 ms QTimer on the UI thread; :meth:`worst` is its largest gap in a span.
    ``what()`` names what is going on at each tick (for :meth:`gaps`)."""

    def __init__(self, what=lambda: "") -> None:
        from qtpy.QtCore import QTimer

        self.times: list[float] = []
        self.what: list[str] = []
        self._what = what
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        self.times.append(time.perf_counter())
        self.what.append(self._what())

    def drawn(self, quiet: float = 0.3, gap: float = 0.05) -> bool:
        """True once the event loop has ticked without a gap over ``gap`` s for the last
        ``quiet`` s: what was just opened is on the screen (a user can click it)."""
        now = time.perf_counter()
        recent = [t for t in self.times if t > now - quiet]
        if not recent or recent[0] - (now - quiet) > gap:
            return False
        return all(b - a <= gap for a, b in zip(recent, recent[1:], strict=False)) \
            and now - recent[-1] <= gap

    def worst(self, start: float, stop: float) -> float:
        """The largest gap between ticks (or the span's ends) within [start, stop], in s."""
        inside = [start] + [t for t in self.times if start < t < stop] + [stop]
        return max(b - a for a, b in zip(inside, inside[1:], strict=False))

    def gaps(self, start: float, stop: float, n: int = 5) -> list[tuple[float, float, str]]:
        """The ``n`` largest gaps in [start, stop]: (seconds after start, gap s, what was
        going on at the tick that ended it)."""
        ticks = [(t, w) for t, w in zip(self.times, self.what, strict=True) if start < t < stop]
        found = [(a[0] - start, b[0] - a[0], b[1]) for a, b in zip(ticks, ticks[1:],
                                                                  strict=False)]
        return sorted(found, key=lambda g: -g[1])[:n]


class GapTracer:
    """(``--trace-gaps``) A thread sampling every other thread's Python stack every 5 ms;
    when the UI thread could not run for ``limit`` s (no sample is possible either while
    one thread holds the GIL), prints the stacks seen just before and just after."""

    def __init__(self, limit: float = 0.1) -> None:
        import threading

        self.limit, self.stop = limit, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _stacks() -> dict[int, str]:
        import threading
        import traceback

        me = threading.get_ident()
        out = {}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            st = traceback.extract_stack(frame)[-6:][::-1]
            out[ident] = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}"
                                    for f in st)
        return out

    def _run(self) -> None:
        last, before = time.perf_counter(), {}
        while not self.stop:
            time.sleep(0.005)
            now, cur = time.perf_counter(), self._stacks()
            if now - last > self.limit:
                print(f"GAP {1000 * (now - last):.0f} ms at {now:.2f}", file=sys.stderr)
                for ident in cur:
                    print(f"   thread {ident}\n     before {before.get(ident, '-')}\n"
                          f"     after  {cur[ident]}", file=sys.stderr)
            last, before = now, cur


def run_loop(until, timeout: float, *, strict: bool = True) -> bool:
    """Run a plain Qt event loop until ``until()`` is true (checked every 10 ms); past
    ``timeout`` s, exit the run (``strict``) or return False."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    end = time.monotonic() + timeout
    check = QTimer()
    check.setInterval(10)
    check.timeout.connect(lambda: loop.quit() if until() or time.monotonic() > end else None)
    check.start()
    if not until():
        loop.exec()
    check.stop()
    if until():
        return True
    if strict:
        raise SystemExit(f"timed out after {timeout} s")
    return False


def spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    run_loop(lambda: time.monotonic() >= deadline, seconds + 5)


def viewer_session(first: str, strokes: np.ndarray, steps: int, think: float = 0.0) -> dict:
    import napari

    from napari_lsmfm.widgets.state import foundation_slot

    times: dict[str, float] = {}
    stalls: dict[str, float] = {}
    out: dict = {"times": times, "stalls": stalls}
    t = time.perf_counter()
    viewer = napari.Viewer(show=True, title="first minutes")
    times["viewer"] = time.perf_counter() - t
    widgets: dict = {}

    def what() -> str:
        seg = widgets.get("Few-shot segmentation")
        if seg is None:
            return ""
        slot = seg.slot
        loading = "preloading; " if slot.preloading() else ""
        return loading + " ".join(seg.status.text().split())[:60]

    ticker = Ticker(what)

    def step(name: str, action, done, timeout: float = 600.0, strict: bool = True) -> None:
        t0 = time.perf_counter()
        action()
        if not run_loop(done, timeout, strict=strict):
            gaps = ", ".join(f"{1000 * g:.0f}" for _, g, _ in ticker.gaps(t0, t0 + timeout))
            print(f"# {name}: the viewer did not settle in {timeout} s (largest gaps, ms: "
                  f"{gaps})", file=sys.stderr)
        t1 = time.perf_counter()
        times[name], stalls[name] = t1 - t0, ticker.worst(t0, t1)

    step("open sample", lambda: viewer.open_sample(PLUGIN, "nuclei"), ticker.drawn,
         timeout=20, strict=False)
    image = viewer.layers["nuclei"]
    # the strokes, painted into a brush layer (as napari's own "new labels layer" makes)
    step("brush layer", lambda: viewer.add_labels(
        strokes, name="nuclei brushes", scale=image.scale),
        ticker.drawn, timeout=20, strict=False)
    if think:  # a user looking at the data before opening the plugin's widgets
        spin(think)
    out["torch_before_docking"] = "torch" in sys.modules
    out["monai_before_docking"] = "monai" in sys.modules

    def dock() -> None:
        for name in WIDGETS:
            _, widgets[name] = viewer.window.add_plugin_dock_widget(
                plugin_name=PLUGIN, widget_name=name, tabify=True)

    # a user clicks what is on the screen: each step ends when the viewer has drawn it
    step("dock widgets", dock, ticker.drawn, timeout=20, strict=False)
    docked = out["docked"] = time.perf_counter()
    slot = foundation_slot(viewer)
    seg, deblur, fwidget = (widgets[n] for n in ("Few-shot segmentation", "Deblur",
                                                 "Foundation model"))
    seg.image_combo.setCurrentText("nuclei")
    seg.brush_combo.setCurrentText("nuclei brushes")
    seg.steps_spin.setValue(steps)
    deblur.image_combo.setCurrentText("nuclei")
    results: list = []
    seg.runner.succeeded.connect(lambda result: results.append(result))
    offset = time.perf_counter() - time.monotonic()
    last_update = [docked]  # when the job thread sent its last progress record
    seg.runner.updated.connect(lambda u: last_update.__setitem__(0, u.time + offset))
    idle = lambda w: (lambda: not w.busy)  # noqa: E731
    first_widget = seg if first == "train" else deblur
    button = seg.train_button if first == "train" else deblur.deblur_button
    step(f"first action: {first}", button.click, idle(first_widget))
    out["first_action_s"] = times[f"first action: {first}"]
    if first != "train":
        step("train (quick) + predict", seg.train_button.click, idle(seg))
    train_end = time.perf_counter()
    out["viewer_fit_s"] = _fit_seconds(results)
    if out["viewer_fit_s"] is None:
        raise SystemExit(f"training failed in the viewer: {seg.status.text()}")
    run_loop(lambda: slot.foundation is not None, 300)
    out["preload_s"] = slot.preload_seconds
    job_end = min(max(last_update[0], docked), train_end)
    out["load_stall"] = ticker.worst(docked, job_end)
    out["show_stall"] = ticker.worst(job_end, train_end)
    out["load_gaps"] = ticker.gaps(docked, train_end)
    step("predict", seg.predict_button.click, idle(seg))
    step("load (Foundation widget)", fwidget.load_button.click, idle(fwidget))
    if first != "deblur":
        step("deblur", deblur.deblur_button.click, idle(deblur))
    out["status"] = {n: w.status.text() for n, w in widgets.items()}
    spin(0.2)
    viewer.close()
    return out


def _fit_seconds(results: list) -> float | None:
    """The fit report's seconds of the last training job (its result: foundation, fit
    report, segmentation)."""
    for result in reversed(results):
        if isinstance(result, tuple) and len(result) == 3 and result[1] is not None:
            return float(result[1]["seconds"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", choices=["train", "deblur"], default="train",
                        help="the first model action, clicked right after the widgets open")
    parser.add_argument("--steps", type=int, default=STEPS, help="quick-mode training steps")
    parser.add_argument("--think", type=float, default=0.0,
                        help="seconds between the brush layer and docking the widgets (0: "
                             "at once, the reported run)")
    parser.add_argument("--trace-gaps", action="store_true",
                        help="print every thread's stack around each gap over 100 ms (stderr)")
    args = parser.parse_args(argv)
    from napari_lsmfm.io import write_volume
    from napari_lsmfm.synth.samples import SAMPLE_DIR, load_sample

    image, truth, voxel = load_sample("nuclei")
    strokes = brush_strokes(np.asarray(truth), planes=(16, 32))
    work = Path(tempfile.mkdtemp(prefix="first_minutes_"))
    brushes = write_volume(work / "brushes.tif", strokes)
    nuclei = SAMPLE_DIR / "nuclei.tif"
    vs = ",".join(str(v) for v in voxel)

    print(f"# first minutes: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"strokes: {int((strokes == 2).sum())} class 2, {int((strokes == 1).sum())} class 1 "
          f"voxels on z = 16, 32; {args.steps} steps; {args.think:g} s before docking")
    cli_seg, seg_summary = run_cli(["segment", str(nuclei), "--labels", str(brushes),
                                    "--out", str(work / "seg.tif"), "--steps", str(args.steps),
                                    "--voxel-size", vs, "--overwrite"])
    cli_deb, _ = run_cli(["deblur", str(nuclei), "--out", str(work / "deb.tif"), "--overwrite"])
    cli_info, _ = run_cli(["info"])
    cli_fit = float(seg_summary.get("fit", {}).get("seconds", float("nan")))

    tracer = GapTracer() if args.trace_gaps else None
    got = viewer_session(args.first, strokes, args.steps, args.think)
    if tracer is not None:
        tracer.stop = True
        print(f"docked at {got['docked']:.2f} (the GAP lines' clock)", file=sys.stderr)
    print("\n| step (viewer) | wall s | worst stall ms |\n|---|---:|---:|")
    print(f"| start napari | {got['times'].pop('viewer'):.2f} | |")
    for name, secs in got["times"].items():
        print(f"| {name} | {secs:.2f} | {1000 * got['stalls'][name]:.0f} |")
    print("\n| job as a fresh CLI process (imports included) | wall s |\n|---|---:|")
    print(f"| lsmfm segment (quick, {args.steps} steps, fit + predict) | {cli_seg:.2f} |")
    print(f"| lsmfm segment: its fit alone | {cli_fit:.2f} |")
    print(f"| lsmfm deblur (default model) | {cli_deb:.2f} |")
    print(f"| lsmfm info (default model) | {cli_info:.2f} |")
    cli_first = cli_seg if args.first == "train" else cli_deb
    r1 = got["first_action_s"] / cli_first
    fit = got.get("viewer_fit_s")
    r2 = fit / cli_fit if fit else float("nan")
    stall = 1000 * got["load_stall"]
    preload = got["preload_s"] if got["preload_s"] is not None else float("nan")
    print(f"\nworst event-loop gap while loading and training (Train clicked, the docks "
          f"drawn -> the job's last progress record): {stall:.0f} ms; while the results "
          f"became layers: {1000 * got['show_stall']:.0f} ms")
    print("largest gaps from docking until the results were shown "
          "(s after docking, ms, what was going on):")
    for at, gap, doing in got["load_gaps"]:
        print(f"  {at:7.2f}  {1000 * gap:5.0f}  {doing}")
    print(f"\ntorch imported before the widgets opened: {got['torch_before_docking']}; "
          f"MONAI: {got['monai_before_docking']}")
    print(f"viewer quick fit: {fit if fit is not None else float('nan'):.2f} s "
          f"(CLI {cli_fit:.2f} s)")
    print(f"default model ready {preload:.2f} s after the widgets opened "
          f"({'before' if preload <= 10 else 'after'} a click at 10 s)")
    for name, text in got["status"].items():
        print(f"status [{name}]: {' '.join(text.split())[:160]}")
    print(f"first-minutes: first_action_ratio={r1:.2f} train_ratio={r2:.2f} "
          f"worst_stall_ms={stall:.0f} preload_s={preload:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
