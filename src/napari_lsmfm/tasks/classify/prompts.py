"""Zero-shot from words: class names or descriptions matched to image embeddings in the
image-text space of the loaded weights (``Foundation.embed_text``).

Label-mediated descriptions, as in the cytoarchitecture seed: a class name the user types
is expanded by the descriptions linked to the caption label it names
(:data:`~napari_lsmfm.pretrain.captions.SYNTHETIC_CAPTIONS`: "nucleus" -> the nuclei
captions), and the class's text embedding is the mean of its texts' embeddings. A prompt
"name: description" names its class and describes it; a plain prompt is both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["caption_label", "class_texts", "describe", "parse_prompts", "text_prototypes"]

_WORD = re.compile(r"[a-z]+")
# words that describe several structures, so they name none of them
_GENERIC = {"stain", "staining", "bright", "round", "blob", "blobs", "sparse", "cell", "cells",
            "structure", "object", "signal", "tube", "tubes", "deposit", "deposits", "nuclear"}


def _stems(text: str) -> set[str]:
    words = [w for w in _WORD.findall(text.lower()) if len(w) >= 4 and w not in _GENERIC]
    return {w[:5] for w in words}


def caption_label(name: str, captions: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """The caption label a class name names (its words share a stem with the label or its
    short description: "cell nucleus" -> "nuclei", "blood vessel" -> "vessels"), or None
    when no label, or more than one equally, matches."""
    if captions is None:
        from napari_lsmfm.pretrain.captions import SYNTHETIC_CAPTIONS as captions
    wanted = _stems(name)
    hits = {}
    for label, texts in captions.items():
        short = texts[-1] if texts else ""
        hits[label] = len(wanted & (_stems(label) | _stems(short)))
    best = max(hits.values(), default=0)
    winners = [k for k, v in hits.items() if v == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def parse_prompts(prompts: Sequence[str] | str) -> dict[str, str]:
    """{class name: description} from prompts ("a;b;c" or a list); "name: description"
    names the class. ValueError for an empty list or a class named twice."""
    if isinstance(prompts, str):
        prompts = prompts.split(";")
    out: dict[str, str] = {}
    for prompt in prompts:
        prompt = str(prompt).strip()
        if not prompt:
            continue
        name, _, text = prompt.partition(":")
        name, text = name.strip(), (text.strip() or name.strip())
        if name in out:
            raise ValueError(f"the class {name!r} is named by two prompts; give each class one")
        out[name] = text
    if not out:
        raise ValueError("no prompts: type class names or descriptions, separated by ';'")
    return out


def class_texts(name: str, description: str) -> list[str]:
    """The texts one class is embedded from: its description, then the captions linked to
    the label it names (none when it names no label)."""
    from napari_lsmfm.pretrain.captions import SYNTHETIC_CAPTIONS

    texts = [description]
    label = caption_label(f"{name} {description}")
    if label is not None:
        texts += [t for t in SYNTHETIC_CAPTIONS[label] if t not in texts]
    return texts


def text_prototypes(foundation: Any, prompts: Mapping[str, str], *,
                    captions: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
    """(C, P) float32 L2-normalised text embedding of every class of ``prompts`` (the mean
    of its texts; with ``captions`` {label: descriptions}, each class is embedded from its
    label's descriptions instead). ValueError, saying what to do, when the weights have no
    text tower."""
    if foundation.text_tower is None:
        raise ValueError(
            f"{foundation.text_unavailable_reason} Prompts need weights with a text tower "
            "(the embedded default has one; a published image+text checkpoint needs --vocab); "
            "or give examples instead of prompts"
        )
    rows = []
    for name, description in prompts.items():
        texts = list(captions[name]) if captions else class_texts(name, description)
        emb = foundation.embed_text(texts).float().cpu().numpy()
        mean = emb.mean(0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-8))
    return np.stack(rows).astype(np.float32)


def describe(foundation: Any, embeddings: np.ndarray,
             captions: Mapping[str, Sequence[str]] | None = None, *, top: int = 3
             ) -> list[list[tuple[str, float]]]:
    """Describe items in words (seed 4): for each image embedding (N, P), the ``top`` caption
    labels nearest in the image-text space as (label, cosine similarity), best first, or
    ``[("unknown", best)]`` when no label is nearer than the caption labels are to each
    other (their mean pairwise similarity: what "near" means in this tower's space).
    ``captions``: {label: descriptions}; default the synthetic corpus's."""
    if captions is None:
        from napari_lsmfm.pretrain.captions import SYNTHETIC_CAPTIONS as captions
    labels = list(captions)
    protos = text_prototypes(foundation, {k: k for k in labels}, captions=captions)
    if len(labels) > 1:
        pair = protos @ protos.T
        near = float(pair[~np.eye(len(labels), dtype=bool)].mean())
    else:
        near = -1.0
    emb = np.asarray(embeddings, np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    sims = emb @ protos.T
    out = []
    for row in sims:
        order = np.argsort(-row)[:top]
        if row[order[0]] <= near:
            out.append([("unknown", float(row[order[0]]))])
        else:
            out.append([(labels[i], float(row[i])) for i in order])
    return out
