"""napari sample data: the shipped synthetic light-sheet volumes with ground truth.

Each function returns napari LayerData tuples (image, then labels), read from the
package's ``sample_data/``. No napari or Qt import here. Opening a sample is often the
plugin's first command, so it starts the background warm-up of torch and MONAI
(:func:`napari_lsmfm.engine.libs.warm_up`).
"""

from __future__ import annotations

from .engine.libs import warm_up
from .synth.samples import SAMPLE_DIR, load_sample

_DESCRIPTION = {
    "nuclei": "nuclei, instance labels (one id per nucleus, some touching)",
    "vessels": "branching vessel tree, semantic labels (1 = vessel)",
    "plaques": "dense-core amyloid-like plaques, instance labels; faint speckles unlabelled",
}


def _layers(kind: str) -> list[tuple]:
    warm_up()
    image, labels, voxel_size = load_sample(kind)
    metadata = {
        "source": "napari-lsmfm synthetic light-sheet sample",
        "kind": kind,
        "description": _DESCRIPTION[kind],
        "voxel_size_um": voxel_size,
        "file": str(SAMPLE_DIR / f"{kind}.tif"),
    }
    return [
        (image, {"name": kind, "scale": voxel_size, "metadata": metadata}, "image"),
        (labels, {"name": f"{kind} ground truth", "scale": voxel_size}, "labels"),
    ]


def nuclei() -> list[tuple]:
    """Synthetic light-sheet nuclei (uint16, ZYX) and their instance labels."""
    return _layers("nuclei")


def vessels() -> list[tuple]:
    """Synthetic light-sheet vessel tree (uint16, ZYX) and its semantic labels."""
    return _layers("vessels")


def plaques() -> list[tuple]:
    """Synthetic light-sheet amyloid-like plaques (uint16, ZYX) and their instance labels."""
    return _layers("plaques")
