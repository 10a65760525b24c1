"""Soft tissue classes of healthy q-space features, for per-tissue healthy nulls.

A novelty model trained on whole brains finds rare *healthy* tissue novel:
coherent deep white matter (corpus-callosum-like voxels), or grey matter
next to CSF, score higher in healthy controls than bulk tissue does. One
brain-wide null then flags them, and they are the false positives that
remain after calibration. Calibrating each score within its tissue class
removes them: a voxel is compared with healthy voxels *of its own kind*.

The classes are a Gaussian mixture fitted to the log q-space features of the
calibration controls' voxels. Log, because diffusion signals and their
spherical-harmonic powers are positive and multiplicative (they span
decades between CSF and white matter), which makes each tissue's cloud
close to Gaussian. No labels and no template are needed, so the classes
work for any acquisition the features come from.

A voxel's class membership is soft: its tail probability is the mixture

    p(s | x) = sum_k pi_k(x) p_k(s),

pi_k(x) the posterior of class k given the voxel's features and p_k the
tail probability of its score among healthy voxels of class k. Lesions
change the features too, but they keep a posterior over the healthy
classes, so a lesion is never compared with a null made of lesions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

#: Features below this are floored before the log (raw signals can dip below 0 in noise).
FEATURE_FLOOR = 1e-6


def log_features(features: np.ndarray) -> np.ndarray:
    """The tissue model's input: log of the (floored) q-space features, float64 (N, F)."""
    return np.log(np.maximum(np.asarray(features, np.float64), FEATURE_FLOOR))


@dataclass(frozen=True)
class TissueModel:
    """Gaussian mixture over log q-space features of healthy voxels.

    Attributes
    ----------
    weights : ndarray, (K,)
        Mixing proportions.
    means : ndarray, (K, F)
        Class means of the log features.
    covariances : ndarray, (K, F, F)
        Full class covariances of the log features.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, n_classes: int = 3, seed: int = 0) -> TissueModel:
        """Fit ``n_classes`` tissue classes to healthy voxels' features (N, F).

        Classes are ordered by their mean first feature (for the default
        features the b0-normalised mean signal of the lowest shell, i.e. from
        free water to restricted tissue), so class numbers do not depend on
        the mixture's random initialisation.
        """
        from sklearn.mixture import GaussianMixture

        x = log_features(features)
        if len(x) < 10 * n_classes:
            raise ValueError(f"{n_classes} tissue classes need at least {10 * n_classes} voxels; got {len(x)}")
        gmm = GaussianMixture(n_classes, covariance_type="full", reg_covar=1e-6, n_init=1,
                              random_state=seed).fit(x)
        order = np.argsort(gmm.means_[:, 0], kind="stable")
        return cls(gmm.weights_[order], gmm.means_[order], gmm.covariances_[order])

    @property
    def n_classes(self) -> int:
        """K, the number of tissue classes."""
        return len(self.weights)

    def log_posterior(self, features: np.ndarray) -> np.ndarray:
        """log pi_k(x) of every voxel (N, F) and class, float64 (N, K); rows sum to 1 in probability."""
        x = log_features(features)
        joint = np.empty((len(x), self.n_classes))
        for k in range(self.n_classes):
            chol = np.linalg.cholesky(self.covariances[k])
            # Mahalanobis distance through the Cholesky factor: stable for near-singular covariances.
            white = np.linalg.solve(chol, (x - self.means[k]).T)
            log_det = 2.0 * np.sum(np.log(np.diag(chol)))
            joint[:, k] = (np.log(self.weights[k]) - 0.5 * np.sum(white**2, axis=0)
                           - 0.5 * (log_det + x.shape[1] * np.log(2.0 * np.pi)))
        return joint - logsumexp(joint, axis=1, keepdims=True)

    def posterior(self, features: np.ndarray) -> np.ndarray:
        """pi_k(x), (N, K)."""
        return np.exp(self.log_posterior(features))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The parameters as named arrays (for ``np.savez``)."""
        return {"tissue/weights": self.weights, "tissue/means": self.means, "tissue/covariances": self.covariances}

    @classmethod
    def from_arrays(cls, arrays) -> TissueModel | None:
        """Inverse of :meth:`to_arrays`; None when ``arrays`` holds no tissue model."""
        if "tissue/weights" not in arrays:
            return None
        return cls(np.asarray(arrays["tissue/weights"]), np.asarray(arrays["tissue/means"]),
                   np.asarray(arrays["tissue/covariances"]))

    def record(self) -> dict:
        """Summary for JSON sidecars: each class's weight and its geometric-mean features."""
        return {"n_classes": self.n_classes, "model": "Gaussian mixture of log q-space features",
                "weights": [float(w) for w in self.weights],
                "geometric_mean_features": np.exp(self.means).round(6).tolist()}
