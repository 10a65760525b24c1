"""Tail models: the calibrated tail probability of one statistic over healthy voxels.

:class:`TailModel` pools the voxels it is given: the conformal estimate
(1 + #{null >= s}) / (n + 1) in the body and a generalised Pareto tail above
the top ``tail_fraction`` (:mod:`anomri.maps.probability` explains why).
:class:`WorstSubjectTail` takes the person as the unit: one tail model per
healthy participant, and p the largest of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class TailModel:
    """Calibrated tail probability of one statistic over healthy voxels.

    Attributes
    ----------
    null : ndarray
        Sorted healthy values (float64).
    threshold : float
        u, the value above which the generalised Pareto tail takes over.
    shape, scale : float
        Generalised Pareto shape xi >= 0 and scale beta > 0 of s - u given s > u.
    tail_mass : float
        p(u+), the conformal tail probability just above u.
    """

    null: np.ndarray
    threshold: float
    shape: float
    scale: float
    tail_mass: float

    @classmethod
    def fit(cls, values: np.ndarray, tail_fraction: float = 0.01, min_tail: int = 50) -> TailModel:
        """Fit the tail of ``values`` (the healthy null of one statistic)."""
        null = np.sort(np.asarray(values, np.float64).ravel())
        null = null[np.isfinite(null)]
        n = len(null)
        if n < 2 * min_tail:
            raise ValueError(f"a healthy null needs at least {2 * min_tail} voxels; got {n}")
        k = max(min_tail, int(round(tail_fraction * n)))
        threshold = float(null[n - k - 1])
        excess = null[n - k :] - threshold
        excess = excess[excess > 0]
        scale = float(excess.mean()) if len(excess) else _body_scale(null, k)
        shape = 0.0
        if len(excess) >= min_tail and np.ptp(excess) > 0:
            xi, _, beta = stats.genpareto.fit(excess, floc=0.0)
            if xi > 0:
                shape, scale = float(xi), float(beta)
        tail_mass = (np.count_nonzero(null > threshold) + 1.0) / (n + 1.0)
        return cls(null, threshold, shape, max(scale, 1e-12 * max(1.0, abs(threshold))), tail_mass)

    def log_survival(self, scores: np.ndarray) -> np.ndarray:
        """log p(s) of every score (float64); finite however far into the tail."""
        s = np.asarray(scores, np.float64)
        n = len(self.null)
        body = np.log((n - np.searchsorted(self.null, s, side="left") + 1.0) / (n + 1.0))
        excess = np.maximum(s - self.threshold, 0.0)
        if self.shape > 0:
            tail = -np.log1p(self.shape * excess / self.scale) / self.shape
        else:
            tail = -excess / self.scale
        return np.where(s > self.threshold, np.log(self.tail_mass) + tail, body)

    def survival(self, scores: np.ndarray) -> np.ndarray:
        """Tail probability p(s) in [0, 1] of every score (float64; may underflow to 0 far out)."""
        return np.exp(self.log_survival(scores))

    def quantile(self, level: float) -> float:
        """The score at which p = ``level``: healthy voxels exceed it with probability ``level``."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1); got {level}")
        if level >= self.tail_mass:
            n = len(self.null)
            # Smallest null value v with (#{null >= v} + 1) / (n + 1) <= level.
            count = int(np.floor(level * (n + 1.0) - 1.0))
            return float(self.null[n - max(count, 1)])
        q = level / self.tail_mass
        if self.shape > 0:
            return self.threshold + self.scale / self.shape * (q ** (-self.shape) - 1.0)
        return self.threshold - self.scale * np.log(q)

    def record(self) -> dict:
        """Fitted parameters, for JSON sidecars."""
        return {"n_null_voxels": int(len(self.null)), "tail_threshold": self.threshold,
                "tail_shape": self.shape, "tail_scale": self.scale, "tail_mass": self.tail_mass}


def _body_scale(null: np.ndarray, k: int) -> float:
    """Scale of an exponential tail from the body of a sorted null whose top ``k`` values all tie.

    With no value above the threshold the exceedances say nothing, so the
    tail continues the decay of the body: an exponential tail of scale beta
    puts the median and the (1 - k/n) quantile beta log(n / 2k) apart. It is
    in the null's own units, so the fallback means the same for any score;
    a null that is constant above its median falls back to its whole range.
    """
    n = len(null)
    top, median = null[n - k - 1], null[n // 2]
    if top > median:
        return float(top - median) / max(np.log(n / (2.0 * k)), 1.0)
    return float(null[-1] - null[0]) / np.log(n)


class WorstSubjectTail:
    """Tail probability of a statistic as the largest of the healthy participants' own tail probabilities.

    p(s) = max_j p_j(s), with p_j the :class:`TailModel` of participant j's
    voxels alone. Thresholding at p <= a flags s >= max_j q_j(a), the highest
    of the participants' own (1 - a)-quantiles, so no calibration participant
    has more than a fraction a of its voxels flagged. A new healthy participant
    exchangeable with the n here exceeds a only when its own quantile is the
    highest of all n + 1, which has probability at most 1 / (n + 1).

    Parameters
    ----------
    members : dict of str to TailModel
        Participant (``sub-<label>``) to the tail model of its voxels.
    """

    def __init__(self, members: dict[str, TailModel]) -> None:
        if not members:
            raise ValueError("a per-subject tail needs at least one participant")
        self.members = members

    @classmethod
    def fit(cls, values: np.ndarray, groups: np.ndarray, tail_fraction: float = 0.01) -> WorstSubjectTail:
        """One tail model per distinct label of ``groups`` (N,), fitted to that participant's ``values`` (N,)."""
        values, groups = np.asarray(values).ravel(), np.asarray(groups).ravel()
        members = {}
        for name in np.unique(groups):
            try:
                members[str(name)] = TailModel.fit(values[groups == name], tail_fraction)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc
        return cls(members)

    def log_survival(self, scores: np.ndarray) -> np.ndarray:
        """log max_j p_j(s) of every score (float64)."""
        return np.max([m.log_survival(scores) for m in self.members.values()], axis=0)

    def survival(self, scores: np.ndarray) -> np.ndarray:
        """max_j p_j(s) of every score."""
        return np.exp(self.log_survival(scores))

    def quantile(self, level: float) -> float:
        """The score at which p = ``level``: the highest of the participants' own quantiles."""
        return max(m.quantile(level) for m in self.members.values())

    def record(self) -> dict:
        """Fitted parameters per participant, for JSON sidecars."""
        return {"unit": "subject", "participants": {k: m.record() for k, m in self.members.items()}}
