"""Spatial context: per-voxel features plus statistics of their brain neighbourhood.

A lesion is a small blob, so a voxel's neighbours say something its own
q-space signal cannot (a single noisy voxel versus a coherent patch). The
statistics use in-mask neighbours only (normalised convolution), so the
background and CSF outside the brain mask never leak in, and a voxel at a
mask corner is described by the few brain voxels it has.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from scipy import ndimage as ndi

from anomri.dmri.features import FeatureSet

logger = logging.getLogger(__name__)

CONTEXTS = ("none", "stats")


def neighbourhood_stats(features: np.ndarray, mask: np.ndarray, radius: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each feature over the in-mask voxels of a cube.

    Parameters
    ----------
    features : ndarray, (X, Y, Z, F)
        Feature volume; values outside ``mask`` are ignored.
    mask : ndarray of bool, (X, Y, Z)
        Brain mask. Only its voxels enter any statistic.
    radius : int
        Half-width of the cube in voxels: ``radius=1`` is the 3×3×3
        neighbourhood. The field of view's edge counts as outside the mask.

    Returns
    -------
    mean, std : ndarray, (X, Y, Z, F) float32
        Over the in-mask voxels of the cube centred at each voxel (the centre
        included, so at least one voxel); the population standard deviation
        (divisor = number of in-mask neighbours), 0 for a lone voxel. Both are
        0 outside ``mask``.
    """
    features = np.asarray(features)
    mask = np.asarray(mask, bool)
    if features.ndim != 4 or features.shape[:3] != mask.shape:
        raise ValueError(f"features must be (X, Y, Z, F) on the mask's grid {mask.shape}; got {features.shape}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1; got {radius}")
    size = 2 * radius + 1
    weight = mask.astype(np.float64)
    # uniform_filter returns box means; times size^3 they are box sums. The
    # count of in-mask voxels is an integer up to rounding, so round it.
    count = np.rint(ndi.uniform_filter(weight, size, mode="constant") * size**3)
    mean = np.zeros(features.shape, np.float32)
    std = np.zeros(features.shape, np.float32)
    if not mask.any():
        return mean, std
    for f in range(features.shape[3]):
        # Variance is shift-invariant; centring on the in-mask mean keeps
        # E[x^2] - E[x]^2 from cancelling catastrophically on large offsets.
        shift = features[..., f][mask].astype(np.float64).mean()
        values = np.where(mask, features[..., f].astype(np.float64) - shift, 0.0)
        box_sum = ndi.uniform_filter(values, size, mode="constant") * size**3
        box_sq = ndi.uniform_filter(values**2, size, mode="constant") * size**3
        m = box_sum[mask] / count[mask]
        var = np.maximum(box_sq[mask] / count[mask] - m**2, 0.0)
        mean[mask, f] = m + shift
        std[mask, f] = np.sqrt(var)
    return mean, std


def add_context(features: FeatureSet, mask: np.ndarray, method: str = "none", radius: int = 1) -> FeatureSet:
    """Append neighbourhood statistics to a scan's features.

    Parameters
    ----------
    features : FeatureSet
        Per-voxel features, 0 outside ``mask``.
    mask : ndarray of bool, (X, Y, Z)
        Brain mask the statistics are restricted to.
    method : {"none", "stats"}
        ``"none"`` returns ``features`` unchanged; ``"stats"`` appends the
        in-mask neighbourhood mean and standard deviation of every feature
        (names suffixed ``_nbmean`` and ``_nbstd``), see
        :func:`neighbourhood_stats`.
    radius : int
        Neighbourhood half-width in voxels (1: 3×3×3).

    Returns
    -------
    FeatureSet
        With ``context`` recorded, so scans with different context settings
        are refused as incompatible.
    """
    if method == "none":
        return features
    if method != "stats":
        raise ValueError(f"unknown spatial context {method!r}; choose one of {CONTEXTS}")
    mean, std = neighbourhood_stats(features.data, mask, radius)
    names = features.names + [f"{n}_nbmean" for n in features.names] + [f"{n}_nbstd" for n in features.names]
    logger.info("spatial context: %d features -> %d (in-mask %d^3 mean and std)", len(features.names), len(names),
                2 * radius + 1)
    return replace(features, data=np.concatenate([features.data, mean, std], axis=-1), names=names,
                   context={"Method": method, "Radius": radius})
