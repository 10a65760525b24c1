"""Spatial post-processing of score maps before they become probabilities.

The same steps run on the calibration controls' maps, so the healthy null
distribution describes exactly the quantity that is thresholded in patients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))


@dataclass(frozen=True)
class PostProcessing:
    """Optional steps, applied in this order.

    Attributes
    ----------
    erosion_voxels : int
        Voxels peeled off the brain mask; the brain edge mixes tissue with
        CSF and background, the main source of false positives.
    smoothing_fwhm_mm : float
        Full width at half maximum of a Gaussian applied *within* the mask
        (normalised convolution, so outside values never leak in).
    """

    erosion_voxels: int = 0
    smoothing_fwhm_mm: float = 0.0

    def record(self) -> dict:
        """The settings, for JSON sidecars."""
        return asdict(self)

    def apply(self, volume: np.ndarray, mask: np.ndarray, voxel_size: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Return the processed volume (0 outside) and the mask it is valid in."""
        if self.erosion_voxels:
            # border_value=0 erodes from the edge of the field of view too.
            mask = ndi.binary_erosion(mask, iterations=self.erosion_voxels)
        volume = np.where(mask, volume, 0.0).astype(np.float32)
        if self.smoothing_fwhm_mm > 0:
            sigma = [self.smoothing_fwhm_mm * FWHM_TO_SIGMA / v for v in voxel_size[:3]]
            weight = ndi.gaussian_filter(mask.astype(np.float32), sigma)
            volume = ndi.gaussian_filter(volume, sigma) / np.maximum(weight, 1e-6)
            volume[~mask] = 0.0
        return volume.astype(np.float32), mask
