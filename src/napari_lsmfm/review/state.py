"""The review state on disk: one JSON file (the decisions in order, their times, the
version, and the data, prediction and model fingerprints) plus one patch per decision
(``<state>.patches/NNNNNN.npz``: the changed box's labels before and after, and the
table rows touched). Every file is written atomically, the patch before the JSON that
names it, so a crash at any moment loses at most the decision being written. Reopening
is the original prediction plus the patches of the applied decisions, in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.engine.store import atomic_write
from napari_lsmfm.io.write import volume_stem

from .history import Change
from .objects import ReviewError, as_numpy, record_from_dict

__all__ = ["STATE_FORMAT", "StateFile", "default_state_path", "fingerprint"]

STATE_FORMAT = "napari-lsmfm-review"
STATE_VERSION = 1
_WHOLE_BYTES = 32 * 2**20  # arrays up to this size are hashed whole
_SAMPLE = (16, 64, 64)  # else 27 blocks of this size (3 per axis: start, middle, end)


def default_state_path(image_path: str | os.PathLike) -> Path:
    """``<stem>.lsmfm-review.json`` next to the data (``nuclei.ome.tif`` ->
    ``nuclei.lsmfm-review.json``; a ``.zarr`` folder -> beside the folder)."""
    path = Path(image_path).expanduser()
    return path.with_name(f"{volume_stem(path)}.lsmfm-review.json")


def fingerprint(*arrays: Any) -> str:
    """sha256 (16 hex digits) of the arrays' shapes, dtypes and contents: all of a small
    array, 27 sampled blocks (start, middle and end of each axis) of a large one, so a
    large lazy volume is not read whole. None entries are skipped."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            continue
        shape = tuple(int(s) for s in array.shape)
        dtype = np.dtype(array.dtype)
        digest.update(f"{shape}|{dtype.str}|".encode())
        if np.prod(shape) * dtype.itemsize <= _WHOLE_BYTES:
            digest.update(np.ascontiguousarray(as_numpy(array)).tobytes())
            continue
        for box in _sample_boxes(shape):
            digest.update(np.ascontiguousarray(as_numpy(array, box)).tobytes())
    return digest.hexdigest()[:16]


def _sample_boxes(shape: tuple[int, ...]):
    lead = len(shape) - 3
    spatial = shape[lead:]
    starts = []
    for n, s in zip(spatial, _SAMPLE, strict=True):
        s = min(s, n)
        starts.append(sorted({0, (n - s) // 2, n - s}))
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                corner = (z, y, x)
                yield (*(slice(None),) * lead,
                       *(slice(c, c + min(s, n)) for c, s, n in zip(corner, _SAMPLE, spatial,
                                                                    strict=True)))


def _write_json(path: Path, doc: dict) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")

    atomic_write(path, write)


def _rows(rows: dict) -> str:
    return json.dumps({str(k): (None if v is None else v.to_dict()) for k, v in rows.items()})


def _unrows(text: str) -> dict:
    return {int(k): (None if v is None else record_from_dict(v))
            for k, v in json.loads(text).items()}


class StateFile:
    """A review's state file (``path``, JSON) and its patch folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if self.path.suffix.lower() != ".json":
            raise ReviewError(f"the review state file must end in .json, got {self.path.name}")
        self.patches = self.path.with_suffix(".patches")

    def read(self) -> dict | None:
        """The saved document, or None when there is none; ReviewError when it is not a
        review state."""
        if not self.path.exists():
            return None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ReviewError(f"cannot read the review state {self.path}: {err}. Move it "
                              "aside to start a new review") from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ReviewError(f"{self.path} is not a review state file; move it aside or "
                              "choose another state path")
        return doc

    def check(self, doc: dict, data: str | None, prediction: str) -> None:
        """ReviewError unless ``doc`` was made for this data and this prediction."""
        if doc.get("prediction") != prediction:
            raise ReviewError(
                f"the review state {self.path.name} was made for another prediction (the "
                "labels differ from the ones reviewed). Open the prediction it belongs to, "
                "or move the state file aside to start a new review of these labels")
        if data and doc.get("data") and doc["data"] != data:
            raise ReviewError(
                f"the review state {self.path.name} was made for other data (the image "
                "changed since). Open the image it belongs to, or move the state file aside "
                "to start a new review")

    def write(self, *, data: str | None, prediction: str, model: str, shape, entries: list,
              applied: int, version: int) -> Path:
        """Write the JSON document atomically; returns its path."""
        doc = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "data": data,
               "prediction": prediction, "model": model, "shape": list(shape),
               "version": version, "applied": applied, "saved": time.time(),
               "decisions": entries}
        _write_json(self.path, doc)
        return self.path

    def patch_name(self, index: int) -> str:
        return f"{index:06d}.npz"

    def write_patch(self, index: int, change: Change) -> str:
        """Save ``change`` as patch ``index`` (atomically); returns its file name."""
        arrays: dict[str, Any] = {
            "rows_before": np.array(_rows(change.rows_before)),
            "rows_after": np.array(_rows(change.rows_after)),
        }
        if change.box is not None:
            arrays["box"] = np.array([[s.start, s.stop] for s in change.box], np.int64)
            arrays["before"], arrays["after"] = change.before, change.after
        if change.samples is not None:
            arrays["sample_coords"], arrays["sample_values"] = change.samples
        name = self.patch_name(index)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

        self.patches.mkdir(parents=True, exist_ok=True)
        atomic_write(self.patches / name, write)
        return name

    def read_patch(self, entry: dict) -> Change:
        """The change a saved decision ``entry`` names; ReviewError when its patch is
        missing or damaged."""
        path = self.patches / entry["patch"]
        try:
            with np.load(path, allow_pickle=False) as z:
                box = None
                if "box" in z:
                    box = tuple(slice(int(a), int(b)) for a, b in z["box"])
                samples = None
                if "sample_coords" in z:
                    samples = (z["sample_coords"], z["sample_values"])
                return Change(
                    op=entry["op"], ids=list(entry["ids"]), cls=entry.get("cls"), box=box,
                    before=z["before"] if box else None, after=z["after"] if box else None,
                    rows_before=_unrows(str(z["rows_before"])),
                    rows_after=_unrows(str(z["rows_after"])), samples=samples,
                    point=tuple(entry["point"]) if "point" in entry else None,
                    positive=entry.get("positive"), time=entry["time"],
                    version=entry["version"])
        except (OSError, KeyError, ValueError) as err:
            raise ReviewError(f"the review state {self.path.name} is damaged: patch {path} "
                              f"cannot be read ({err}); move the state aside to start "
                              "again") from None

    def remove_patches_from(self, index: int) -> None:
        """Remove the patches of decisions ``index``, ``index + 1``, ... (undone, then
        replaced by a new decision)."""
        if not self.patches.is_dir():
            return
        for path in self.patches.glob("*.npz"):
            if path.stem.isdigit() and int(path.stem) >= index:
                with contextlib.suppress(OSError):
                    path.unlink()
