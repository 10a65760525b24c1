"""Calibrating image scores on held-back normal images, and fusing calibrated scores.

Scores of different methods live on different scales (a Mahalanobis distance,
a mean of a normalised map's top pixels, a probability). Expressed as z-scores
against the same held-back normal images (never trained on), they share one
scale, "standard deviations above normal", and can be combined:

``max``
    an image is as anomalous as its most alarmed score (one strong piece of
    evidence is enough: a defect that only one score sees still counts);
``mean``
    the average z (evidence that adds up: two moderate signals beat one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from anomri.images.settings import FUSION_RULES

__all__ = ["FUSION_RULES", "NormalCalibration", "fuse"]


@dataclass(frozen=True)
class NormalCalibration:
    """A score's mean and standard deviation on held-back normal images; :meth:`zscore` puts scores on that scale.

    Build with :meth:`fit`.
    """

    mean: float
    std: float

    @classmethod
    def fit(cls, normal_scores: np.ndarray, floor: float = 1e-12) -> NormalCalibration:
        """Calibration from the scores of held-back normal images (at least two, finite).

        ``floor`` keeps the scale positive when every normal score is equal.
        """
        values = np.asarray(normal_scores, np.float64).ravel()
        if values.size < 2 or not np.isfinite(values).all():
            raise ValueError(f"need at least two finite normal scores; got {values.size}")
        return cls(float(values.mean()), max(float(values.std(ddof=1)), floor))

    def zscore(self, scores: np.ndarray) -> np.ndarray:
        """``(scores - mean) / std``: standard deviations above the held-back normal images."""
        return (np.asarray(scores, np.float64) - self.mean) / self.std


def fuse(zscores: Sequence[np.ndarray], rule: str = "max") -> np.ndarray:
    """Combine calibrated scores, each (N,), image by image with ``rule`` (:data:`FUSION_RULES`)."""
    if rule not in FUSION_RULES:
        raise ValueError(f"rule must be one of {FUSION_RULES}; got {rule!r}")
    if not zscores:
        raise ValueError("nothing to fuse")
    stack = np.stack([np.asarray(z, np.float64) for z in zscores])
    return stack.max(axis=0) if rule == "max" else stack.mean(axis=0)
