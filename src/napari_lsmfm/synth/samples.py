"""Write and read the small synthetic volumes shipped in ``sample_data/``.

``write_samples(outdir)`` with its defaults regenerates the shipped files exactly
(``lsmfm sample sample_data --overwrite``); ``load_sample(kind)`` reads them back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

# The shipped files: make_volume(kind, SAMPLE_SHAPE, SAMPLE_VOXEL_SIZE, seed=SAMPLE_SEED).
SAMPLE_SHAPE = (48, 128, 128)
SAMPLE_VOXEL_SIZE = (2.0, 1.0, 1.0)
SAMPLE_SEED = 0
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
PARAMS_FILE = "samples.json"


def sample_paths(outdir: str | Path, kind: str) -> tuple[Path, Path]:
    """The image and labels OME-TIFF paths of one kind in ``outdir``."""
    outdir = Path(outdir)
    return outdir / f"{kind}.tif", outdir / f"{kind}_labels.tif"


def write_samples(
    outdir: str | Path,
    shape: Sequence[int] = SAMPLE_SHAPE,
    seed: int = SAMPLE_SEED,
    overwrite: bool = False,
    voxel_size: Sequence[float] = SAMPLE_VOXEL_SIZE,
) -> list[Path]:
    """Write ``<kind>.tif`` and ``<kind>_labels.tif`` (OME-TIFF, zlib) for every kind.

    Also writes ``samples.json`` with every generation parameter. With the defaults
    this reproduces the files shipped in the package's ``sample_data/``.

    Args:
        outdir: folder to write into (created if missing).
        shape: (Z, Y, X) in voxels.
        seed: the same seed is used for every kind.
        overwrite: replace existing files; otherwise an existing file is an error.
        voxel_size: (z, y, x) in micrometres.

    Returns:
        The written paths, image then labels per kind, then ``samples.json``.

    Raises:
        FileExistsError: a target file exists and ``overwrite`` is False (nothing written).
    """
    from . import KINDS, make_volume  # the package imports this module

    outdir = Path(outdir)
    targets = [p for kind in KINDS for p in sample_paths(outdir, kind)] + [outdir / PARAMS_FILE]
    if not overwrite:
        for path in targets:
            if path.exists():
                raise FileExistsError(  # `lsmfm sample` is the one caller outside Python
                    f"{path} already exists; choose another folder, or replace the files "
                    "(lsmfm sample --overwrite)"
                )
    outdir.mkdir(parents=True, exist_ok=True)
    record = {}
    for kind in KINDS:
        vol = make_volume(kind, shape=shape, voxel_size=voxel_size, seed=seed)
        image_path, labels_path = sample_paths(outdir, kind)
        _write_ome(image_path, vol.image, vol.voxel_size, kind)
        _write_ome(labels_path, vol.labels, vol.voxel_size, f"{kind} ground truth")
        record[kind] = {"label_kind": vol.label_kind, **vol.params}
    lines = [f"  {json.dumps(kind)}: {json.dumps(params)}" for kind, params in record.items()]
    (outdir / PARAMS_FILE).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return targets


def _write_ome(path: Path, data: np.ndarray, voxel_size: Sequence[float], name: str) -> None:
    z, y, x = (float(v) for v in voxel_size)
    tifffile.imwrite(
        path,
        data,
        ome=True,
        photometric="minisblack",
        compression="zlib",
        compressionargs={"level": 9},
        predictor=True,
        metadata={
            "axes": "ZYX",
            "Name": name,
            "PhysicalSizeZ": z,
            "PhysicalSizeY": y,
            "PhysicalSizeX": x,
            "PhysicalSizeZUnit": "µm",
            "PhysicalSizeYUnit": "µm",
            "PhysicalSizeXUnit": "µm",
        },
    )


def read_voxel_size(path: str | Path) -> tuple[float, float, float]:
    """(z, y, x) voxel size in micrometres from an OME-TIFF's metadata (1.0 where absent)."""
    with tifffile.TiffFile(path) as tif:
        ome = tif.ome_metadata
    if not ome:
        return (1.0, 1.0, 1.0)
    image = tifffile.xml2dict(ome)["OME"]["Image"]
    pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
    return tuple(float(pixels.get(f"PhysicalSize{a}", 1.0)) for a in "ZYX")


def load_sample(
    kind: str, sample_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read one shipped sample volume.

    Args:
        kind: "nuclei", "vessels" or "plaques".
        sample_dir: folder to read from; by default the package's ``sample_data/``.

    Returns:
        image (Z, Y, X) uint16, labels (Z, Y, X) uint16, voxel size (z, y, x) in um.
    """
    from . import KINDS

    if kind not in KINDS:
        raise ValueError(f"unknown sample {kind!r}: choose one of {', '.join(KINDS)}")
    image_path, labels_path = sample_paths(SAMPLE_DIR if sample_dir is None else sample_dir, kind)
    if not image_path.exists() or not labels_path.exists():
        raise FileNotFoundError(
            f"sample files for {kind!r} are missing from {image_path.parent}; "
            "regenerate them with `lsmfm sample <folder>` or reinstall napari-lsmfm"
        )
    image = tifffile.imread(image_path)
    labels = tifffile.imread(labels_path)
    return image, labels, read_voxel_size(image_path)
