"""Subject-level augmentation of healthy scans: the physics by which people differ, not pathology.

Healthy people differ in diffusivity and in anisotropy (axon density,
dispersion) by several per cent; a model trained on a handful of controls
sees only a few such draws and scores the rest as novel. Copies of every
control with these shifts teach it the range. Both act on the b0-normalised
signal E = S/S0 of every voxel, per shell:

* diffusivity, ``E -> E^s``: with E = exp(-b D(g)) in every compartment and
  direction, every diffusivity is scaled by s;
* anisotropy, ``log E -> m + t (log E - m)`` with m the mean of log E over the
  shell's directions: the directional contrast of the apparent diffusivity
  -log(E)/b is scaled by t around its mean, which stays.

Lesions change diffusivity by tens of per cent and anisotropy far more, so
copies within a few per cent of the original stay healthy.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from dipy.core.gradients import GradientTable

from anomri.dmri.preprocess import NormalizedDWI
from anomri.dmri.shells import detect_shells

logger = logging.getLogger(__name__)

__all__ = ["scale_anisotropy", "scale_diffusivity", "SCALE_RANGE"]

#: The subject-level shifts an augmentation may apply (a factor outside it is not a shift between healthy people).
SCALE_RANGE = (0.5, 2.0)
#: Floor of E before its logarithm (noise can make a high-b signal 0).
_MIN_SIGNAL = 1e-3


def _check(scale: float, what: str) -> None:
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        raise ValueError(f"{what} scale must lie in {list(SCALE_RANGE)} (a subject-level shift); got {scale}")


def scale_diffusivity(norm: NormalizedDWI, scale: float) -> NormalizedDWI:
    """Every diffusivity of the scan times ``scale``: E -> E^scale in every brain voxel and volume."""
    _check(scale, "diffusivity")
    signal = np.where(norm.mask[..., None], norm.signal ** np.float32(scale), 0.0).astype(np.float32)
    logger.info("diffusivity augmentation: every diffusivity x %.3g", scale)
    return dataclasses.replace(norm, signal=signal)


def scale_anisotropy(norm: NormalizedDWI, gtab: GradientTable, scale: float) -> NormalizedDWI:
    """The directional contrast of log E on every shell times ``scale``, around its mean over the shell."""
    _check(scale, "anisotropy")
    signal = norm.signal.astype(np.float32, copy=True)
    voxels = signal.reshape(-1, signal.shape[-1])  # a view: writing it writes ``signal``
    rows = np.flatnonzero(norm.mask)
    for shell in detect_shells(gtab.bvals, gtab.b0_threshold):
        block = np.ix_(rows, shell.indices)
        log_e = np.log(np.maximum(voxels[block], _MIN_SIGNAL))
        mean = log_e.mean(axis=1, keepdims=True)
        voxels[block] = np.exp(mean + scale * (log_e - mean))
    logger.info("anisotropy augmentation: directional contrast x %.3g", scale)
    return dataclasses.replace(norm, signal=signal)
