"""Expert review of predictions (no Qt): a queue of objects ranked by doubt, decisions
(accept, reject, relabel, merge, split, click corrections) with undo / redo within a
memory budget, a state saved after every decision and reopened with the same data,
corrections as training labels for a retrain, exports and scores.

>>> session = ReviewSession(instances, probabilities=probs, channel_values=(0, 2),
...                         state_path=ReviewSession.default_state_path("nuclei.tif"))
>>> for oid in session.queue()[:10]:            # least certain first
...     session.accept(oid)
>>> session.merge(3, 7); session.split(12, n=2); session.undo()
>>> session.retrain(segmenter, image, strokes)  # refit on strokes + corrections, re-rank
>>> session.export_labels("reviewed.ome.tif"); session.export_table("objects.csv")

The package: :mod:`.objects` (the table, block by block), :mod:`.edits` (split, clicks),
:mod:`.history` (undo / redo), :mod:`.state` (on disk), :mod:`.working` (the working
copy, input checks), :mod:`.training` (training labels, retrain, scores),
:mod:`.export`, :mod:`.clicks` (click corrector, simulated expert), :mod:`.session`.
"""

from .clicks import ClickCorrector, simulate_click
from .objects import ObjectRecord, ReviewError
from .session import ReviewSession

__all__ = ["ClickCorrector", "ObjectRecord", "ReviewError", "ReviewSession", "simulate_click"]
