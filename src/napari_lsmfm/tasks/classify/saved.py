"""A :class:`~.classifier.Classifier` on disk, in the engine's one saved-model format:
``config.json`` (classes, mode, settings, the foundation, the threshold) and safetensors
parts "probe" (standardisation and weights), "forest" (the trees on the hand-made
measures, as arrays), "openset" (class prototypes and the standardised examples) and
"text" (the prompts' class embeddings, when there are prompts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.engine.store import (
    check_foundation,
    foundation_record,
    load_task_model,
    save_task_model,
)
from napari_lsmfm.tasks.heads import ForestHead

from .config import ClassifyConfig
from .openset import OpenSet
from .probe import Probe

__all__ = ["load_classifier", "save_classifier"]


def save_classifier(clf: Any, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``clf`` to ``folder`` (a new folder unless ``overwrite``)."""
    import torch

    config: dict[str, Any] = {
        "classes": list(clf.class_names), "mode": clf.mode, "config": clf.config.to_dict(),
        "foundation": foundation_record(clf.foundation),
        "normalization": {"method": "percentile", "low": 1.0, "high": 99.0,
                          "per_volume": True},
        "text_rows": list(clf.text_rows), "prompt_weight": clf.prompt_weight,
    }
    parts: dict[str, dict] = {}
    if clf.probe is not None:
        config["probe"] = clf.probe.settings()
        parts["probe"] = clf.probe.state_dict()
    if getattr(clf, "forest", None) is not None:
        config["forest"] = clf.forest.settings()
        config["forest_weight"] = float(clf.forest_weight)
        parts["forest"] = clf.forest.state_dict()
    if clf.openset is not None:
        config["threshold"] = (None if not np.isfinite(clf.openset.threshold)
                               else float(clf.openset.threshold))
        config["calibrated"] = clf.openset.calibrated
        parts["openset"] = {"prototypes": torch.as_tensor(clf.openset.prototypes).float()}
        if clf.openset.examples is not None and clf.openset.targets is not None:
            parts["openset"]["examples"] = torch.as_tensor(clf.openset.examples).float()
            parts["openset"]["targets"] = torch.as_tensor(clf.openset.targets).long()
            config["neighbours"] = int(clf.openset.neighbours)
            config["spread_from"] = clf.openset.spread_from
            config["known_rate"] = float(clf.openset.known_rate)
            if clf.openset.loo_scores is not None:
                parts["openset"]["loo_scores"] = torch.as_tensor(clf.openset.loo_scores).double()
    if clf.text is not None:
        parts["text"] = {"prototypes": torch.as_tensor(clf.text).float()}
    return save_task_model(folder, task=clf.task, config=config, parts=parts,
                           overwrite=overwrite)


def load_classifier(cls: type, folder: str | Path, foundation: Any = None,
                    device: str | None = None) -> Any:
    """Rebuild a classifier (of class ``cls``) saved in ``folder``."""
    config, parts = load_task_model(folder, task="classify")
    record = config.get("foundation") or {}
    if foundation is None:
        from napari_lsmfm.tasks.segment.saved import foundation_for

        foundation = foundation_for(record, "quick", device)
    elif device is not None:
        foundation.to_device(device)
    check_foundation(record, foundation, exact=True)
    try:
        clf = cls(foundation, ClassifyConfig.from_dict(config.get("config") or {}))
        clf.class_names = tuple(str(c) for c in config["classes"])
        clf.mode = config.get("mode")
        if "probe" in parts:
            clf.probe = Probe.from_saved(config["probe"], parts["probe"]).eval()
        if "forest" in parts:
            clf.forest = ForestHead.from_saved(config["forest"], parts["forest"])
            clf.forest_weight = float(config.get("forest_weight", 0.5))
        if "openset" in parts:
            threshold = config.get("threshold")
            stored = parts["openset"]
            kept = "examples" in stored and "targets" in stored
            clf.openset = OpenSet(stored["prototypes"].double().numpy(),
                                  -np.inf if threshold is None else float(threshold),
                                  calibrated=bool(config.get("calibrated")),
                                  examples=stored["examples"].double().numpy() if kept else None,
                                  targets=stored["targets"].numpy() if kept else None,
                                  neighbours=int(config.get("neighbours", 1)),
                                  loo_scores=(stored["loo_scores"].numpy()
                                              if "loo_scores" in stored else None),
                                  spread_from=config.get("spread_from"),
                                  known_rate=float(config.get("known_rate", 0.95)))
        if "text" in parts:
            clf.text = parts["text"]["prototypes"].numpy()
            clf.text_rows = tuple(int(r) for r in config.get("text_rows", []))
        clf.prompt_weight = float(config.get("prompt_weight", 1.0))
        return clf
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{folder}: the saved classifier is damaged or from an incompatible "
                         f"version ({type(err).__name__}: {err})") from None
