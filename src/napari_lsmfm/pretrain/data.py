"""Where pretraining patches come from: a folder of volumes, or the synthetic generator.

Both sources draw one random 3D patch at a time from a ``numpy.random.Generator``:

- :class:`PatchDataset` opens every TIFF / Zarr volume under a folder lazily and reads
  only the patch region; each volume's 1st-99th percentile range (per channel) is
  estimated once from a strided subsample, so patches are normalised exactly as the
  Foundation normalises a whole volume.
- :class:`SyntheticCorpus` renders light-sheet volumes on the fly (structure kinds,
  densities, PSFs, photon levels, voxel sizes) and labels each with its kind, so the
  default model can be rebuilt with no data files.

:class:`BatchStream` turns a source into the batch of each training step. Every item is
drawn from ``default_rng([seed, rank, step, i])``: a run is reproducible, ranks see
different data, and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from napari_lsmfm.model.foundation import normalize_intensity, percentile_range

from .captions import CaptionTable, load_captions
from .config import as_patch_size

SYNTHETIC_PREFIX = "synthetic://"
_TIFF = (".tif", ".tiff")


@dataclass
class Patch:
    """One training patch.

    image: (C, D, H, W) float32, normalised to [0, 1] per channel.
    labels: one caption label per channel, or None where the volume has no caption.
    source: where it came from (relative path or synthetic volume name), for logs.
    mask: (D, H, W) float32 structure mask (1 = structure, 0 = background) where the
        source knows it (the synthetic corpus), else None; trains the "structure" objective.
    """

    image: np.ndarray
    labels: list[str | None]
    source: str
    mask: np.ndarray | None = None


class PatchSource(Protocol):
    """What :class:`BatchStream` needs from a source of patches."""

    captions: CaptionTable
    patch_size: tuple[int, int, int]

    @property
    def has_captions(self) -> bool: ...

    @property
    def has_masks(self) -> bool: ...

    def sample(self, rng: np.random.Generator) -> Patch: ...

    def describe(self) -> dict: ...


def _corner(rng: np.random.Generator, size: int, patch: int) -> int:
    return int(rng.integers(0, size - patch + 1)) if size > patch else 0


def _pad_to(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Zero-pad the last three axes at the far end up to ``size`` (volumes smaller than a
    patch; zero is the normalised background)."""
    grow = [(0, max(0, s - a)) for a, s in zip(array.shape[-3:], size, strict=True)]
    pads = [(0, 0)] * (array.ndim - 3) + grow
    return np.pad(array, pads) if any(p for _, p in pads) else array


def _flip_lateral(image: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None):
    """Random flips of Y and X only: the axial (Z) PSF and the light-sheet stripes are not
    symmetric. With ``mask``, it gets the same flips and ``(image, mask)`` is returned."""
    for axis in (-2, -1):
        if rng.random() < 0.5:
            image = np.flip(image, axis)
            if mask is not None:
                mask = np.flip(mask, axis)
    if mask is None:
        return np.ascontiguousarray(image)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# --------------------------------------------------------------------------- files


