"""Deblurring (no Qt): the foundation backbone plus a restoration head, and Richardson-Lucy.

The network (:class:`DeblurNet`, :mod:`.net`) is a copy of the foundation's backbone
whose dense features, together with the normalised intensity, feed a light conv head
predicting a residual: ``output = clamp(input + residual, 0, 1)``, as the published
model does. The whole network is trained (finetuned end to end) by
:meth:`Deblurrer.fit` (:mod:`.deblurrer`, on :mod:`napari_lsmfm.engine.train`'s loop):

- ``fit()``: on synthetic pairs (:mod:`.pairs`). Sharp structures (nuclei, vessels,
  plaques at random voxel sizes, with light-sheet shadows and uneven illumination) are
  imaged through Gaussian PSFs with axial sigma 1.5-4x the lateral one, at 30-3000
  photons, with Poisson and read noise (:mod:`napari_lsmfm.synth`'s optics); the
  target is the same acquisition without blur and noise. Loss (:mod:`.losses`): L1 +
  0.2 (1 - SSIM) + 0.1 edge + 0.1 high-pass (the published recipe) + 10 MSE (see
  :class:`DeblurConfig`).
- ``fit(image, psf_sigma)``: on the user's own volume, without a sharp ground truth:
  the volume is blurred further with a known PSF and noised to its own noise level, and
  the network learns to undo that step; for anisotropic stacks, lateral lines (sharper)
  are also turned into axial ones to teach axial restoration.

Intensities (:mod:`.intensity`): the 1st percentile of the volume maps to 0 and
``HEADROOM`` x the 99.99th (relative to the 1st) to 1, through the foundation's
normalisation with this wider range. The output is mapped back to the input's units
and dtype (uint16 in, uint16 out, clipped to the dtype's range).

Prediction runs window by window through the shared tiled engine with Gaussian
blending (no seams), reading dask / zarr inputs a block at a time and writing numpy or
zarr outputs, so a volume larger than memory works. :mod:`.api` holds the one-call
functions and :mod:`.rl` Richardson-Lucy.

>>> model = Deblurrer.load(DEFAULT_DEBLUR_DIR)        # or deblur(image) for the default
>>> sharp = model.predict(image).data                 # same shape and dtype
>>> rl = deblur(image, method="rl", psf_sigma=(3, 1, 1), iterations=10)
"""

from .api import (
    DEFAULT_DEBLUR_DIR,
    METHODS,
    RL_TILE,
    deblur,
    deblur_volume,
    load_default_deblur,
    train_default_deblur,
)
from .config import DEBLUR_SPEC, DeblurConfig
from .deblurrer import Deblurrer
from .intensity import (
    HEADROOM,
    INTENSITY_PERCENTILES,
    MAX_ABS_VALUE,
    check_deblur_input,
    deblur_range,
)
from .losses import DeblurLoss, deblur_loss, ssim3d
from .net import DeblurNet, pixel_shuffle3d, pixel_unshuffle3d, psf_code
from .pairs import TRAIN_SEED_BASE, SynthPair, synthetic_pair
from .result import DeblurResult, contrast_limits
from .rl import check_psf, gaussian_psf, psf_sigma_voxels, read_psf, richardson_lucy

__all__ = [
    "DEBLUR_SPEC",
    "DEFAULT_DEBLUR_DIR",
    "HEADROOM",
    "INTENSITY_PERCENTILES",
    "MAX_ABS_VALUE",
    "METHODS",
    "RL_TILE",
    "TRAIN_SEED_BASE",
    "DeblurConfig",
    "DeblurLoss",
    "DeblurNet",
    "DeblurResult",
    "Deblurrer",
    "SynthPair",
    "check_deblur_input",
    "check_psf",
    "contrast_limits",
    "deblur",
    "deblur_loss",
    "deblur_range",
    "deblur_volume",
    "gaussian_psf",
    "load_default_deblur",
    "pixel_shuffle3d",
    "pixel_unshuffle3d",
    "psf_code",
    "psf_sigma_voxels",
    "read_psf",
    "richardson_lucy",
    "ssim3d",
    "synthetic_pair",
    "train_default_deblur",
]
