"""Shared fixtures. GUI tests use napari's `make_napari_viewer` on Xvfb (pytest-xvfb)."""

import os
import sys
from pathlib import Path

# the tests mirror src/ in subfolders; shared helpers (_checkpoints.py) live here
sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NAPARI_ASYNC", "0")
# No background load of the default model when a widget opens: tests that need a
# foundation build one (tests/widgets/test_preload.py turns it back on).
os.environ.setdefault("LSMFM_NO_PRELOAD", "1")
