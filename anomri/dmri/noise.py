"""Noise level of a diffusion scan, and noisier copies of healthy scans.

The noise level is the quantity that shifts a healthy subject's novelty
scores the most: SH powers of order l > 0 carry noise power that grows as
(sigma / S0)^2, so a subject scanned at SNR 15 looks unlike controls scanned
at SNR 30 everywhere. Training on copies of the controls with extra noise
(magnitude of the signal plus complex Gaussian noise, the physics of a real
magnitude image) teaches the model what healthy tissue looks like across the
noise levels a cohort spans.
"""

from __future__ import annotations

import logging

import numpy as np
from dipy.core.gradients import GradientTable
from scipy import stats

logger = logging.getLogger(__name__)


#: PIESNO needs this many background voxels outside the brain (a tight crop of the head has none).
MIN_BACKGROUND_VOXELS = 1000


def estimate_sigma(data: np.ndarray, gtab: GradientTable, mask: np.ndarray) -> float:
    """Noise standard deviation of the magnitude images.

    dipy's PIESNO (Koay et al. 2009) finds the background voxels whose values
    over every volume are pure Rayleigh noise, slice by slice; the median of
    its slice estimates is used. Without enough background (a scan cropped to
    the brain), each brain voxel's sample variance over its K b0 volumes,
    sigma^2 chi^2_{K-1} / (K - 1) in the Gaussian regime, gives it: their
    median over the median of chi^2_{K-1} / (K - 1). Head motion between the
    b0 volumes inflates that second estimate.
    """
    from dipy.denoise.noise_estimate import piesno

    data = np.asarray(data, np.float32)
    if data.ndim == 4 and data.shape[-1] > 1:
        sigmas, background = piesno(data, N=1, return_mask=True)
        # Background is outside the brain; "background" found inside it means there was none to find.
        outside = background & ~mask
        if outside.sum() >= MIN_BACKGROUND_VOXELS and outside.sum() >= 0.9 * background.sum():
            return float(np.median(sigmas[sigmas > 0])) if (sigmas > 0).any() else 0.0
    b0s = np.flatnonzero(gtab.b0s_mask)
    if len(b0s) < 2:
        raise ValueError("no background for PIESNO and fewer than two b0 volumes: the noise level is unknown")
    values = np.asarray(data[..., b0s], np.float64)[mask]
    variance = np.median(values.var(axis=1, ddof=1))
    k = len(b0s) - 1
    logger.info("noise from the spread of %d b0 volumes (no background for PIESNO)", len(b0s))
    return float(np.sqrt(variance * k / stats.chi2.median(k)))


def signal_to_noise(data: np.ndarray, gtab: GradientTable, brain: np.ndarray, sigma: float) -> float:
    """The scan's SNR: median over the brain of the mean b0 signal, over the noise std ``sigma``."""
    return float(np.median(np.asarray(data[..., gtab.b0s_mask], np.float64).mean(-1)[brain]) / sigma)


def add_noise(data: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """|data + sigma (n1 + i n2)|: the magnitude image of ``data`` with complex Gaussian noise of std ``sigma`` added.

    Applied to a magnitude image whose own noise is sigma_0, the result has
    noise close to sqrt(sigma_0^2 + sigma^2) wherever the signal is well above the noise.
    """
    data = np.asarray(data, np.float32)
    real = data + sigma * rng.standard_normal(data.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(data.shape, dtype=np.float32)
    return np.hypot(real, imag)
