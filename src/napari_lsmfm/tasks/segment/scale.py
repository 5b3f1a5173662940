"""Object scale: how large the brushed objects are, and what that sets.

Objects come at any size, the foundation saw one range of sizes in pretraining and the
classical filters see only as far as their largest sigma. The quick mode therefore

- estimates the objects' diameter from the strokes (:func:`stroke_diameter`: twice the
  largest distance to the stroke's edge, per connected foreground stroke, in the plane
  it was painted in; the median over strokes), unless the user gives
  ``object_diameter`` in micrometres (as Cellpose does);
- chooses the filter sigmas from it (:func:`sigmas_for`: 1, 2, 4, ... up to about a
  third of the diameter, at least up to 4);
- runs the foundation at the scale it was pretrained on (:func:`zoom_for`): the window
  is resampled so objects are :data:`FOUNDATION_DIAMETER` voxels across, and its
  features are resampled back. Zoom factors are powers of sqrt(2) and 1 (no resampling)
  within a factor sqrt(2) of the training size, so a few more strokes rarely change
  them (and the cached features stay valid).

Everything here is in voxels of the finest (lateral) axis unless it says micrometres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["FOUNDATION_DIAMETER", "ObjectScale", "object_scale", "sigmas_for",
           "stroke_diameter", "zoom_for"]

# The nuclei of the synthetic pretraining corpus (napari_lsmfm.synth: radius 3.5-8 um,
# typically 5 um; pretrain.SyntheticCorpus: lateral voxels 0.6-2 um, typically 1.2 um)
# are about this many lateral voxels across.
FOUNDATION_DIAMETER = 8.0
# Sigmas never below this top scale: the defaults the quick mode always had.
MIN_TOP_SIGMA = 4.0
MAX_TOP_SIGMA = 32.0


class ObjectScale(dict):
    """What the scale set: ``diameter`` (voxels along the finest axis), ``diameter_um``,
    ``source`` ("strokes", "config" or "default"), ``sigmas``, ``zoom``."""


def stroke_diameter(coords: np.ndarray, values: np.ndarray, shape: Sequence[int],
                    spacing: Sequence[float] | None = None) -> float | None:
    """Typical width of the foreground (value >= 2) strokes, in voxels of the finest axis.

    Each connected foreground stroke is measured in the plane it was painted in (the
    axis of its smallest extent, when that extent is one voxel; otherwise in 3D): twice
    its largest distance to the unpainted, less one voxel; the median over strokes, times
    4 / pi (planes cut objects off their centre) plus 2 (strokes keep off the edge).
    Brush strokes that fill an object's section measure the object; thin lines measure
    the brush (give ``object_diameter`` then). None when nothing is painted as foreground.
    """
    fg = coords[np.asarray(values) >= 2]
    if len(fg) == 0:
        return None
    rel = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), float)
    rel = rel / rel.min()
    lo = fg.min(0)
    box = fg.max(0) - lo + 3
    mask = np.zeros(tuple(int(b) for b in box), bool)
    mask[tuple((fg - lo + 1).T)] = True
    labels, n = ndi.label(mask)
    widths = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        sub = np.pad(labels[sl] == i, 1)
        extent = [s.stop - s.start for s in sl]
        axis = int(np.argmin(extent))
        if extent[axis] == 1:
            plane = np.take(sub, 1, axis=axis)
            sampling = [r for k, r in enumerate(rel) if k != axis]
            dist = ndi.distance_transform_edt(plane, sampling=sampling)
        else:
            dist = ndi.distance_transform_edt(sub, sampling=rel)
        # the distance reaches the first unpainted voxel: a filled run of w voxels has
        # its largest distance (w + 1) / 2
        widths.append(2.0 * float(dist.max()) - 1.0)
    if not widths:
        return None
    # a brushed plane cuts a ball off its centre (the mean chord of a ball's random planar
    # sections is pi / 4 of its diameter) and strokes keep about a voxel off the edge
    return float(np.median(widths)) * 4.0 / math.pi + 2.0


def sigmas_for(diameter: float) -> tuple[float, ...]:
    """Filter sigmas for objects ``diameter`` voxels across: 1, 2, 4, ... up to the power
    of two nearest a third of the diameter (at least 4, at most 32)."""
    top = min(max(diameter / 3.0, MIN_TOP_SIGMA), MAX_TOP_SIGMA)
    n = int(round(math.log2(top)))
    return tuple(float(2**k) for k in range(n + 1))


def zoom_for(diameter: float) -> float:
    """The factor that brings objects ``diameter`` voxels across to the foundation's
    training size: a power of sqrt(2), or 1 within a factor sqrt(2) of it."""
    steps = round(2.0 * math.log2(FOUNDATION_DIAMETER / diameter))
    # shrink only (1/8 .. 1): the pretraining saw thin vessels and small nuclei too, and
    # enlarging would cost memory and time as the cube of the factor
    steps = max(-6, min(0, steps))
    return 1.0 if abs(steps) <= 1 else float(2.0 ** (steps / 2.0))


def object_scale(config, coords: np.ndarray, values: np.ndarray,
                 shape: Sequence[int]) -> ObjectScale:
    """The scale of these strokes under ``config`` (``object_diameter`` in micrometres,
    ``sigmas`` None = from the scale, ``rescale``; ``voxel_size`` to convert)."""
    spacing = tuple(config.voxel_size) if config.voxel_size else (1.0, 1.0, 1.0)
    finest = float(min(spacing))
    if config.object_diameter is not None:
        diameter, source = float(config.object_diameter) / finest, "config"
    else:
        measured = stroke_diameter(coords, values, shape, spacing)
        diameter, source = ((measured, "strokes") if measured is not None
                            else (FOUNDATION_DIAMETER, "default"))
    diameter = max(diameter, 1.0)
    sigmas = tuple(config.sigmas) if config.sigmas is not None else sigmas_for(diameter)
    zoom = zoom_for(diameter) if config.rescale else 1.0
    return ObjectScale(diameter=round(diameter, 2), diameter_um=round(diameter * finest, 2),
                       source=source, sigmas=list(sigmas), zoom=zoom)
