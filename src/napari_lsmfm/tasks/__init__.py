"""Tasks on top of the foundation model (no Qt), each made of the shared parts in
:mod:`napari_lsmfm.engine` with the one interface of :mod:`.base`.

>>> seg = Segmenter(foundation)                  # few-shot segmentation, quick mode
>>> seg.fit(image, brushes)                      # 0 = none, 1 = background, 2, 3, ... = classes
>>> result = seg.predict(image)                  # classes, probabilities, uncertainty
>>> viewer_layers = result.layers("nuclei")      # napari LayerData tuples
>>> sharp = Deblurrer.load(DEFAULT_DEBLUR_DIR).predict(image).data
>>> model = load_model("my_model")               # any saved task model (see .registry)
"""

from napari_lsmfm.engine.store import load_task_model, save_task_model

from .base import Task, TaskConfig, TaskResult
from .deblur import (
    DEFAULT_DEBLUR_DIR,
    DeblurConfig,
    Deblurrer,
    DeblurResult,
    check_deblur_input,
    deblur_volume,
    load_default_deblur,
)
from .instances import split_instances
from .registry import load_model, task_class
from .segment import (
    SegmentationResult,
    SegmentConfig,
    Segmenter,
    SparseLabels,
    check_image,
    segment,
)

__all__ = [
    "DEFAULT_DEBLUR_DIR",
    "DeblurConfig",
    "DeblurResult",
    "Deblurrer",
    "SegmentConfig",
    "SegmentationResult",
    "Segmenter",
    "SparseLabels",
    "Task",
    "TaskConfig",
    "TaskResult",
    "check_deblur_input",
    "check_image",
    "deblur_volume",
    "load_default_deblur",
    "load_model",
    "load_task_model",
    "save_task_model",
    "segment",
    "split_instances",
    "task_class",
]
