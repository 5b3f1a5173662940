"""Parts of the segmentation widget's form: the quick model's choices and the plain-text
summary of a fit report."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QDoubleSpinBox

CANDIDATE_TIP = (
    "the quick-mode model: auto = the best on held-out strokes of\n"
    "foundation (foundation features + filters, an MLP), filters (filters alone, an MLP)\n"
    "and forest (a random forest on the filters); or one of them")
SOURCES = {"config": "given", "strokes": "from the strokes", "default": "assumed"}
DIAMETER_TIP = "the objects' typical diameter in um (the image's scale); 0 = from the strokes"

# Measured with cProfile on 2 CPU cores (benchmarks/README.md, "full mode on a CPU").
FULL_STEP_SECONDS_CPU = 1.4
FULL_START_SECONDS_CPU = 30.0


def full_mode_cost(steps: int) -> str:
    """The status line before a full-mode fit on a CPU: what it will cost."""
    minutes = (FULL_START_SECONDS_CPU + FULL_STEP_SECONDS_CPU * steps) / 60.0
    return (f"Training in full mode on the CPU: about {FULL_STEP_SECONDS_CPU:.1f} s a step, "
            f"so about {max(1, round(minutes))} min for {steps} steps on 2 cores "
            "(quick mode takes seconds; Stop keeps the best model so far)…")


def training_message(settings: dict, devices: Any) -> str:
    """The status line as a fit starts: with its true cost where it is long (full mode
    without a GPU in the ``devices`` combo box)."""
    gpu = any("cuda" in devices.itemText(i) for i in range(devices.count()))
    if settings["mode"] == "full" and (settings["device"] == "cpu" or not gpu):
        return full_mode_cost(settings["steps"])
    return "Training…"


def diameter_spin() -> QDoubleSpinBox:
    """Object diameter in um; 0 reads "from strokes" (estimated from the brushed objects)."""
    spin = QDoubleSpinBox(minimum=0.0, maximum=10_000.0, decimals=1, singleStep=1.0,
                          toolTip=DIAMETER_TIP, styleSheet="min-width: 56px")
    spin.setSpecialValueText("from strokes")
    return spin


def fit_summary(fit: Any) -> str:
    """The status line of a fit report, with its "candidate" (the model quick mode chose)
    and "validation" (scores on held-out strokes) where the report has them."""
    state = "stopped early, best model kept" if fit.get("stopped") else "trained"
    text = (f"{state}: {fit['steps_done']} steps in {fit['seconds']:.1f} s, best loss "
            f"{fit['best_loss']:.4g}, classes {fit['classes']}")
    if fit.get("candidate"):
        text += f"; model: {fit['candidate']}"
    scores = fit.get("validation")
    if isinstance(scores, dict) and scores:
        text += " (held-out strokes: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()
        ) + ")"
    elif isinstance(scores, float):
        text += f" (held-out strokes: {scores:.2f})"
    diameter = fit.get("object_diameter_um")
    if diameter:
        source = SOURCES.get(fit.get("diameter_source", ""), "")
        text += f"; objects about {diameter:.3g} um across" + (f" ({source})" if source else "")
    return text
