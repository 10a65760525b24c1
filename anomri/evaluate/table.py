"""Evaluation of novelty and probability maps against lesion masks: per patient, pooled, cohort summary.

Every map kind (each novelty score, and the lesion probability under the id
``lesion-probability``, read from its -log10 p map) is evaluated over the
brain-mask voxels and the lesion voxels of every patient with a lesion mask.
Lesion voxels outside the brain mask were never scored: they count as
misses, not as nothing.

* threshold-free: voxel AUROC, AUPRC (average precision), best Dice over all
  thresholds (an optimistic bound: it looks at the lesion mask);
* at the **healthy-FPR threshold** of the map kind, the value that flags a
  fraction ``fpr`` (1 %) of the brain voxels of the *calibration controls* in
  the same kind of map (:func:`anomri.evaluate.metrics.threshold_at_fpr`):
  Dice, the fraction of the patient's healthy brain voxels flagged, lesion-wise
  sensitivity (a lesion counts as detected when at least 10 % of its voxels are
  flagged), false-positive components and volume error
  (:func:`anomri.evaluate.metrics.lesion_wise`, 26-connectivity).

``evaluation.tsv`` holds one row per patient and map kind, then one
``pooled`` row per map kind (all patients' voxels together; counts and
volumes summed). ``evaluation_summary.tsv`` holds, per map kind, the mean over
patients and its percentile-bootstrap 95 % CI of every per-patient metric.
Both are BIDS-style TSVs (``n/a`` for missing values) with a JSON sidecar
describing the columns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from anomri.errors import InputError
from anomri.evaluate.metrics import (
    auprc, auroc, best_dice, bootstrap_ci, dice, lesion_wise, pr_points, roc_points, threshold_at_fpr,
)
from anomri.io.derivatives import ScanDerivatives
from anomri.io.nifti import load_mask, load_nifti, read_data
from anomri.io.tables import read_table, write_table  # re-exported: the evaluation tables are written with them

logger = logging.getLogger(__name__)

__all__ = [
    "PROBABILITY", "POOLED", "CONNECTIVITY", "COLUMNS", "SUMMARY_METRICS", "Patient", "map_path", "read_map",
    "load_patient", "calibration_threshold", "evaluate_map", "evaluate_cohort", "summarise", "summary_columns",
    "column_descriptions", "summary_descriptions", "write_table", "read_table",
]

#: Map id of the lesion probability map in the tables.
PROBABILITY = "lesion-probability"
#: ``participant_id`` of the rows pooling every patient.
POOLED = "pooled"
#: Voxel neighbourhood of a lesion (and of a predicted component): faces, edges and corners.
CONNECTIVITY = 26

_COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "participant_id": {"Description": f"Patient (sub-<label>), or '{POOLED}' for all patients' voxels together"},
    "session": {"Description": "The scan's entities after sub-<label>: ses-<label>, then acq-/dir-/run-<label> when a "
                            "participant has several runs (ses-1_run-2), n/a when there are none"},
    "score": {"Description": f"Novelty score id, or '{PROBABILITY}' for the lesion probability map"},
    "threshold": {"Description": "Healthy-FPR threshold: the map value flagging the target fraction of the "
                                 "calibration controls' brain voxels in the same kind of map (map >= threshold)"},
    "auroc": {"Description": "Voxel AUROC over brain and lesion voxels"},
    "auprc": {"Description": "Voxel AUPRC (average precision) over brain and lesion voxels"},
    "best_dice": {"Description": "Best Dice over every threshold (optimistic: chosen with the lesion mask)"},
    "dice_at_fpr": {"Description": "Dice of (map >= threshold) with the lesion mask"},
    "healthy_fpr": {"Description": "Fraction of the patient's healthy (non-lesion) brain voxels flagged at the "
                                   "threshold; near the target when the calibration transfers"},
    "lesion_sensitivity": {"Description": "Fraction of lesions (26-connected components of the lesion mask) "
                                          "detected: at least evaluation.min_lesion_overlap (default 10 %) of "
                                          "their voxels, and at least one, flagged"},
    "n_lesions": {"Description": "Lesions: 26-connected components of the lesion mask (voxels outside the brain "
                                 "mask included: never scored, they count as misses)"},
    "n_detected": {"Description": "Lesions detected (see lesion_sensitivity)"},
    "n_fp_components": {"Description": "26-connected components of flagged voxels overlapping no lesion voxel"},
    "true_volume_ml": {"Description": "Lesion volume within the brain mask", "Units": "mL"},
    "pred_volume_ml": {"Description": "Flagged volume at the threshold", "Units": "mL"},
    "volume_error_ml": {"Description": "Flagged minus lesion volume", "Units": "mL"},
    "relative_volume_error": {"Description": "(flagged - lesion volume) / lesion volume"},
    "n_lesion_voxels": {"Description": "Lesion voxels (within the brain mask or not)"},
    "n_brain_voxels": {"Description": "Voxels evaluated: the brain mask and every lesion voxel"},
}

COLUMNS = list(_COLUMN_DESCRIPTIONS)

#: Per-patient metrics summarised over the cohort, in table order.
SUMMARY_METRICS = ["auroc", "auprc", "best_dice", "dice_at_fpr", "healthy_fpr", "lesion_sensitivity",
                   "n_fp_components", "volume_error_ml", "relative_volume_error"]


@dataclass(frozen=True)
class Patient:
    """A patient's evaluation grid.

    Attributes
    ----------
    prefix : str
        ``sub-<label>[_ses-<label>]``.
    scan : ScanDerivatives
    brain : ndarray of bool, 3-D
        Brain mask.
    lesion : ndarray of bool, 3-D
        Lesion mask, including any lesion voxels outside the brain mask: maps
        are 0 there, so they count as misses (:meth:`values`).
    voxel_volume_ml : float
    """

    prefix: str
    scan: ScanDerivatives
    brain: np.ndarray
    lesion: np.ndarray
    voxel_volume_ml: float

    @property
    def participant_id(self) -> str:
        return self.prefix.partition("_")[0]

    @property
    def session(self) -> str | None:
        return self.prefix.partition("_")[2] or None

    @property
    def domain(self) -> np.ndarray:
        """The voxels evaluated: the brain mask and every lesion voxel."""
        return self.brain | self.lesion

    @property
    def labels(self) -> np.ndarray:
        """Lesion labels of the evaluated voxels (1-D, the order of :meth:`values`)."""
        return self.lesion[self.domain]

    def values(self, map_id: str) -> np.ndarray:
        """The evaluated voxels' values of one map (1-D).

        Lesion voxels outside the brain mask were never scored: they get a
        value below every brain voxel's, so they rank last and are never
        flagged, i.e. they are misses rather than left out.
        """
        values = read_map(self.scan, map_id, self.domain)
        outside = ~self.brain[self.domain]
        if outside.any():
            values[outside] = (values[~outside].min() if (~outside).any() else 0.0) - 1.0
        return values


def map_path(scan: ScanDerivatives, map_id: str) -> Path:
    """The NIfTI file of map ``map_id`` (a score id or :data:`PROBABILITY`) of a scan.

    The lesion probability is evaluated on its -log10 p map: the same ranking
    as 1 - p, without the float32 saturation of 1 - p below p ~ 3e-8.
    """
    return scan.neglog10p if map_id == PROBABILITY else scan.novelty(map_id)


def read_map(scan: ScanDerivatives, map_id: str, brain: np.ndarray) -> np.ndarray:
    """Values of one map in the voxels of ``brain``, checked to lie on its grid."""
    path = map_path(scan, map_id)
    img = load_nifti(path, ndim=3)
    if img.shape != brain.shape:
        raise InputError(path, f"map shape {img.shape} differs from the brain mask's {brain.shape}")
    return read_data(img, path)[brain]


def _load_brain(scan: ScanDerivatives) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = load_nifti(scan.mask, ndim=3)
    return read_data(img, scan.mask) > 0.5, img


def load_patient(derivatives_dir: str | Path, prefix: str, lesion_path: str | Path) -> Patient:
    """Brain mask, lesion mask (checked against the brain mask's grid) and voxel volume of a patient."""
    scan = ScanDerivatives(Path(derivatives_dir), prefix)
    brain, img = _load_brain(scan)
    lesion = load_mask(lesion_path, img, scan.mask)
    outside = int((lesion & ~brain).sum())
    if outside:
        logger.info("%s: %d lesion voxels outside the brain mask count as misses", prefix, outside)
    voxel_volume_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    return Patient(prefix, scan, brain, lesion, voxel_volume_ml)


def calibration_threshold(derivatives_dir: str | Path, prefixes: Sequence[str], map_id: str, fpr: float) -> float:
    """The value of map ``map_id`` flagging a fraction ``fpr`` of the calibration controls' brain voxels."""
    null = []
    for prefix in prefixes:
        scan = ScanDerivatives(Path(derivatives_dir), prefix)
        null.append(read_map(scan, map_id, _load_brain(scan)[0]))
    return threshold_at_fpr(np.concatenate(null), fpr)


def _thresholded(flagged: np.ndarray, patients: Sequence[Patient], min_overlap: float) -> dict[str, float]:
    """Metrics of flagged voxels (1-D, patients' evaluated voxels concatenated) against the lesions, counts summed."""
    labels = np.concatenate([p.labels for p in patients])
    counts = {"n_lesions": 0, "n_detected": 0, "n_fp_components": 0}
    true_ml = pred_ml = 0.0
    start = 0
    for patient in patients:
        domain = patient.domain
        n = int(domain.sum())
        pred = np.zeros(domain.shape, bool)
        pred[domain] = flagged[start:start + n]
        pred &= patient.brain  # never scored outside the brain: never flagged there
        flagged[start:start + n] = pred[domain]
        start += n
        wise = lesion_wise(pred, patient.lesion, CONNECTIVITY, min_overlap=min_overlap)
        for key in counts:
            counts[key] += wise[key]
        true_ml += wise["true_volume_voxels"] * patient.voxel_volume_ml
        pred_ml += wise["pred_volume_voxels"] * patient.voxel_volume_ml
    healthy = ~labels
    return {
        "dice_at_fpr": dice(flagged, labels),
        "healthy_fpr": float(flagged[healthy].mean()) if healthy.any() else float("nan"),
        "lesion_sensitivity": counts["n_detected"] / counts["n_lesions"] if counts["n_lesions"] else float("nan"),
        **counts,
        "true_volume_ml": true_ml,
        "pred_volume_ml": pred_ml,
        "volume_error_ml": pred_ml - true_ml,
        "relative_volume_error": (pred_ml - true_ml) / true_ml if true_ml else float("nan"),
        "n_lesion_voxels": int(labels.sum()),
        "n_brain_voxels": int(labels.size),
    }


def evaluate_map(values: Sequence[np.ndarray], patients: Sequence[Patient], threshold: float,
                 min_overlap: float = 0.1) -> dict[str, float]:
    """Every metric of one map kind over one or more patients, their brain voxels pooled.

    Parameters
    ----------
    values : sequence of ndarray
        Per patient, the brain voxels' map values (1-D, the order of
        :attr:`Patient.labels`).
    patients : sequence of Patient
    threshold : float
        The healthy-FPR threshold of this map kind.
    min_overlap : float
        Share of a lesion's voxels to flag for it to count as detected.

    Returns
    -------
    dict
        The metric columns of :data:`COLUMNS` (counts and volumes summed over
        the patients, ratios of the sums).
    """
    scores = np.concatenate(values)
    labels = np.concatenate([p.labels for p in patients])
    has_lesion = bool(labels.any())
    return {
        "threshold": threshold,
        "auroc": auroc(scores, labels),
        "auprc": auprc(scores, labels),
        "best_dice": best_dice(scores, labels)[0] if has_lesion else float("nan"),
        **_thresholded(scores >= threshold, patients, min_overlap),
    }


def _curves(scores: np.ndarray, labels: np.ndarray, threshold: float, metrics: dict) -> dict:
    """ROC and PR points of one map, and its operating point at the threshold, as JSON-ready lists."""
    fpr, tpr = roc_points(scores, labels)
    recall, precision = pr_points(scores, labels)
    flagged = scores >= threshold
    return {
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "pr": {"recall": recall.tolist(), "precision": precision.tolist()},
        "auroc": _json_number(metrics["auroc"]), "auprc": _json_number(metrics["auprc"]),
        "prevalence": float(labels.mean()),
        "operating_point": {
            "fpr": _json_number(metrics["healthy_fpr"]),
            "tpr": float(flagged[labels].mean()) if labels.any() else None,
            "precision": float(labels[flagged].mean()) if flagged.any() else None,
        },
    }


def _json_number(value: float) -> float | None:
    """``value``, or None for NaN: JSON has no NaN."""
    return None if np.isnan(value) else float(value)


def evaluate_cohort(
    patients: Sequence[Patient], map_ids: Sequence[str], thresholds: dict[str, float], progress: bool = True,
    min_overlap: float = 0.1,
) -> tuple[list[dict], dict]:
    """Rows of ``evaluation.tsv`` and the curves behind them, for every map kind.

    Maps are read one kind at a time, so memory holds one kind of map of
    every patient, never all kinds.

    Returns
    -------
    rows : list of dict
        Per map kind: one row per patient, then the :data:`POOLED` row.
    curves : dict
        ``curves[map_id][key]`` with ``key`` the scan prefix or
        :data:`POOLED`: ROC and PR points
        (:func:`anomri.evaluate.metrics.roc_points`, ``pr_points``), AUROC,
        AUPRC, lesion prevalence and the operating point at the threshold
        (``fpr``, ``tpr``, ``precision``); None where undefined.
    """
    rows: list[dict] = []
    curves: dict[str, dict] = {}
    bar = tqdm(total=len(map_ids) * len(patients), desc="evaluate", unit="map", disable=not progress)
    for map_id in map_ids:
        threshold = thresholds[map_id]
        values = []
        curves[map_id] = {}
        for patient in patients:
            values.append(patient.values(map_id))
            metrics = evaluate_map(values[-1:], [patient], threshold, min_overlap)
            rows.append({"participant_id": patient.participant_id, "session": patient.session, "score": map_id,
                         **metrics})
            curves[map_id][patient.prefix] = _curves(values[-1], patient.labels, threshold, metrics)
            bar.update()
        pooled = evaluate_map(values, patients, threshold, min_overlap)
        rows.append({"participant_id": POOLED, "session": None, "score": map_id, **pooled})
        curves[map_id][POOLED] = _curves(np.concatenate(values), np.concatenate([p.labels for p in patients]),
                                         threshold, pooled)
    bar.close()
    return rows, curves


def summarise(rows: Iterable[dict], n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> list[dict]:
    """Per map kind, the mean over patients and the bootstrap CI of every :data:`SUMMARY_METRICS` entry.

    The :data:`POOLED` rows are left out: the summary is over patients, each
    weighing the same. Every metric is resampled with the same seed, so the
    summary is deterministic.

    Returns
    -------
    list of dict
        One row per map kind, in first-seen order, with ``score``,
        ``n_patients`` and, per metric, ``<metric>``, ``<metric>_ci_low`` and
        ``<metric>_ci_high``.
    """
    by_map: dict[str, list[dict]] = {}
    for row in rows:
        if row["participant_id"] != POOLED:
            by_map.setdefault(row["score"], []).append(row)
    summary = []
    for map_id, patient_rows in by_map.items():
        entry = {"score": map_id, "n_patients": len(patient_rows)}
        for metric in SUMMARY_METRICS:
            values = np.array([_as_float(r.get(metric)) for r in patient_rows])
            mean, low, high = bootstrap_ci(values, n_boot=n_boot, ci=ci, seed=seed)
            entry |= {metric: mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high}
        summary.append(entry)
    return summary


def summary_columns() -> list[str]:
    """Columns of ``evaluation_summary.tsv``."""
    return ["score", "n_patients"] + [f"{m}{s}" for m in SUMMARY_METRICS for s in ("", "_ci_low", "_ci_high")]


def summary_descriptions(ci: float = 0.95) -> dict[str, dict[str, str]]:
    """JSON-sidecar descriptions of the columns of ``evaluation_summary.tsv``."""
    descriptions = {"score": _COLUMN_DESCRIPTIONS["score"],
                    "n_patients": {"Description": "Patients evaluated (the pooled rows are not counted)"}}
    for metric in SUMMARY_METRICS:
        base = _COLUMN_DESCRIPTIONS[metric]
        units = {"Units": base["Units"]} if "Units" in base else {}
        descriptions[metric] = {"Description": f"Mean over patients of: {base['Description']}", **units}
        for side, bound in (("low", "lower"), ("high", "upper")):
            descriptions[f"{metric}_ci_{side}"] = {
                "Description": f"{bound.capitalize()} bound of the percentile-bootstrap {ci:.0%} CI of the mean "
                               f"{metric} (patients resampled; patients without a value dropped)", **units}
    return descriptions


def column_descriptions() -> dict[str, dict[str, str]]:
    """JSON-sidecar descriptions of the columns of ``evaluation.tsv``."""
    return dict(_COLUMN_DESCRIPTIONS)


def _as_float(value: object) -> float:
    return float("nan") if value is None or value == "n/a" else float(value)