def find_volumes(root: str | os.PathLike) -> list[Path]:
    """TIFF files and Zarr folders under ``root`` (or ``root`` itself when it is one), sorted.
    Zarr folders are not searched inside."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(2, "the pretraining data folder does not exist", str(root))
    if _is_volume(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if _is_volume(here / d):
                found.append(here / d)
            elif not d.startswith("."):
                keep.append(d)
        dirnames[:] = keep
        found += [here / f for f in sorted(filenames) if f.lower().endswith(_TIFF)]
    return sorted(found)


def _is_volume(path: Path) -> bool:
    if path.is_file():
        return path.name.lower().endswith(_TIFF)
    return path.is_dir() and (
        path.name.lower().endswith(".zarr")
        or any((path / f).exists() for f in (".zarray", ".zgroup", "zarr.json"))
    )


@dataclass
class _Entry:
    path: Path
    relative: str
    shape: tuple[int, int, int]
    channels: int
    ranges: list[tuple[float, float]]
    labels: list[str | None]


class PatchDataset:
    """Random patches from a folder of unlabelled volumes (TIFF / OME-TIFF / Zarr / OME-Zarr).

    Args:
        root: a folder (searched recursively) or a single volume.
        patch_size: (D, H, W) or an int, in voxels; smaller volumes are zero-padded.
        captions: a :class:`CaptionTable`, a path to a captions JSON, or None (no text).
        percentile_samples: voxels read per volume (strided) to estimate its 1-99 % range.

    Volumes are opened lazily (dask) and only a patch's region is read per sample.
    Raises FileNotFoundError for a missing folder and ValueError when it holds no volume.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        patch_size: int | Sequence[int] = 64,
        captions: CaptionTable | str | os.PathLike | None = None,
        *,
        percentile_samples: int = 1 << 20,
    ) -> None:
        from napari_lsmfm.io import open_volume

        self.root = Path(root).expanduser()
        self.patch_size = as_patch_size(patch_size)
        if captions is None:
            captions = CaptionTable()
        elif not isinstance(captions, CaptionTable):
            captions = load_captions(captions)
        self.captions = captions
        paths = find_volumes(self.root)
        if not paths:
            raise ValueError(
                f"no volumes found under {self.root}: pretraining reads TIFF stacks (.tif, .tiff) "
                "and Zarr / OME-Zarr folders (.zarr)"
            )
        self._volumes: dict[int, Any] = {}
        self.entries: list[_Entry] = []
        for path in paths:
            volume = open_volume(path)
            data = volume.data
            channels = 1 if volume.channel_axis is None else int(data.shape[0])
            stacks = [data] if volume.channel_axis is None else [data[c] for c in range(channels)]
            ranges = [percentile_range(s, max_samples=percentile_samples) for s in stacks]
            rel = path.name if path == self.root else path.relative_to(self.root).as_posix()
            names = volume.metadata.get("channel_names") or []
            labels = []
            for c in range(channels):
                name = names[c] if c < len(names) else None
                label = self.captions.sources.get(name) if name else None
                labels.append(label or self.captions.label_for(rel))
            self._volumes[len(self.entries)] = volume
            self.entries.append(
                _Entry(path, rel, tuple(int(s) for s in data.shape[-3:]), channels, ranges, labels)
            )

    def __getstate__(self) -> dict:
        # Worker processes reopen the files themselves: file handles do not pickle.
        state = dict(self.__dict__)
        state["_volumes"] = {}
        return state

    def _volume(self, index: int):
        if index not in self._volumes:
            from napari_lsmfm.io import open_volume

            self._volumes[index] = open_volume(self.entries[index].path)
        return self._volumes[index]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def has_captions(self) -> bool:
        """Whether any volume (or channel) has a caption label."""
        return any(label is not None for e in self.entries for label in e.labels)

    @property
    def has_masks(self) -> bool:
        """Unlabelled volumes: no structure masks."""
        return False

    def sample(self, rng: np.random.Generator) -> Patch:
        """A random patch of a random volume (volumes equally likely), randomly flipped in Y/X."""
        index = int(rng.integers(len(self.entries)))
        entry = self.entries[index]
        corner = [_corner(rng, s, p) for s, p in zip(entry.shape, self.patch_size, strict=True)]
        region = tuple(slice(c, c + p) for c, p in zip(corner, self.patch_size, strict=True))
        data = self._volume(index).data
        channels = []
        for c in range(entry.channels):
            raw = data[region] if entry.channels == 1 else data[(c, *region)]
            channels.append(normalize_intensity(np.asarray(raw), intensity_range=entry.ranges[c]))
        image = _pad_to(np.stack(channels), self.patch_size)
        return Patch(_flip_lateral(image, rng), list(entry.labels), entry.relative)

    def describe(self) -> dict:
        return {
            "kind": "folder",
            "root": str(self.root),
            "volumes": len(self.entries),
            "voxels": int(sum(math.prod(e.shape) * e.channels for e in self.entries)),
            "captioned": sum(any(label is not None for label in e.labels) for e in self.entries),
            "labels": self.captions.label_names,
        }


