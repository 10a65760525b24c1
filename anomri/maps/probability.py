"""Calibrated tail probabilities of novelty scores, from healthy controls never seen in training.

A patient voxel's score s is compared with the same score over the voxels of
held-out healthy *calibration* controls, post-processed the same way. Its
tail probability

    p(s) = P(a healthy voxel scores >= s)

is the voxel's p-value under "this voxel is healthy": thresholding at p <= a
flags a fraction a of healthy voxels (the false-positive control of issue #4).
The lesion probability map is 1 - p.

Two details make p usable far into the tail:

* The body is the conformal estimate (1 + #{null >= s}) / (n + 1), never 0.
* Above the top ``tail_fraction`` of the null, an empirical CDF runs out of
  data and would give every voxel above the healthy maximum the same value.
  There the tail is a generalised Pareto distribution fitted to the
  exceedances (peaks over threshold, the standard extreme-value model of a
  tail), with shape >= 0: a bounded healthy tail (shape < 0) would give
  p = 0 at a finite score, so it is replaced by the exponential tail, which
  is more conservative. p keeps decreasing, so lesions stay ranked.

Several scores combine into one statistic T of their log p_i, Fisher's
-sum_i log p_i or Tippett's -min_i log p_i. The scores are correlated, so T
follows no textbook law; its own tail probability is calibrated on the
calibration voxels exactly like a single score's.

Optionally each tissue class has its own null (:mod:`anomri.maps.tissue`):
rare healthy tissue is then compared with healthy tissue of its own kind,
which removes most false positives left by a brain-wide null.

What p counts is the *calibration unit*. ``voxel``: the healthy voxels of
every calibration participant pooled, so p <= a flags a fraction a of them
on average over people. ``subject``: p(s) = max_j p_j(s), each participant's
own tail model (:class:`WorstSubjectTail`), so p <= a flags at most a of
*each* calibration participant's voxels, and a new healthy person exchangeable
with the n in the null is flagged beyond a with probability at most
1 / (n + 1): a conformal guarantee whose unit is the person, untouched by the
spatial correlation of voxels within one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

from anomri.errors import InputError
from anomri.io.atomic import atomic_path
from anomri.maps.postprocess import PostProcessing
from anomri.maps.tails import TailModel, WorstSubjectTail
from anomri.maps.tissue import TissueModel

#: Key of the combined statistic's tail model in a :class:`HealthyNull`.
COMBINED = "combined"

#: What a tail probability counts (module docstring): pooled healthy voxels, or healthy people.
UNITS = ("voxel", "subject")


def fisher_statistic(log_tail_probabilities: list[np.ndarray]) -> np.ndarray:
    """Fisher's T = -sum_i log p_i from the log p_i; higher = more novel."""
    return -np.sum(log_tail_probabilities, axis=0)


def tippett_statistic(log_tail_probabilities: list[np.ndarray]) -> np.ndarray:
    """Tippett's T = -min_i log p_i: a voxel is as novel as its most significant score.

    Unlike Fisher's sum, a score that carries no lesion signal cannot dilute
    one that does; it only adds its own (calibrated) healthy tail.
    """
    return -np.min(log_tail_probabilities, axis=0)


#: Ways of combining several scores' tail probabilities.
COMBINATIONS = {"fisher": fisher_statistic, "tippett": tippett_statistic}


