"""Per-subject harmonisation of q-space features: each feature divided by its brain median.

Healthy people differ in diffusivity and anisotropy by several per cent, and
scanners differ in how they render them. On the rotation-invariant features
(SH power per shell and even order, :mod:`anomri.dmri.invariants`) such a
subject-wide change is close to a per-shell, per-order scale, the quantity
RISH harmonisation (Mirzaalian et al. 2016) matches between sites. Dividing
every feature by its median over the subject's brain removes that scale
without a reference subject: the model standardises features afterwards, so
matching everyone to the controls' median or to 1 is the same up to a constant
per feature. The median is taken over the whole brain mask because lesions
occupy a few per cent of it and cannot move a median much, while a tissue
segmentation would be one more thing a lesion can fool.

What it costs: a change that covers most of the brain (diffuse disease, not
focal lesions) is harmonised away along with the physics.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from anomri.dmri.features import FeatureSet

logger = logging.getLogger(__name__)

__all__ = ["HARMONISATIONS", "harmonise"]

HARMONISATIONS = ("none", "median")


def harmonise(features: FeatureSet, mask: np.ndarray, method: str = "none") -> FeatureSet:
    """Scale every feature of one scan to a brain median of 1 (``method="median"``).

    Parameters
    ----------
    features : FeatureSet
        Per-voxel features of one scan (before spatial context is appended,
        so the context statistics describe harmonised features).
    mask : ndarray of bool, (X, Y, Z)
        The brain voxels; the median is taken over them and only they are scaled.
    method : {"none", "median"}
        ``none`` returns ``features`` unchanged.

    Returns
    -------
    FeatureSet
        With ``harmonisation`` recording the method and each feature's divisor,
        so scans harmonised differently are not compared
        (:func:`~anomri.dmri.features.check_compatible`).

    Raises
    ------
    ValueError
        Unknown method, or a feature whose brain median is not positive (it has no scale to match).
    """
    if method not in HARMONISATIONS:
        raise ValueError(f"unknown harmonisation {method!r}; choose one of {HARMONISATIONS}")
    if method == "none":
        return features
    medians = np.nanmedian(features.data[mask], axis=0).astype(np.float64)
    unusable = [name for name, m in zip(features.names, medians, strict=True) if not (np.isfinite(m) and m > 0)]
    if unusable:
        raise ValueError(f"cannot harmonise features with no positive brain median: {', '.join(unusable)}")
    data = features.data.copy()
    data[mask] /= medians.astype(np.float32)
    logger.info("harmonised %d features to brain median 1 (divisors %.3g-%.3g)", len(medians), medians.min(),
                medians.max())
    return replace(features, data=data,
                   harmonisation={"Method": method, "Divisors": [float(f"{m:.6g}") for m in medians]})
