"""The segmentation widget's form parts: the true cost of full mode, the fit summary."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox

from napari_lsmfm.widgets.segment_form import fit_summary, full_mode_cost, training_message


def _devices(*names: str) -> QComboBox:
    combo = QComboBox()
    combo.addItems(list(names))
    return combo


def test_full_mode_on_a_cpu_says_its_cost_before_it_starts(qtbot):
    settings = {"mode": "full", "steps": 200, "device": "auto"}
    text = training_message(settings, _devices("auto", "cpu"))
    assert "about 1.4 s a step" in text and "about 5 min for 200 steps" in text
    # with a GPU to run on, or in quick mode, no warning
    assert training_message(settings, _devices("auto", "cpu", "cuda:0")) == "Training…"
    assert training_message({**settings, "mode": "quick", "device": None},
                            _devices("auto", "cpu")) == "Training…"
    # the CPU chosen on purpose next to a GPU: the cost again
    assert "min for" in training_message({**settings, "device": "cpu"},
                                         _devices("auto", "cpu", "cuda:0"))
    assert "about 24 min for 1000 steps" in full_mode_cost(1000)


def test_fit_summary_names_the_chosen_model_and_the_scale():
    fit = {"steps_done": 100, "seconds": 2.5, "best_loss": 0.01, "classes": [2],
           "candidate": "filters", "validation": {"foundation": 0.91, "filters": 0.95},
           "object_diameter_um": 12.0, "diameter_source": "strokes"}
    text = fit_summary(fit)
    assert text.startswith("trained: 100 steps in 2.5 s")
    assert "model: filters (held-out strokes: foundation 0.91, filters 0.95)" in text
    assert "objects about 12 um across (from the strokes)" in text
    assert "stopped early" in fit_summary({**fit, "stopped": True})
