"""``segment()``: train on brushes and segment the whole volume in one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from napari_lsmfm.engine.jobs import span

from .config import SegmentConfig
from .result import SegmentationResult
from .segmenter import Segmenter

__all__ = ["segment"]


def segment(
    image: Any,
    brushes: Any,
    *,
    foundation: Any = None,
    mode: str = "quick",
    ctx: Any = None,
    probabilities: bool | str = True,
    instances: bool | Sequence[int] = False,
    config: SegmentConfig | None = None,
    **overrides: Any,
) -> SegmentationResult:
    """Train on ``brushes`` and segment the whole ``image`` in one call.

    ``foundation`` None loads the embedded default (CheckpointError when none is
    installed). Other settings: see :class:`SegmentConfig`. The fit's report is in
    ``result.stats["fit"]``, the fitted model in ``result.stats["segmenter"]``.
    """
    if foundation is None:
        from napari_lsmfm.model import load_foundation

        foundation = load_foundation(None)
    if config is None:
        config = SegmentConfig(mode=mode, **overrides)
    elif overrides or mode != config.mode:
        config = SegmentConfig.from_dict({**config.to_dict(), "mode": mode, **overrides})
    seg = Segmenter(foundation, config)
    fit = seg.fit(image, brushes, span(ctx, 0.0, 0.5))
    result = seg.predict(image, span(ctx, 0.5, 1.0), probabilities=probabilities,
                         instances=instances)
    result.stats.update(fit=fit, segmenter=seg)
    return result
