"""The evaluation of a whole cohort's maps: the tables, the curves and the unseen healthy scans, in one call."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from anomri.evaluate import healthy, table
from anomri.io.atomic import write_json

logger = logging.getLogger(__name__)

__all__ = ["write_evaluation"]


def write_evaluation(derivatives_dir: str | Path, scans: Sequence[tuple[str, str | Path]], scores: Sequence[str],
                     calibration: Sequence[str], *, fpr: float, bootstrap: int, seed: int, min_lesion_overlap: float,
                     healthy_scans: Sequence[str], levels: Sequence[float], out: str | Path, summary: str | Path,
                     curves: str | Path, healthy_out: str | Path) -> None:
    """Evaluate every score map and the lesion probability of the labelled patients; write the results.

    Parameters
    ----------
    derivatives_dir : path
    scans : sequence of (str, path)
        Patients: prefix and lesion mask.
    scores : sequence of str
        Score ids; the lesion probability (:data:`anomri.evaluate.table.PROBABILITY`) is evaluated too.
    calibration : sequence of str
        The controls: their out-of-fold maps set each map kind's healthy-FPR threshold.
    fpr : float
        Fraction of the calibration controls' brain voxels flagged at that threshold, in (0, 1).
    bootstrap : int
        Bootstrap resamples of the cohort summary.
    seed : int
        Seed of the bootstrap.
    min_lesion_overlap : float
        Share of a lesion's voxels to flag for it to count as detected, in [0, 1].
    healthy_scans : sequence of str
        Controls, whose out-of-fold (leave-subject-out) realised false-positive rate is reported (with the
        patients whose lesion mask is empty).
    levels : sequence of float
        Levels of the lesion masks whose realised false-positive rate is reported.
    out, summary, curves, healthy_out : path
        Per-patient and pooled table, cohort summary table (.tsv), ROC and PR points (.json), and the realised
        false-positive rates of unseen healthy scans (.tsv).
    """
    map_ids = [*scores, table.PROBABILITY]
    thresholds = {m: table.calibration_threshold(derivatives_dir, calibration, m, fpr) for m in map_ids}
    patients = [table.load_patient(derivatives_dir, prefix, lesion) for prefix, lesion in scans]
    rows, curve_points = table.evaluate_cohort(patients, map_ids, thresholds, min_overlap=min_lesion_overlap)
    table.write_table(out, rows, table.COLUMNS, table.column_descriptions())
    table.write_table(summary, table.summarise(rows, bootstrap, seed=seed), table.summary_columns(),
                      table.summary_descriptions())
    write_json(curves, {"fpr": fpr, "calibration": calibration, "maps": curve_points})
    # Healthy subjects nothing they are judged by saw: every control out of fold, and patients without lesions.
    unseen = list(healthy_scans) + [p.prefix for p in patients if not p.lesion.any()]
    table.write_table(healthy_out, healthy.healthy_rows(derivatives_dir, unseen, levels, healthy_scans),
                      healthy.COLUMNS, healthy.DESCRIPTIONS)
    logger.info("evaluated %d maps of %d patients at the %g healthy-FPR thresholds of %d controls; "
                "false-positive rate of %d healthy scans, out of fold", len(map_ids), len(patients), fpr,
                len(calibration), len(unseen))
