"""dipy preprocessing of one diffusion scan: brain mask, denoising, b0 normalisation."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from dipy.core.gradients import GradientTable

logger = logging.getLogger(__name__)

DENOISERS = ("none", "mppca", "patch2self")


@dataclass
class NormalizedDWI:
    """A scan divided by its mean b0.

    Attributes
    ----------
    signal : ndarray, (X, Y, Z, N)
        S/S0 of every volume (b0 volumes included, so shells can be refit).
    mean_b0 : ndarray, (X, Y, Z)
        S0, the mean of the b0 volumes.
    mask : ndarray of bool, (X, Y, Z)
        Brain voxels with a usable S0.
    """

    signal: np.ndarray
    mean_b0: np.ndarray
    mask: np.ndarray


def brain_mask(data: np.ndarray, gtab: GradientTable, median_radius: int = 2, numpass: int = 1) -> np.ndarray:
    """Brain mask from the b0 volumes by dipy's ``median_otsu``.

    The defaults (radius 2, one pass) suit the 2–3 mm voxels of clinical dMRI;
    dipy's radius 4 erodes small brains at coarse resolution.
    """
    from dipy.segment.mask import median_otsu

    _, mask = median_otsu(data, vol_idx=np.flatnonzero(gtab.b0s_mask), median_radius=median_radius, numpass=numpass)
    return mask.astype(bool)


def denoise(data: np.ndarray, gtab: GradientTable, method: str, mask: np.ndarray) -> np.ndarray:
    """Denoise with dipy's MP-PCA or Patch2Self; ``"none"`` returns ``data`` unchanged."""
    if method == "none":
        return data
    if method == "mppca":
        from dipy.denoise.localpca import mppca
        from scipy.ndimage import binary_dilation

        # Radius 2 (5^3 patches), shrunk along axes too thin for it (slabs of a few slices).
        radius = np.minimum(2, (np.array(data.shape[:3]) - 1) // 2)
        # dipy leaves NaN in voxels that no patch centred in its mask covers (mask voxels
        # near the edge of the field of view); centring patches on the mask dilated by the
        # radius covers every mask voxel.
        centres = binary_dilation(mask, structure=np.ones(2 * radius + 1, bool))
        with np.errstate(invalid="ignore"):  # dipy computes 0/0 outside the centres, then zeroes them
            return mppca(data, mask=centres, patch_radius=radius, suppress_warning=True).astype(np.float32)
    if method == "patch2self":
        from dipy.denoise.patch2self import patch2self

        return patch2self(data, gtab.bvals, b0_threshold=gtab.b0_threshold, verbose=False).astype(np.float32)
    raise ValueError(f"unknown denoising method {method!r}; choose one of {DENOISERS}")


def remove_gibbs(data: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Remove Gibbs ringing from every volume with dipy's sub-voxel shift method (Kellner et al. 2016).

    Ringing comes from truncating k-space within each slice, so the method
    works slice by slice along ``slice_axis`` (2 for axial acquisitions). It
    must run on the acquired grid, before anything resamples the data.
    """
    from dipy.denoise.gibbs import gibbs_removal

    return gibbs_removal(np.asarray(data, np.float32), slice_axis=slice_axis, n_points=3, inplace=False,
                         num_processes=1).astype(np.float32)


def normalize_by_b0(
    data: np.ndarray, gtab: GradientTable, mask: np.ndarray, min_relative_b0: float = 0.05, max_ratio: float = 1.5
) -> NormalizedDWI:
    """Divide every volume by the mean b0, S/S0, with safe handling of S0 ≈ 0.

    Voxels whose S0 is below ``min_relative_b0`` times the median in-mask S0
    (signal dropout, background that leaked into the mask) carry no usable
    ratio: they leave the mask and their signal is set to 0. Ratios are
    clipped to [0, ``max_ratio``] because Rician noise at low S0 can push them
    far above the physical limit of 1.
    """
    mean_b0 = data[..., gtab.b0s_mask].mean(-1)
    floor = min_relative_b0 * float(np.median(mean_b0[mask]))
    usable = mask & (mean_b0 > max(floor, np.finfo(np.float32).tiny))
    dropped = int(mask.sum() - usable.sum())
    if dropped:
        logger.info("excluded %d mask voxels with S0 <= %.3g", dropped, floor)
    signal = np.zeros(data.shape, np.float32)
    signal[usable] = np.clip(data[usable] / mean_b0[usable, None], 0.0, max_ratio)
    return NormalizedDWI(signal=signal, mean_b0=mean_b0.astype(np.float32), mask=usable)