class ScoreNull:
    """Tail models of one or several scores over one set of healthy voxels, and of their combination.

    Parameters
    ----------
    values : dict of str to ndarray
        Score id to the scores of the same healthy voxels, in the same order.
    tail_fraction : float
        Fraction of each null modelled by the generalised Pareto tail.
    combination : {"fisher", "tippett"}
        How several scores' tail probabilities combine (see :data:`COMBINATIONS`).
    """

    def __init__(self, values: dict[str, np.ndarray], tail_fraction: float = 0.01,
                 combination: str = "fisher") -> None:
        self.scores = list(values)
        self.combination = combination
        self.models = {k: TailModel.fit(v, tail_fraction) for k, v in values.items()}
        if len(values) > 1:
            # In-sample p-values of the calibration voxels stand in for out-of-sample ones: with
            # tens of thousands of voxels a voxel's own contribution to its rank is negligible.
            self.models[COMBINED] = TailModel.fit(self._statistic(values), tail_fraction)

    def _statistic(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        log_p = [self.models[k].log_survival(scores[k]) for k in self.scores]
        return COMBINATIONS[self.combination](log_p)

    def log_tail_probability(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """log p of each voxel: of its one score, or of the combination of all scores."""
        if len(self.scores) == 1:
            return self.models[self.scores[0]].log_survival(scores[self.scores[0]])
        return self.models[COMBINED].log_survival(self._statistic(scores))

    def record(self) -> dict:
        """The fitted tails, for JSON sidecars."""
        return {k: m.record() for k, m in self.models.items()}


def participant(prefix: str) -> str:
    """``sub-<label>`` of a scan prefix such as ``sub-01_ses-2_run-1``."""
    return prefix.partition("_")[0]


@dataclass(frozen=True)
class CalibrationCopy:
    """One calibration scan as measured (``factor`` 1) or a noisier copy of it, and its SNR (None if unknown)."""

    scan: str
    factor: float
    snr: float | None

    def record(self) -> dict:
        return asdict(self)


class HealthyNull:
    """Healthy null distributions of the scores that make the lesion probability.

    Parameters
    ----------
    values : dict of str to ndarray
        Score id to the post-processed scores of the calibration controls'
        voxels; every array lists the same voxels in the same order (needed
        to calibrate their combination).
    postprocessing : PostProcessing
        What the scores went through; patients' maps go through the same.
    tail_fraction : float
        Fraction of the null modelled by the generalised Pareto tail.
    combination : {"fisher", "tippett"}
        How several scores' tail probabilities combine (see :data:`COMBINATIONS`).
    scans : list of str, optional
        The calibration scans, for provenance.
    tissue : TissueModel, optional
        Tissue classes; each gets its own null (:mod:`anomri.maps.tissue`).
    log_posterior : ndarray, (N, K), optional
        ``tissue.log_posterior`` of the calibration voxels' q-space features;
        required with ``tissue``. Each voxel joins the null of its most
        probable class.
    copies : list of CalibrationCopy, optional
        The calibration scans as measured and their noisier copies; then
        ``copy_index`` (N,) names each voxel's copy, and :meth:`matched`
        gives the null of the copies nearest a scan's noise level.

    uncentred : dict of str to ndarray, optional
        The same voxels' scores before the post-processing's centring
        (:attr:`PostProcessing.centring`): what the out-of-distribution check
        compares people on, since centring takes each person's shift away.
    control_shifts : dict of str to float, optional
        Each calibration scan's out-of-fold subject shift
        (:func:`anomri.maps.quality.subject_shift`), judged against the other
        controls: the range a new subject's shift is checked against.
    unit : {"voxel", "subject"}
        What p counts (module docstring): the final tail pooled over voxels, or
        the worst participant's own tail (:class:`WorstSubjectTail`; needs
        ``copies`` to tell participants apart).

    Notes
    -----
    With tissue classes, a voxel's p is the mixture sum_k pi_k(x) p_k(s)
    over its class posteriors; that mixture is itself recalibrated on the
    calibration voxels (as a combination of scores is), so thresholding p at
    a flags a fraction a of healthy voxels whatever the classes' overlap.
    """

    def __init__(self, values: dict[str, np.ndarray], postprocessing: PostProcessing = PostProcessing(),
                 tail_fraction: float = 0.01, combination: str = "fisher", scans: list[str] | None = None,
                 tissue: TissueModel | None = None, log_posterior: np.ndarray | None = None,
                 copies: list[CalibrationCopy] | None = None, copy_index: np.ndarray | None = None,
                 control_shifts: dict[str, float] | None = None,
                 uncentred: dict[str, np.ndarray] | None = None, unit: str = "voxel") -> None:
        if combination not in COMBINATIONS:
            raise ValueError(f"unknown combination {combination!r}; choose from {sorted(COMBINATIONS)}")
        if unit not in UNITS:
            raise ValueError(f"unknown calibration unit {unit!r}; choose from {list(UNITS)}")
        if unit == "subject" and copies is None:
            raise ValueError("the subject calibration unit needs to know which scan each voxel came from")
        if not values:
            raise ValueError("a healthy null needs at least one score")
        lengths = {len(np.ravel(v)) for v in values.values()}
        if len(lengths) != 1:
            raise ValueError(f"every score's null must list the same voxels; got lengths {sorted(lengths)}")
        if (tissue is None) != (log_posterior is None):
            raise ValueError("tissue classes need the calibration voxels' class posteriors, and vice versa")
        if (copies is None) != (copy_index is None) or (copy_index is not None and len(copy_index) != next(iter(lengths))):
            raise ValueError("calibration copies need every voxel's copy index, and vice versa")
        self.values = {k: np.asarray(v, np.float32).ravel() for k, v in values.items()}
        self.uncentred = None if uncentred is None else {k: np.asarray(v, np.float32).ravel()
                                                         for k, v in uncentred.items()}
        if self.uncentred is not None and ({len(v) for v in self.uncentred.values()} != lengths
                                           or set(self.uncentred) != set(self.values)):
            raise ValueError("the uncentred values must list the same scores and voxels as the null")
        self.copies = copies
        self.copy_index = None if copy_index is None else np.asarray(copy_index, np.int32)
        self.unit = unit
        self._subject_tail: WorstSubjectTail | None = None
        self.postprocessing = postprocessing
        self.tail_fraction = tail_fraction
        self.combination = combination
        self.scans = list(scans or [])
        self.control_shifts = dict(control_shifts or {})
        self.tissue = tissue
        self.log_posterior = None if log_posterior is None else np.asarray(log_posterior, np.float64)
        if tissue is None:
            self.classes = [ScoreNull(self.values, tail_fraction, combination)]
            self.mixture = None
            return
        if self.log_posterior.shape != (next(iter(lengths)), tissue.n_classes):
            raise ValueError(f"class posteriors of shape {self.log_posterior.shape} do not match "
                             f"{next(iter(lengths))} voxels and {tissue.n_classes} classes")
        label = np.argmax(self.log_posterior, axis=1)
        self.classes = []
        for k in range(tissue.n_classes):
            members = label == k
            try:
                self.classes.append(ScoreNull({s: v[members] for s, v in self.values.items()}, tail_fraction,
                                              combination))
            except ValueError as exc:
                raise ValueError(f"tissue class {k} of {tissue.n_classes}: {exc}; use fewer tissue classes") from exc
        self.mixture = TailModel.fit(-self._log_mixture(self.values, self.log_posterior), tail_fraction)

    @classmethod
    def fit(cls, values: dict[str, np.ndarray], features: np.ndarray | None = None, *, tissue_classes: int = 1,
            seed: int = 0, tissue: TissueModel | None = None, **kwargs) -> HealthyNull:
        """The null of ``values``, with ``tissue_classes`` tissue classes fitted to ``features`` when > 1.

        ``features`` (N, F) are the q-space features of the calibration voxels
        that ``values`` list; ``tissue``, a model already fitted to them (by
        another null of the same voxels), is reused instead of fitting one;
        ``kwargs`` go to the constructor.
        """
        if tissue is None and tissue_classes <= 1:
            return cls(values, **kwargs)
        if features is None:
            raise ValueError("tissue classes need the calibration voxels' features")
        if tissue is None:
            tissue = TissueModel.fit(features, tissue_classes, seed)
        return cls(values, tissue=tissue, log_posterior=tissue.log_posterior(features), **kwargs)

    def matched(self, snr: float | None, exclude: Iterable[str] = ()) -> HealthyNull:
        """The null of the calibration copies matched to a scan of SNR ``snr``, less the participants ``exclude``.

        Per calibration scan, the copy whose log SNR is nearest ``log(snr)``;
        with ``snr`` None, or a null without copies, the scans as measured.
        Scores grow with the noise, so a noisier scan judged against quieter
        controls would be flagged everywhere; matched, it meets a null of its
        own noise level. ``exclude`` (``sub-<label>``) drops every scan of those
        participants: a control is judged against the *other* controls, as a
        new person would be (cross-fitting). The tissue model stays the one
        fitted at calibration.
        """
        if self.copies is None:
            if list(exclude):
                raise ValueError("this null does not know which scan each voxel came from; it cannot leave one out")
            return self
        excluded = set(exclude)
        chosen = {}
        for i, copy in enumerate(self.copies):
            if participant(copy.scan) in excluded:
                continue
            if snr is None or copy.snr is None or any(c.snr is None for c in self.copies if c.scan == copy.scan):
                distance = abs(np.log(copy.factor))
            else:
                distance = abs(np.log(copy.snr) - np.log(snr))
            if copy.scan not in chosen or distance < chosen[copy.scan][0]:
                chosen[copy.scan] = (distance, i)
        if not chosen:
            raise ValueError(f"no calibration scan is left once {sorted(excluded)} are left out")
        keep = sorted(i for _, i in chosen.values())
        voxels = np.isin(self.copy_index, keep)
        return HealthyNull({k: v[voxels] for k, v in self.values.items()}, self.postprocessing, self.tail_fraction,
                           self.combination, [s for s in self.scans if participant(s) not in excluded], self.tissue,
                           None if self.log_posterior is None else self.log_posterior[voxels],
                           [self.copies[i] for i in keep], np.searchsorted(keep, self.copy_index[voxels]),
                           self.control_shifts,
                           None if self.uncentred is None else {k: v[voxels] for k, v in self.uncentred.items()},
                           self.unit)

    def shift_null(self) -> HealthyNull:
        """The null that subject shifts are measured against: the same voxels before any centring (centring
        removes the very shift the check looks for), their voxels pooled (a median voxel's p is a pooled notion)."""
        centred = self.postprocessing.centring != "none"
        if not centred and self.unit == "voxel":
            return self
        if centred and self.uncentred is None:
            raise ValueError("this null centres every scan but does not hold the values before centring")
        return HealthyNull(self.uncentred if centred else self.values, self.postprocessing.uncentred(),
                           self.tail_fraction, self.combination, self.scans, self.tissue, self.log_posterior,
                           self.copies, self.copy_index, self.control_shifts)

    def scan_voxels(self, scan: str) -> np.ndarray:
        """Boolean index of the null's voxels that come from ``scan`` as measured (factor 1)."""
        if self.copies is None:
            raise ValueError("this null does not know which scan each voxel came from")
        measured = [i for i, c in enumerate(self.copies) if c.scan == scan and c.factor == 1.0]
        return np.isin(self.copy_index, measured)

    def _log_mixture(self, scores: dict[str, np.ndarray], log_posterior: np.ndarray) -> np.ndarray:
        """log sum_k pi_k(x) p_k(s) of every voxel."""
        log_p = np.stack([c.log_tail_probability(scores) for c in self.classes], axis=1)
        return logsumexp(log_posterior + log_p, axis=1)

    @property
    def scores(self) -> list[str]:
        """The score ids, in order."""
        return list(self.values)

    def tail_probability(self, scores: dict[str, np.ndarray], features: np.ndarray | None = None) -> np.ndarray:
        """p of each voxel (see :meth:`log_tail_probability`); may underflow to 0 far in the tail."""
        return np.exp(self.log_tail_probability(scores, features))

    def log_tail_probability(self, scores: dict[str, np.ndarray], features: np.ndarray | None = None) -> np.ndarray:
        """log p of each voxel: of its one score, or of the combination of all scores; always finite.

        Parameters
        ----------
        scores : dict of str to ndarray
            Post-processed scores of the voxels, one array per score of the null.
        features : ndarray, (N, F), optional
            The voxels' q-space features; required when the null has tissue classes.
        """
        missing = set(self.values) - set(scores)
        if missing:
            raise ValueError(f"scores {sorted(missing)} are calibrated but were not given")
        if self.tissue is not None and features is None:
            raise ValueError("this null has tissue classes; pass the voxels' q-space features")
        log_posterior = None if self.tissue is None else self.tissue.log_posterior(features)
        return self.final.log_survival(self._final_statistic(scores, log_posterior))

    def _final_statistic(self, scores: dict[str, np.ndarray], log_posterior: np.ndarray | None) -> np.ndarray:
        """The values :attr:`final` calibrates: the one score, the combination, or -log of the class mixture."""
        if self.tissue is not None:
            return -self._log_mixture(scores, log_posterior)
        only = self.classes[0]
        return only._statistic(scores) if len(self.values) > 1 else np.asarray(scores[self.scores[0]], np.float64)

    @property
    def final(self) -> TailModel | WorstSubjectTail:
        """The tail model whose p is the lesion probability's; its statistic is :attr:`statistic`."""
        if self.unit == "subject":
            if self._subject_tail is None:
                # Fitted on first use: a null matched to one scan needs it, the full null seldom does.
                people = np.array([participant(c.scan) for c in self.copies])
                self._subject_tail = WorstSubjectTail.fit(self._final_statistic(self.values, self.log_posterior),
                                                          people[self.copy_index], self.tail_fraction)
            return self._subject_tail
        if self.mixture is not None:
            return self.mixture
        only = self.classes[0]
        return only.models[COMBINED] if len(self.values) > 1 else only.models[self.scores[0]]

    @property
    def statistic(self) -> str:
        """What :attr:`final` is the tail model of, in words."""
        if self.mixture is not None:
            return "-log sum_k pi_k p_k, the tissue-class mixture of tail probabilities"
        return self.scores[0] if len(self.values) == 1 else f"{self.combination} statistic"

    def record(self) -> dict:
        """Settings and fits, for JSON sidecars."""
        out = {"scans": self.scans, "scores": self.scores, "control_shifts": self.control_shifts, "unit": self.unit,
               "copies": None if self.copies is None else [c.record() for c in self.copies],
               "combination": self.combination if len(self.values) > 1 else "none",
               "tail_fraction": self.tail_fraction, "postprocessing": self.postprocessing.record()}
        if self.unit == "subject":
            out |= {"subject_tails": self.final.record()}
        if self.tissue is None:
            return out | {"tissue_classes": None, "tails": self.classes[0].record()}
        return out | {"tissue_classes": self.tissue.record(),
                      "tails": {f"class-{k}": c.record() for k, c in enumerate(self.classes)}
                      | {"mixture": self.mixture.record()}}

    def save(self, path: str | Path) -> None:
        """Write the null values, tissue model and settings to an ``.npz`` file atomically."""
        arrays = {f"score/{k}": v for k, v in self.values.items()}
        arrays |= {f"uncentred/{k}": v for k, v in (self.uncentred or {}).items()}
        if self.tissue is not None:
            arrays |= self.tissue.to_arrays() | {"log_posterior": self.log_posterior}
        if self.copies is not None:
            arrays |= {"copy_index": self.copy_index}
        settings = {"postprocessing": self.postprocessing.record(), "tail_fraction": self.tail_fraction,
                    "combination": self.combination, "scans": self.scans, "control_shifts": self.control_shifts,
                    "unit": self.unit, "copies": None if self.copies is None else [c.record() for c in self.copies]}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            # Uncompressed: float scores compress by a fifth only, and compressing took 3 s of the one
            # calibration job that every probability map waits for.
            np.savez(fh, settings=json.dumps(settings), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> HealthyNull:
        """Read a null written by :meth:`save`; the tails are refitted (deterministic)."""
        try:
            with np.load(path) as data:
                settings = json.loads(str(data["settings"]))
                values = {k.removeprefix("score/"): data[k] for k in data.files if k.startswith("score/")}
                uncentred = {k.removeprefix("uncentred/"): data[k] for k in data.files if k.startswith("uncentred/")}
                tissue = TissueModel.from_arrays(data)
                log_posterior = data["log_posterior"] if tissue is not None else None
                copies = settings.get("copies")
                copy_index = data["copy_index"] if copies is not None else None
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(path, f"not a healthy-null file written by `anomri calibrate` ({exc})") from exc
        return cls(values, PostProcessing(**settings["postprocessing"]), settings["tail_fraction"],
                   settings["combination"], settings["scans"], tissue, log_posterior,
                   None if copies is None else [CalibrationCopy(**c) for c in copies], copy_index,
                   settings.get("control_shifts"), uncentred or None, settings.get("unit", "voxel"))
