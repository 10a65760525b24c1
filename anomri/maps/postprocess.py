"""Spatial post-processing of score maps before they become probabilities.

The same steps run on the calibration controls' maps, so the healthy null
distribution describes exactly the quantity that is thresholded in patients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from anomri.settings import default

FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))
#: What :attr:`PostProcessing.centring` may be.
CENTRINGS = ("none", "median", "median-iqr")


@dataclass(frozen=True)
class PostProcessing:
    """Optional steps, applied in this order.

    Attributes
    ----------
    erosion_voxels : int
        Voxels peeled off the brain mask; the brain edge mixes tissue with
        CSF and background, the main source of false positives.
    median_filter_voxels : int
        Side of a cubic median filter over in-mask neighbours only (0 or 1 =
        off); removes isolated outlier voxels while keeping lesion edges.
    smoothing_fwhm_mm : float
        Full width at half maximum of a Gaussian applied *within* the mask
        (normalised convolution, so outside values never leak in).
    centring : {"none", "median", "median-iqr"}
        ``median`` subtracts the scan's own median (over the valid mask) from
        its map, last: a whole-brain shift between people (diffusivity,
        scanner) then cancels, while a lesion, a few per cent of the brain,
        barely moves the median. ``median-iqr`` also divides by the scan's
        interquartile range, so a person whose scores spread wider is
        put on the same scale.
    """

    erosion_voxels: int = default("probability.erosion_voxels")
    median_filter_voxels: int = default("probability.median_filter_voxels")
    smoothing_fwhm_mm: float = default("probability.smoothing_fwhm_mm")
    centring: str = default("probability.centring")

    def __post_init__(self) -> None:
        if self.median_filter_voxels > 1 and self.median_filter_voxels % 2 == 0:
            raise ValueError(f"median_filter_voxels must be odd so the window is centred; got {self.median_filter_voxels}")
        if self.centring not in CENTRINGS:
            raise ValueError(f"centring must be one of {CENTRINGS}; got {self.centring!r}")

    def record(self) -> dict:
        """The settings, for JSON sidecars."""
        return asdict(self)

    def apply(self, volume: np.ndarray, mask: np.ndarray, voxel_size: tuple[float, ...],
              centre: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Return the processed volume (0 outside) and the mask it is valid in.

        ``centre=False`` stops before the centring (:meth:`centre` does it on the valid voxels' values).
        """
        if self.erosion_voxels:
            # border_value=0 erodes from the edge of the field of view too.
            mask = ndi.binary_erosion(mask, iterations=self.erosion_voxels)
        volume = np.where(mask, volume, 0.0).astype(np.float32)
        if self.median_filter_voxels > 1:
            volume[mask] = masked_median(volume, mask, self.median_filter_voxels)
        if self.smoothing_fwhm_mm > 0:
            sigma = [self.smoothing_fwhm_mm * FWHM_TO_SIGMA / v for v in voxel_size[:3]]
            weight = ndi.gaussian_filter(mask.astype(np.float32), sigma)
            volume = ndi.gaussian_filter(volume, sigma) / np.maximum(weight, 1e-6)
            volume[~mask] = 0.0
        if centre and mask.any():
            volume[mask] = self.centre(volume[mask])
        return volume.astype(np.float32), mask

    def centre(self, values: np.ndarray) -> np.ndarray:
        """A scan's valid voxels' values (1-D), centred as :attr:`centring` says (unchanged for ``none``)."""
        values = np.asarray(values, np.float32)
        if self.centring == "none" or not values.size:
            return values
        low, median, high = np.percentile(values, [25, 50, 75])
        scale = high - low if self.centring == "median-iqr" and high > low else 1.0
        return ((values - median) / scale).astype(np.float32)

    def uncentred(self) -> PostProcessing:
        """The same steps without the centring."""
        return dataclasses.replace(self, centring="none")


def masked_median(volume: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """Median over the in-mask voxels of the ``size``-cube around every in-mask voxel (N,).

    Out-of-mask voxels are NaN in the windows, so nothing beyond the brain
    edge enters a median; every window holds at least its own voxel.
    """
    half = size // 2
    padded = np.pad(np.where(mask, volume, np.nan).astype(np.float32), half, constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size,) * 3)[mask]
    return np.nanmedian(windows.reshape(len(windows), -1), axis=1)


#: Neighbourhood of the lesion masks' connected components: the ``min_component_voxels`` filter and the
#: clusters table (:mod:`anomri.maps.clusters`) count 26-connected components.
MASK_CONNECTIVITY = 26
# scipy's ``generate_binary_structure(3, c)`` connectivity for each neighbourhood size.
_NEIGHBOURHOOD_TO_SCIPY = {6: 1, 18: 2, 26: 3}


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a 3-D mask with 6-, 18- or 26-connectivity: (labels, count)."""
    if connectivity not in _NEIGHBOURHOOD_TO_SCIPY:
        raise ValueError(f"connectivity must be 6, 18 or 26; got {connectivity}")
    return ndi.label(mask, ndi.generate_binary_structure(3, _NEIGHBOURHOOD_TO_SCIPY[connectivity]))
