"""Normalising anomaly maps by the per-pixel statistics of normal validation maps, and robust image scores.

A model's error map has systematic structure that is no anomaly: edges,
borders and textures it reproduces badly in *every* image. Dividing each
pixel's error by how large it is on normal images makes those places
unremarkable and leaves what is unusual *for that place* (the standard
per-pixel normalisation of reconstruction maps)::

    z(p) = (m(p) - mean_normal(p)) / (std_normal(p) + floor * median_p std_normal(p))

The statistics come from the maps of the held-out normal validation images, in
model-input coordinates (every input shares that grid, resized or tiled). The
floor keeps pixels where normal maps barely vary from blowing noise up. A
validation image's own map is normalised by the statistics of the *other*
validation images (leave one out), so thresholds set on them are not biased
by having fitted them.

The image score ``map-top`` is the mean of the highest ``top_fraction`` of an
image's pixels: robust to a single hot pixel, unlike the maximum, and not
diluted by the image's area, unlike the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NormalMapStatistics", "top_fraction_mean"]


@dataclass(frozen=True)
class NormalMapStatistics:
    """Per-pixel mean and floored standard deviation of normal maps (S, S), and the maps' sums for leave-one-out.

    Build with :meth:`fit`.
    """

    total: np.ndarray
    total_squares: np.ndarray
    count: int
    floor: float

    @classmethod
    def fit(cls, normal_maps: np.ndarray, floor: float = 0.1) -> NormalMapStatistics:
        """Statistics of normal maps (N, S, S), N >= 2; ``floor`` as a fraction of the median std."""
        maps = np.asarray(normal_maps, np.float64)
        if maps.ndim != 3 or len(maps) < 2:
            raise ValueError(f"need at least two normal maps (N, S, S); got shape {maps.shape}")
        if floor < 0:
            raise ValueError(f"floor must be >= 0; got {floor}")
        return cls(maps.sum(0), (maps**2).sum(0), len(maps), float(floor))

    @staticmethod
    def _moments(total: np.ndarray, squares: np.ndarray, count: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = total / count
        return mean, np.sqrt(np.clip(squares / count - mean**2, 0.0, None))

    def _scale(self, std: np.ndarray) -> np.ndarray:
        # The floor is relative to the median std of all normal maps, so it is unitless.
        full_std = self._moments(self.total, self.total_squares, self.count)[1]
        return std + max(self.floor * float(np.median(full_std)), 1e-12)

    def normalize(self, maps: np.ndarray) -> np.ndarray:
        """z-maps (M, S, S), float32, of maps (M, S, S) that did not contribute to the statistics."""
        mean, std = self._moments(self.total, self.total_squares, self.count)
        return ((np.asarray(maps, np.float64) - mean) / self._scale(std)).astype(np.float32)

    def normalize_left_out(self, normal_maps: np.ndarray) -> np.ndarray:
        """z-maps of the maps the statistics were fitted on, each by the statistics of all the others."""
        maps = np.asarray(normal_maps, np.float64)
        if len(maps) != self.count:
            raise ValueError(f"fitted on {self.count} maps, given {len(maps)}")
        mean, std = self._moments(self.total - maps, self.total_squares - maps**2, self.count - 1)
        return ((maps - mean) / self._scale(std)).astype(np.float32)


def top_fraction_mean(pixel_map: np.ndarray, fraction: float) -> float:
    """Mean of the highest ``fraction`` of the values of ``pixel_map`` (at least one value)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction}")
    values = np.asarray(pixel_map, np.float64).ravel()
    k = max(1, int(round(fraction * values.size)))
    return float(np.partition(values, values.size - k)[values.size - k:].mean())
