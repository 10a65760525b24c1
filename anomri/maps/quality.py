"""Subject-level out-of-distribution check: does a scan's healthy bulk look like the controls'?

A lesion changes a few per cent of a brain; a scan whose *whole* brain scores
unlike the controls' (another diffusivity, scanner, protocol or noise level
than any control had) would otherwise be painted with false lesions, its
masks flagging many times their nominal rate. The check looks at the bulk:

    shift = Phi^{-1}(1 - median_v p_v),

the median voxel's calibrated tail probability as a standard-normal quantile.
For a healthy scan that the null describes, p is uniform and the shift is
about 0; a scan whose voxels all sit higher by d healthy standard deviations
has a shift of about d, and then a fraction ``1 - Phi(Phi^{-1}(1 - a) - d)`` of
its healthy voxels is flagged at level a (:func:`expected_flagged_fraction`).
Lesions move the median by at most their share of the brain.

Every control's own shift is measured out of fold and leave-subject-out
(its out-of-fold model's scores against the null of the *other* controls,
:func:`anomri.maps.calibration.calibrate`): the range of shifts that healthy
people who trained nothing they are judged by actually show. A scan whose
shift lies beyond that range by more than ``margin`` is out of distribution:
the log, the probability map's sidecar and the cohort's ``quality.tsv`` say
so, and its lesion masks should not be read as lesions.

With ``probability.centring`` each scan's own median (and spread) is taken
out of its lesion probability, so the shift is measured on the scores
before centring (:meth:`anomri.maps.probability.HealthyNull.shift_null`):
centring keeps a shifted scan's masks near their nominal rate, but the model
still describes its tissue less well than any control's, and the check says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from anomri.settings import default

#: Verdicts of :class:`ShiftCheck`.
WITHIN, ABOVE, BELOW, UNKNOWN = "within", "above", "below", "unknown"


def subject_shift(log_p: np.ndarray) -> float:
    """Phi^{-1}(1 - median p) of a scan's voxels, from their log p (higher = the bulk looks more novel)."""
    # The median commutes with the monotone map p -> Phi^{-1}(1 - p).
    median_p = float(np.exp(np.median(np.asarray(log_p, np.float64))))
    return float(stats.norm.isf(median_p))


def expected_flagged_fraction(shift: float, level: float) -> float:
    """Fraction of healthy voxels flagged at ``level`` when the whole scan sits ``shift`` healthy sds higher."""
    return float(stats.norm.sf(stats.norm.isf(level) - shift))


@dataclass(frozen=True)
class ShiftCheck:
    """A scan's shift against the controls' out-of-fold range.

    Attributes
    ----------
    shift : float
        :func:`subject_shift` of the scan.
    control_range : (float, float) or None
        Lowest and highest out-of-fold shift of the controls it is compared
        with (None: no control to compare with).
    margin : float
        How far beyond the range a shift may lie and still be ``within``.
    verdict : str
        ``within``, ``above`` (the bulk scores higher than any control's: its
        masks over-flag), ``below`` (lower: they under-flag) or ``unknown``.
    """

    shift: float
    control_range: tuple[float, float] | None
    margin: float
    verdict: str

    @property
    def out_of_distribution(self) -> bool:
        return self.verdict in (ABOVE, BELOW)

    def message(self, levels: tuple[float, ...] = (0.01,)) -> str:
        """One sentence for a log or a report."""
        if self.control_range is None:
            return f"shift {self.shift:.2f}; no other control to compare with"
        low, high = self.control_range
        text = (f"shift {self.shift:.2f} healthy sd (controls, out of fold: {low:.2f} to {high:.2f}, "
                f"margin {self.margin:g}): {self.verdict}")
        if self.verdict == ABOVE:
            expected = ", ".join(f"{100 * expected_flagged_fraction(self.shift, a):.1f} % at p <= {a:g}"
                                 for a in levels)
            text += f"; uncentred, a healthy brain this shifted would be flagged on about {expected}"
        return text

    def record(self) -> dict:
        """JSON-ready, for sidecars and tables."""
        return {"Shift": round(self.shift, 4),
                "ControlShiftRange": None if self.control_range is None else [round(v, 4) for v in self.control_range],
                "Margin": self.margin, "Verdict": self.verdict, "OutOfDistribution": self.out_of_distribution}


def check_shift(shift: float, control_shifts: Mapping[str, float], exclude: str | None = None,
                margin: float = default("probability.ood_margin")) -> ShiftCheck:
    """Compare ``shift`` with the controls' out-of-fold shifts (a participant's own scans left out).

    Parameters
    ----------
    shift : float
    control_shifts : mapping of str to float
        Scan prefix to its out-of-fold shift (:attr:`HealthyNull.control_shifts`).
    exclude : str, optional
        ``sub-<label>`` whose own scans are not compared with (a control checked against the others).
    margin : float
        Tolerance beyond the controls' range, in healthy standard deviations (>= 0).
    """
    if margin < 0:
        raise ValueError(f"the margin must be >= 0; got {margin}")
    others = [v for k, v in control_shifts.items() if k.partition("_")[0] != exclude]
    if not others:
        return ShiftCheck(shift, None, margin, UNKNOWN)
    low, high = min(others), max(others)
    verdict = ABOVE if shift > high + margin else BELOW if shift < low - margin else WITHIN
    return ShiftCheck(shift, (low, high), margin, verdict)
