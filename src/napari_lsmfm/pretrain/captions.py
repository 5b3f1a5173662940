"""Captions through labels: each volume gets a label, each label is linked to descriptions.

The published model keys one long caption per stain by its data folder; here a captions
JSON may map a folder name, a file name (or stem, or path relative to the data folder), or
a label name to text. No paired image-text data are needed: a label name linked to a
description is enough, and CLIP treats volumes with the same label as positives.

Accepted JSON layouts::

    {"DAPI": "Nuclear stain ...", "vessels_lectin": ["Lectin ...", "blood vessels"]}

    {"labels": {"nuclei": "Nuclear stain ..."},
     "sources": {"DAPI": "nuclei", "brain2/TO-PRO-3.tif": "nuclei"}}

In the first, every key is both a label and a source key. A value may be a list of
alternative descriptions; one is drawn per sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

# Descriptions of the synthetic corpus's structures, in the published style (stain,
# structure, channel, organism, morphology); the second entry is a short form for prompts.
SYNTHETIC_CAPTIONS: dict[str, list[str]] = {
    "nuclei": [
        "Nuclear stain such as DAPI, TO-PRO-3 or propidium iodide imaged by light-sheet "
        "fluorescence microscopy in a cleared mouse brain, 405 to 640 nm channel: cell nuclei "
        "appear as dense round or ellipsoidal bright blobs about 6 to 12 micrometres across, "
        "tightly packed, with dark gaps between cells.",
        "cell nuclei, nuclear stain, round bright blobs",
    ],
    "vessels": [
        "Vascular stain such as lectin, CD31 or an intravascular dye imaged by light-sheet "
        "fluorescence microscopy in a cleared mouse brain, 488 to 647 nm channel: blood vessels "
        "appear as thin bright branching tubes and capillaries, 3 to 15 micrometres wide, "
        "forming a connected network.",
        "blood vessels, vascular stain, branching tubes",
    ],
    "plaques": [
        "Amyloid plaque stain such as Congo red, thioflavin S or methoxy-X04 imaged by light-sheet "
        "fluorescence microscopy in a cleared Alzheimer's disease model mouse brain, 405 to "
        "561 nm channel: amyloid plaques appear as sparse compact bright deposits 10 to 50 "
        "micrometres across, with a dense core and a diffuse halo.",
        "amyloid plaques, sparse bright deposits",
    ],
}

_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr")


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class CaptionTable:
    """Labels linked to descriptions, and which data sources carry which label.

    labels: label -> list of descriptions (at least one each).
    sources: folder name, file name, file stem or relative path -> label.
    """

    labels: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, texts in self.labels.items():
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"caption label {label!r} needs at least one non-empty text")
        for key, label in self.sources.items():
            if label not in self.labels:
                raise ValueError(
                    f"caption source {key!r} points to label {label!r}, which has no description; "
                    f"add it under \"labels\""
                )

    @property
    def label_names(self) -> list[str]:
        """Labels in a fixed (sorted) order; a label's index is its caption id."""
        return sorted(self.labels)

    def label_id(self, label: str) -> int:
        return self.label_names.index(label)

    def texts(self) -> list[str]:
        """Every description, for building the text tower's vocabulary."""
        return [t for name in self.label_names for t in self.labels[name]]

    def label_for(self, relative_path: str | os.PathLike) -> str | None:
        """The label of a volume at ``relative_path`` (relative to the data folder): the
        first match of its relative path, file name, file stem, then each enclosing folder
        from the nearest (as a relative path, then by name); None when nothing matches."""
        rel = PurePath(relative_path)
        candidates = [rel.as_posix(), rel.name, _stem(rel.name)]
        for parent in rel.parents:
            if parent.as_posix() in ("", "."):
                continue
            candidates += [parent.as_posix(), parent.name]
        for key in candidates:
            if key in self.sources:
                return self.sources[key]
        return None

    @classmethod
    def from_mapping(cls, data: Mapping) -> CaptionTable:
        """Build from either JSON layout (see the module docstring)."""
        if not isinstance(data, Mapping):
            raise ValueError("captions must be a JSON object mapping names to text")
        if "labels" in data and isinstance(data["labels"], Mapping):
            labels = {str(k): _texts(k, v) for k, v in data["labels"].items()}
            sources_raw = data.get("sources", {})
            if not isinstance(sources_raw, Mapping):
                raise ValueError('captions "sources" must map folder or file names to labels')
            sources = {str(k): str(v) for k, v in sources_raw.items()}
            for label in labels:  # a label name also matches a folder or file of that name
                sources.setdefault(label, label)
            return cls(labels, sources)
        labels = {str(k): _texts(k, v) for k, v in data.items()}
        return cls(labels, {k: k for k in labels})

    @classmethod
    def synthetic(cls, kinds: Sequence[str] | None = None) -> CaptionTable:
        """The captions of the synthetic corpus: label = structure kind."""
        kinds = list(kinds) if kinds is not None else list(SYNTHETIC_CAPTIONS)
        return cls({k: list(SYNTHETIC_CAPTIONS[k]) for k in kinds}, {k: k for k in kinds})


def _texts(key, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        f"caption {key!r} must be a text or a list of texts, got {type(value).__name__}"
    )


def load_captions(path: str | os.PathLike) -> CaptionTable:
    """Read a captions JSON file (either layout). Raises OSError when it cannot be read and
    ValueError when it is not valid JSON of the expected shape."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"captions file {path} is not valid JSON ({exc})") from None
    try:
        return CaptionTable.from_mapping(data)
    except ValueError as exc:
        raise ValueError(f"captions file {path}: {exc}") from None
