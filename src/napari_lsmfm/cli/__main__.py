"""``python -m napari_lsmfm.cli ...`` (and ``torchrun ... -m napari_lsmfm.cli pretrain ...``)."""

from napari_lsmfm.cli import main

raise SystemExit(main())
