"""A :class:`~.segmenter.Segmenter` on disk: what is saved (the engine's saved-model
format: ``config.json`` plus safetensors parts) and how it is rebuilt.

Parts: quick mode "head" (an MLP, or a random forest's trees as arrays: the "candidate"
entry says which model won, "features" what it reads, "refinement" the prior shift its
probabilities get, :mod:`.refine`); full mode "head" and "backbone"
of the finetuned network, plus "anchor_head" and "anchor_backbone", the quick model it
started from (absent in models trained with ``quick_weight`` 0 or saved before output
ensembling).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari_lsmfm.engine.store import check_foundation, foundation_record, load_task_model
from napari_lsmfm.tasks.heads import ForestHead, VoxelHead

from .config import SegmentConfig
from .features import QuickFeatures
from .full import FullNet
from .refine import PriorShift

__all__ = ["foundation_for", "load_segmenter", "model_record"]


def model_record(seg: Any) -> tuple[dict, dict]:
    """(config, parts) of a trained segmenter for ``save_task_model``."""
    config = {
        "mode": seg.config.mode,
        "classes": list(seg.classes),
        "channel_values": list(seg.channel_values),
        "config": seg.config.to_dict(),
        "foundation": foundation_record(seg.foundation),
        "normalization": {"method": "percentile", "low": 1.0, "high": 99.0,
                          "per_volume": True},
        "best_loss": seg.best_loss,
        "steps_done": len(seg.history),
    }
    if seg.config.mode == "quick":
        config["head"] = seg.head.settings()
        config["features"] = seg.quick_features.settings()
        config["candidate"] = seg.candidate
        if seg.refinement is not None:
            config["refinement"] = seg.refinement.record()
        parts = {"head": seg.head.state_dict()}
    else:
        config["head"] = seg.net.head.settings()
        config["features"] = seg.net.settings()
        parts = {"head": seg.net.head.state_dict(),
                 "backbone": seg.net.foundation.backbone.state_dict()}
        if seg.anchor is not None:  # the quick model it started from (see quick_weight)
            config["anchor"] = {"head": seg.anchor.head.settings(),
                                "features": seg.anchor.settings()}
            parts["anchor_head"] = seg.anchor.head.state_dict()
            parts["anchor_backbone"] = seg.anchor.foundation.backbone.state_dict()
    return config, parts


def load_segmenter(cls: type, folder: str | Path, foundation: Any = None,
                   device: str | None = None) -> Any:
    """Rebuild a segmenter (of class ``cls``) saved in ``folder``; see ``Segmenter.load``."""
    config, parts = load_task_model(folder, task="segment")
    record = config.get("foundation") or {}
    cfg = SegmentConfig.from_dict(config.get("config") or {})
    cfg.device = device  # where it was trained (say a GPU) need not exist here
    if foundation is None:
        foundation = foundation_for(record, cfg.mode, device)
    check_foundation(record, foundation, exact=(cfg.mode == "quick"))
    try:
        seg = cls(foundation, cfg)
        classes = tuple(int(c) for c in config["classes"])
        seg.best_loss = config.get("best_loss")
        if cfg.mode == "quick":
            kind = config["head"].get("kind", "mlp")
            head_cls = ForestHead if kind == "forest" else VoxelHead
            head = head_cls.from_saved(config["head"], parts["head"])
            # the features the head reads: saved since the candidates (older models: the
            # config's, as then)
            feats = (QuickFeatures.from_settings(foundation, cfg, config["features"])
                     if "zoom" in config.get("features", {}) else seg.quick_features)
            if head.in_channels != feats.channels:
                raise ValueError(
                    f"{folder}: the head reads {head.in_channels} features but these settings "
                    f"make {feats.channels}"
                )
            candidate = config.get("candidate") or "foundation"
            shift = config.get("refinement")  # absent in models saved before it
            return seg.use_quick_model(classes, head.to(foundation.device), feats, candidate,
                                       refinement=PriorShift(shift) if shift else None)
        target = cfg.device or foundation.device
        net = FullNet.from_saved(foundation, config, parts["head"], parts["backbone"])
        net.to_device(target)
        anchor = None
        if "anchor_head" in parts:  # models saved before output ensembling have none
            anchor = FullNet.from_saved(foundation, config["anchor"], parts["anchor_head"],
                                        parts["anchor_backbone"]).to_device(target)
        else:
            seg.config.quick_weight = 0.0  # it predicts with the finetuned network alone
        return seg.commit(classes, net=net, anchor=anchor)
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"{folder}: the saved model is damaged or from an incompatible version "
            f"({type(err).__name__}: {err})"
        ) from None


def foundation_for(record: Mapping[str, Any], mode: str, device: str | None) -> Any:
    """The foundation a saved model names: the embedded default, the saved path, or (full
    mode, whose saved backbone replaces every weight) a new one of the saved shape."""
    from napari_lsmfm.model import Foundation, FoundationSpec, load_foundation

    source = record.get("source")
    if source == "default":
        return load_foundation(None, device=device or "auto")
    if source and source != "memory" and Path(source).exists():
        return load_foundation(source, device=device or "auto")
    if mode == "full":  # the saved backbone replaces every weight
        foundation = Foundation(FoundationSpec.from_dict(record["spec"]))
        return foundation.to_device(device or "auto")
    raise ValueError(
        f"this model's foundation ({source!r}) cannot be found; load the foundation it was "
        "trained on and pass it (--weights on the command line)"
    )
