"""Tasks on top of the foundation model (no Qt): finetune heads, predict, save.

>>> seg = Segmenter(foundation)                  # few-shot segmentation, quick mode
>>> seg.fit(image, brushes)                      # 0 = none, 1 = background, 2, 3, ... = classes
>>> result = seg.predict(image)                  # classes, probabilities, uncertainty
"""

import importlib
from typing import Any

# Imported on first use (PEP 562), so the command line's --help and the Qt widgets'
# construction do not pay for torch.
_EXPORTS = {
    "SegmentConfig": ".segment",
    "SegmentationResult": ".segment",
    "Segmenter": ".segment",
    "SparseLabels": ".segment",
    "check_image": ".segment",
    "segment": ".segment",
    "load_task_model": ".heads",
    "save_task_model": ".heads",
    "split_instances": ".instances",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SegmentConfig",
    "SegmentationResult",
    "Segmenter",
    "SparseLabels",
    "check_image",
    "load_task_model",
    "save_task_model",
    "segment",
    "split_instances",
]
