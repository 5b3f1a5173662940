"""Scale: saved task models over whole volumes larger than memory, block by block.

:func:`predict_volume` (the ``lsmfm predict`` command) cuts a volume into blocks of whole
window steps, skips empty ones, predicts the others with the whole volume's intensity
range into OME-Zarr outputs (here or on a dask.distributed cluster), records each
finished block so an interrupted run resumes, stitches instance labels across block
borders and writes a multiscale pyramid. No Qt; usable from a script.
"""

from .blocks import BlockPlan, Ledger
from .run import predict_volume

__all__ = ["BlockPlan", "Ledger", "predict_volume"]
