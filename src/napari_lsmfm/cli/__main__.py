"""``python -m napari_lsmfm.cli ...`` (and ``torchrun ... -m napari_lsmfm.cli pretrain ...``)."""

from napari_lsmfm.cli import main

if __name__ == "__main__":  # not again in the worker processes dask.distributed spawns
    raise SystemExit(main())
