"""A lesion probability learned from a few labelled patients (opt-in), under leave-one-patient-out CV.

The calibrated map (:mod:`anomri.maps.probability`) needs no lesion label:
it combines a fixed set of scores by Fisher's rule. When some patients
come with lesion masks, the user may opt in to *learning* the combination
of every computed score. Each score s contributes the evidence

    E_s(x) = -log p_s(x),

p_s its calibrated, per-tissue tail probability among calibration-control
voxels (a one-score :class:`~anomri.maps.probability.HealthyNull`). Evidence
is on one scale for every score (healthy voxels: E ~ Exp(1)), so a logistic
model

    P(lesion | x) = sigmoid(w . E(x) + b)

needs no feature scaling, and an L2 penalty (inverse strength ``C``) keeps
the weights of correlated scores stable.

Leave-one-patient-out cross-validation: each labelled patient's map comes
from the model fitted on the *other* labelled patients, so evaluating those
maps is honest; every other scan gets the model fitted on all of them.
Unlike 1 - p, the output is a posterior lesion probability, whose lesion
prevalence is that of the labelled patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from anomri.maps.probability import HealthyNull


def score_evidence(nulls: dict[str, HealthyNull], scores: dict[str, np.ndarray],
                   features: np.ndarray | None = None) -> np.ndarray:
    """E_s = -log p_s of every voxel and score (N, S), scores in the order of ``nulls``."""
    return np.stack([-nulls[k].log_tail_probability({k: scores[k]}, features) for k in nulls], axis=1)


@dataclass(frozen=True)
class LearnedCombination:
    """Logistic combination of score evidence, fitted on labelled patients' brain voxels.

    Attributes
    ----------
    scores : tuple of str
        Score ids, the order of the evidence columns.
    weights : ndarray, (S,)
        w, one weight per score's evidence.
    intercept : float
        b.
    patients : tuple of str
        The labelled patients the model was fitted on.
    C : float
        Inverse L2 penalty strength (scikit-learn's ``C``).
    """

    scores: tuple[str, ...]
    weights: np.ndarray
    intercept: float
    patients: tuple[str, ...]
    C: float

    @classmethod
    def fit(cls, scores: Sequence[str], evidence: Sequence[np.ndarray], labels: Sequence[np.ndarray],
            patients: Sequence[str], C: float = 1.0) -> LearnedCombination:
        """Fit on the patients' voxels: ``evidence[i]`` (N_i, S) and boolean ``labels[i]`` (N_i,)."""
        from sklearn.linear_model import LogisticRegression

        y = np.concatenate(labels).astype(bool)
        if y.all() or not y.any():
            raise ValueError("the labelled patients' voxels must hold both lesion and healthy voxels")
        model = LogisticRegression(C=C, max_iter=5000).fit(np.concatenate(evidence), y)
        return cls(tuple(scores), model.coef_[0].copy(), float(model.intercept_[0]), tuple(patients), C)

    def predict(self, evidence: np.ndarray) -> np.ndarray:
        """P(lesion | x) of every voxel (N,), from its evidence (N, S)."""
        logit = np.asarray(evidence, np.float64) @ self.weights + self.intercept
        # sigmoid written as exp(-logaddexp(0, -t)) never overflows.
        return np.exp(-np.logaddexp(0.0, -logit))

    def record(self) -> dict:
        """The model, for JSON sidecars."""
        return {"scores": list(self.scores), "weights": [float(w) for w in self.weights],
                "intercept": self.intercept, "patients": list(self.patients), "C": self.C}


def leave_one_patient_out(scores: Sequence[str], evidence: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                          patients: Sequence[str], C: float = 1.0) -> list[LearnedCombination]:
    """One model per labelled patient, fitted on every other labelled patient (at least 2 needed)."""
    if len(patients) < 2:
        raise ValueError(f"leave-one-patient-out needs at least 2 labelled patients; got {len(patients)}")
    folds = []
    for i in range(len(patients)):
        rest = [j for j in range(len(patients)) if j != i]
        folds.append(LearnedCombination.fit(scores, [evidence[j] for j in rest], [labels[j] for j in rest],
                                            [patients[j] for j in rest], C))
    return folds
