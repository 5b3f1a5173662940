"""Shared fixtures. GUI tests use napari's `make_napari_viewer` on Xvfb (pytest-xvfb)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NAPARI_ASYNC", "0")
