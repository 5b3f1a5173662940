"""Tiled prediction over volumes larger than memory (shared by every dense task).

>>> probs = predict_tiled(fn, volume, out_channels=3, tile=(64, 128, 128), overlap=0.25)
"""

from .tiled import (
    DeviceMemoryError,
    TileGrid,
    gaussian_weights,
    predict_points,
    predict_tiled,
)

__all__ = ["DeviceMemoryError", "TileGrid", "gaussian_weights", "predict_points", "predict_tiled"]
