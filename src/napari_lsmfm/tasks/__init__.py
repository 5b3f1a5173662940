"""Tasks on top of the foundation model (no Qt): finetune heads, predict, save.

>>> seg = Segmenter(foundation)                  # few-shot segmentation, quick mode
>>> seg.fit(image, brushes)                      # 0 = none, 1 = background, 2, 3, ... = classes
>>> result = seg.predict(image)                  # classes, probabilities, uncertainty
"""

from napari_lsmfm.engine.store import load_task_model, save_task_model

from .instances import split_instances
from .segment import (
    SegmentationResult,
    SegmentConfig,
    Segmenter,
    SparseLabels,
    check_image,
    segment,
)

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
