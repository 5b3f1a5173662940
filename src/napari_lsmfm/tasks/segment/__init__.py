"""Few-shot segmentation from a few brushed slices (no Qt).

Brush convention (a napari Labels layer of the image's shape): 0 = not annotated,
1 = background, 2, 3, ... = structure classes. The prediction keeps each class's
value and turns background into 0, so colours match between brush and result.

Two modes, one :class:`Segmenter`:

- quick (default, CPU-friendly): the frozen foundation's dense features, plus the
  normalised intensity and a few classical filters (Gaussian, gradient magnitude,
  difference of Gaussians, Hessian eigenvalues; sigmas scaled by the voxel size so
  anisotropic axes are respected), are computed once per volume with the tiled
  engine and cached as float16 (:mod:`.features`). A per-voxel MLP is trained on the
  brushed voxels only (:mod:`.quick`), which takes seconds, so it can be retrained
  live as strokes come in. The filter scales follow the objects' size (estimated from
  the strokes, or ``object_diameter``), and the foundation sees large objects shrunk to
  its pretraining size (:mod:`.scale`). A fit validates three candidates on held-out
  strokes (MLP on foundation + filters, MLP on filters alone, random forest on filters)
  and uses the best (:mod:`.candidates`; ``candidate`` forces one).
- full: starts where quick mode ends and finetunes a copy of the backbone on patches
  around the strokes (:mod:`.full`); predictions mix it with the quick model.

Prediction runs over the whole volume window by window (:mod:`napari_lsmfm.engine.tiled`),
reading a dask / zarr input a block at a time and writing numpy or zarr outputs, so a
volume larger than memory works. Outputs (:mod:`.result`): class map (uint8 / uint16 /
uint32, whichever keeps every brush value), per-class probabilities (float32 / float16 /
uint8 scaled to 255), an uncertainty map (normalised entropy in [0, 1]: where another
stroke would help most) and, on request, instance labels for blob-like classes.

The package: :mod:`.labels` (brush strokes), :mod:`.config` (settings),
:mod:`.features`, :mod:`.scale`, :mod:`.quick`, :mod:`.candidates`, :mod:`.full`,
:mod:`.result`, :mod:`.segmenter`
(the class), :mod:`.saved` (on disk), :mod:`.api` (``segment()``).
"""

from typing import Any

from napari_lsmfm.io.check import check_volume

from .api import segment
from .config import SegmentConfig
from .labels import SparseLabels
from .result import SegmentationResult, normalized_entropy
from .segmenter import Segmenter

__all__ = [
    "SegmentConfig",
    "SegmentationResult",
    "Segmenter",
    "SparseLabels",
    "check_image",
    "normalized_entropy",
    "segment",
]


def check_image(image: Any) -> tuple[int, int, int]:
    """Raise ValueError unless ``image`` is one channel of a (Z, Y, X) volume; returns its
    shape (:func:`napari_lsmfm.io.check.check_volume` for segmentation)."""
    return check_volume(image, "segmentation")