# --------------------------------------------------------------------------- synthetic


class SyntheticCorpus:
    """Synthetic light-sheet volumes rendered on demand, labelled by structure kind.

    Volume ``j`` (of ``n_volumes``) has kind ``kinds[j % len(kinds)]`` and its density, voxel
    size, PSF, photon count, noise, stripes, attenuation and illumination drawn from
    ``default_rng([seed, j])``; it is rendered once on first use and kept (uint16). A sample
    is a random patch of a random volume. Captions: each kind is a label linked to its
    description (:data:`~napari_lsmfm.pretrain.captions.SYNTHETIC_CAPTIONS`).

    Args:
        patch_size: (D, H, W) or an int, in voxels.
        n_volumes: distinct volumes in the corpus (memory: n * prod(volume_shape) * 2 bytes).
        kinds: structure kinds of :func:`napari_lsmfm.synth.make_volume`.
        volume_shape: (Z, Y, X) of each volume; default 1.5 x the patch, at least 48.
        seed: corpus seed (volumes are a function of it and their index only).
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 64,
        *,
        n_volumes: int = 192,
        kinds: Sequence[str] | None = None,
        volume_shape: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        from napari_lsmfm.synth import KINDS

        self.patch_size = as_patch_size(patch_size)
        self.kinds = tuple(kinds) if kinds is not None else tuple(KINDS)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown synthetic kinds {unknown}: choose from {', '.join(KINDS)}")
        if n_volumes < 1:
            raise ValueError(f"n_volumes must be at least 1, got {n_volumes}")
        self.n_volumes = int(n_volumes)
        if volume_shape is None:
            volume_shape = [max(48, p + p // 2) for p in self.patch_size]
        self.volume_shape = as_patch_size(volume_shape)
        self.seed = int(seed)
        self.captions = CaptionTable.synthetic(self.kinds)
        self._cache: dict[int, tuple[np.ndarray, tuple[float, float], np.ndarray]] = {}

    @property
    def has_captions(self) -> bool:
        return True

    @property
    def has_masks(self) -> bool:
        """The ground-truth structure of every volume is known (``make_volume``'s labels)."""
        return True

    def volume_params(self, j: int) -> dict:
        """The keyword arguments of ``make_volume`` for volume ``j`` (deterministic)."""
        rng = np.random.default_rng([self.seed, j])
        lateral_voxel = float(rng.uniform(0.6, 2.0))
        lateral_psf = float(rng.uniform(0.5, 2.0))
        return {
            "kind": self.kinds[j % len(self.kinds)],
            "shape": self.volume_shape,
            "voxel_size": (float(rng.uniform(1.0, 4.0)), lateral_voxel, lateral_voxel),
            "density": float(rng.uniform(0.4, 2.0)),
            "seed": int(rng.integers(2**31)),
            "psf_sigma_um": (lateral_psf * float(rng.uniform(2.0, 5.0)), lateral_psf, lateral_psf),
            "photons": float(math.exp(rng.uniform(math.log(80), math.log(5000)))),
            "read_noise": float(rng.uniform(1.0, 5.0)),
            "background": float(rng.uniform(5.0, 60.0)),
            "stripes": float(rng.uniform(0.0, 0.6)),
            "attenuation": float(rng.uniform(0.0, 0.5)),
            "illumination": float(rng.uniform(0.0, 0.6)),
        }

    def _volume(self, j: int) -> tuple[np.ndarray, tuple[float, float], np.ndarray]:
        if j not in self._cache:
            from napari_lsmfm.synth import make_volume

            volume = make_volume(**self.volume_params(j))
            image = volume.image
            self._cache[j] = (image, percentile_range(image), volume.labels > 0)
        return self._cache[j]

    def sample(self, rng: np.random.Generator) -> Patch:
        """A random patch of a random volume and its structure mask, randomly flipped in Y/X."""
        j = int(rng.integers(self.n_volumes))
        image, intensity_range, structure = self._volume(j)
        corner = [_corner(rng, s, p) for s, p in zip(image.shape, self.patch_size, strict=True)]
        region = tuple(slice(c, c + p) for c, p in zip(corner, self.patch_size, strict=True))
        patch = normalize_intensity(image[region], intensity_range=intensity_range)
        patch = _pad_to(patch[None], self.patch_size)
        mask = _pad_to(structure[region][None].astype(np.float32), self.patch_size)[0]
        kind = self.kinds[j % len(self.kinds)]
        patch, mask = _flip_lateral(patch, rng, mask)
        return Patch(patch, [kind], f"synthetic/{kind}/{j:04d}", mask)

    def describe(self) -> dict:
        return {
            "kind": "synthetic",
            "structures": list(self.kinds),
            "volumes": self.n_volumes,
            "volume_shape": list(self.volume_shape),
            "seed": self.seed,
            "labels": self.captions.label_names,
        }


def open_source(
    data: str | os.PathLike,
    patch_size: int | Sequence[int] = 64,
    captions: CaptionTable | str | os.PathLike | None = None,
    *,
    seed: int = 0,
    n_volumes: int | None = None,
) -> PatchDataset | SyntheticCorpus:
    """A folder or file of volumes, or ``"synthetic://"`` for the synthetic corpus.

    ``"synthetic://nuclei,vessels"`` restricts the kinds; ``n_volumes`` sizes the synthetic
    corpus. A captions file given with the synthetic corpus replaces its descriptions for
    the labels it names.
    """
    text = str(data)
    if text.startswith(SYNTHETIC_PREFIX):
        rest = text[len(SYNTHETIC_PREFIX):].strip("/")
        kinds = [k for k in rest.split(",") if k] or None
        corpus = SyntheticCorpus(
            patch_size, kinds=kinds, seed=seed, **({"n_volumes": n_volumes} if n_volumes else {})
        )
        if captions is not None:
            table = captions if isinstance(captions, CaptionTable) else load_captions(captions)
            labels = dict(corpus.captions.labels)
            labels.update({k: v for k, v in table.labels.items() if k in labels})
            corpus.captions = CaptionTable(labels, dict(corpus.captions.sources))
        return corpus
    return PatchDataset(data, patch_size, captions)


# --------------------------------------------------------------------------- batches


class BatchStream(torch.utils.data.Dataset):
    """The batch of each training step, for one rank: ``stream[step]``.

    An item is a dict: ``images`` a list of B float32 tensors (C_i, D, H, W); ``labels`` a
    list of per-channel label lists; ``texts`` the description drawn for each channel (None
    without caption); ``label_ids`` per channel (-1 without caption); ``sources``;
    ``masks`` one (D, H, W) float32 structure-mask tensor or None per patch.
    Items depend only on (seed, rank, step), so a ``DataLoader(stream, batch_size=None,
    sampler=range(start, stop), num_workers=n)`` gives the same batches for any n.
    """

    def __init__(
        self, source: PatchSource, batch_size: int, *, seed: int = 0, rank: int = 0, steps: int = 0
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.steps = int(steps)
        self._label_ids = {name: i for i, name in enumerate(source.captions.label_names)}

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict:
        images, labels, texts, ids, sources, masks = [], [], [], [], [], []
        for i in range(self.batch_size):
            rng = np.random.default_rng([self.seed, self.rank, int(step), i])
            patch = self.source.sample(rng)
            images.append(torch.from_numpy(patch.image))
            labels.append(patch.labels)
            for label in patch.labels:
                if label is None:
                    texts.append(None)
                    ids.append(-1)
                else:
                    options = self.source.captions.labels[label]
                    texts.append(options[int(rng.integers(len(options)))])
                    ids.append(self._label_ids[label])
            sources.append(patch.source)
            masks.append(None if patch.mask is None else torch.from_numpy(patch.mask))
        return {
            "images": images,
            "labels": labels,
            "texts": texts,
            "label_ids": torch.tensor(ids, dtype=torch.long),
            "sources": sources,
            "masks": masks,
        }
