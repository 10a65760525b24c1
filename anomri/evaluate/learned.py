"""Learning the combination of scores on labelled patients, cross-validated leave one patient out.

:mod:`anomri.maps.learned` holds the model; this module runs it on a cohort:
fit every score's healthy null on the calibration controls, turn each scan's
scores into evidence, fit one model per left-out patient and one on all of
them, write every probability map and evaluate the out-of-fold maps against
the lesion masks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomri.errors import InputError
from anomri.evaluate.metrics import auprc, auroc, best_dice
from anomri.evaluate.table import load_patient
from anomri.io.atomic import write_json
from anomri.io.derivatives import ScanDerivatives
from anomri.maps.calibration import calibration_voxels
from anomri.maps.learned import LearnedCombination, leave_one_patient_out, score_evidence
from anomri.maps.postprocess import PostProcessing
from anomri.maps.probability import HealthyNull
from anomri.maps.writing import masked_features, postprocessed_scores, write_learned_probability

logger = logging.getLogger(__name__)

__all__ = ["cross_validate"]


def _score_nulls(derivatives_dir: str | Path, calibration: Sequence[str], scores: Sequence[str],
                 postprocessing: PostProcessing, tissue_classes: int, seed: int, tail_fraction: float,
                 combination: str, out: str | Path) -> tuple[dict[str, HealthyNull], bool]:
    """One healthy null per score on the calibration controls, and whether they need each voxel's features."""
    voxels = calibration_voxels(derivatives_dir, calibration, scores, postprocessing, tissue_classes > 1)
    nulls, tissue = {}, None
    for k, v in voxels.values.items():
        # Every score's null lists the same calibration voxels: one tissue model serves them all.
        try:
            nulls[k] = HealthyNull.fit({k: v}, voxels.features, tissue_classes=tissue_classes, seed=seed,
                                       tissue=tissue, postprocessing=postprocessing, tail_fraction=tail_fraction,
                                       combination=combination, scans=calibration)
        except ValueError as exc:
            raise InputError(out, f"cannot calibrate: {exc}") from exc
        tissue = nulls[k].tissue
    return nulls, voxels.features is not None


def cross_validate(derivatives_dir: str | Path, calibration: Sequence[str], scans: Sequence[tuple[str, str | Path]],
                   scores: Sequence[str], postprocessing: PostProcessing, *, C: float, tissue_classes: int, seed: int,
                   tail_fraction: float, combination: str, apply: Sequence[str], out: str | Path) -> dict:
    """Learn the combination of ``scores`` on labelled patients; write its maps and a JSON record.

    Each labelled patient's map comes from the model fitted on the other
    labelled patients (leave-one-patient-out) and is evaluated against its
    lesion mask; the scans of ``apply`` get the model fitted on all of them.

    Parameters
    ----------
    derivatives_dir : path
        Derivatives tree holding every scan's novelty maps.
    calibration : sequence of str
        Prefixes of the calibration controls, whose voxels fit each score's healthy null.
    scans : sequence of (str, path)
        Labelled patients: prefix and lesion mask (at least 2).
    scores : sequence of str
        Score ids, the evidence columns.
    postprocessing : PostProcessing
        Applied to every score map before calibration and evidence.
    C : float
        Inverse L2 penalty strength of the logistic model (positive).
    tissue_classes : int
        Calibrate each of this many tissue classes on its own (1: one null per score).
    seed : int
        Seed of the tissue-class mixture.
    tail_fraction : float
        Fraction of each null modelled by its generalised Pareto tail.
    combination : {"fisher", "tippett"}
        Passed to every null (checked; with one score each, nothing is combined).
    apply : sequence of str
        Prefixes of other scans to map with the all-patient model.
    out : path
        JSON file: settings, the all-patient model, each fold's model and the out-of-fold metrics.

    Returns
    -------
    dict
        What was written to ``out``.

    Raises
    ------
    InputError
        When the nulls cannot be fitted (names ``out``) or the labelled patients cannot be cross-validated
        (names ``--scan``).
    """
    nulls, with_features = _score_nulls(derivatives_dir, calibration, scores, postprocessing, tissue_classes, seed,
                                        tail_fraction, combination, out)

    def evidence(scan: ScanDerivatives) -> tuple[np.ndarray, np.ndarray, object]:
        """The scan's score evidence (N, S), the post-processed mask holding its N voxels, and the image grid."""
        processed = {k: postprocessed_scores(scan, k, postprocessing) for k in scores}
        _, valid, img = processed[scores[0]]
        voxels = masked_features(scan, valid) if with_features else None
        centred = {k: postprocessing.centre(v[valid]) for k, (v, _, _) in processed.items()}
        return score_evidence(nulls, centred, voxels), valid, img

    patients = [load_patient(derivatives_dir, prefix, lesion) for prefix, lesion in scans]
    grids = [evidence(p.scan) for p in patients]
    inputs = (scores, [e for e, _, _ in grids], [p.lesion[valid] for p, (_, valid, _) in zip(patients, grids)],
              [p.prefix for p in patients])
    try:
        folds = leave_one_patient_out(*inputs, C)
        final = LearnedCombination.fit(*inputs, C)
    except ValueError as exc:
        raise InputError("--scan", str(exc)) from exc
    settings = {"postprocessing": postprocessing.record(), "tissue_classes": tissue_classes,
                "calibration_scans": list(calibration), "evidence": "-log p per score (one-score healthy nulls)"}
    cross_validation = {}
    for patient, (ev, valid, img), fold in zip(patients, grids, folds, strict=True):
        volume = write_learned_probability(patient.scan, fold.predict(ev), valid, img, fold, settings,
                                           f"leave-one-patient-out fold without {patient.prefix}")
        x, y = volume[patient.brain], patient.lesion[patient.brain]
        cross_validation[patient.prefix] = {"auroc": auroc(x, y), "auprc": auprc(x, y),
                                            "best_dice": best_dice(x, y)[0]}
        logger.info("%s: learned combination out of fold: AUROC %.4f, AUPRC %.3f, best Dice %.3f", patient.prefix,
                    *cross_validation[patient.prefix].values())
    for prefix in apply:
        scan = ScanDerivatives(derivatives_dir, prefix)
        ev, valid, img = evidence(scan)
        write_learned_probability(scan, final.predict(ev), valid, img, final, settings, "all labelled patients")
    record = settings | {"model": final.record(), "cross_validation": cross_validation,
                         "folds": {p.prefix: f.record() for p, f in zip(patients, folds)}}
    write_json(out, record)
    return record
