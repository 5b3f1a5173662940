"""Classification of objects, points and tiles (no Qt): few-shot from examples, zero-shot
from words, and ``unknown`` for what matches no class.

>>> clf = Classifier(foundation, voxel_size=(2, 1, 1))
>>> clf.fit(image, Examples(points, ["nucleus", "plaque", ...]), objects=labels)
>>> result = clf.predict(image, objects=labels)     # one row per object, input order
>>> result.to_csv("classes.csv"); result.layers("nuclei")
>>> Classifier(foundation, prompts=("nucleus", "blood vessel")).fit(image)   # from words

The package: :mod:`.config` (settings), :mod:`.examples` (inputs and CSV), :mod:`.measures`
(shape and intensity), :mod:`.embed` (patches -> foundation features), :mod:`.probe`,
:mod:`.prompts`, :mod:`.openset`, :mod:`.result`, :mod:`.classifier`, :mod:`.saved`.
"""

from .classifier import Classifier
from .config import ClassifyConfig
from .examples import (
    Examples,
    Items,
    object_items,
    point_items,
    read_examples_csv,
    read_points_csv,
    tile_items,
)
from .result import UNKNOWN, ClassificationResult

__all__ = [
    "UNKNOWN",
    "ClassificationResult",
    "Classifier",
    "ClassifyConfig",
    "Examples",
    "Items",
    "object_items",
    "point_items",
    "read_examples_csv",
    "read_points_csv",
    "tile_items",
]
