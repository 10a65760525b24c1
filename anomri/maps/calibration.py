"""Calibration: the healthy null of every control's out-of-fold scores, and of their noisier copies.

With cross-fitting (:mod:`anomri.io.cohort`) each control's maps come from
the fold model that never trained on it, so the null pools as many healthy
people as the cohort has controls. ``anomri calibrate`` calls
:func:`calibrate`; ``anomri learn-combination`` gathers the same voxels with
:func:`calibration_voxels`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomri.errors import InputError
from anomri.io.derivatives import ScanDerivatives
from anomri.io.voxels import read_preprocessing, read_snr
from anomri.maps.postprocess import PostProcessing
from anomri.maps.probability import CalibrationCopy, HealthyNull, participant
from anomri.maps.quality import subject_shift
from anomri.maps.tissue import TissueModel
from anomri.maps.writing import masked_features, postprocessed_scores
from anomri.settings import default

logger = logging.getLogger(__name__)


@dataclass
class CalibrationVoxels:
    """Post-processed scores of calibration voxels, their q-space features and which copy each came from.

    Attributes
    ----------
    values : dict of str to ndarray
        Score id to the (N,) post-processed scores, every score listing the same voxels.
    features : ndarray, (N, F) or None
        Their q-space features (only gathered when tissue classes need them).
    copies : list of CalibrationCopy
        The scans as measured, then each noisier copy found.
    copy_index : ndarray, (N,)
        Index into ``copies`` of each voxel.
    uncentred : dict of str to ndarray or None
        The scores before each scan's centring (None when the post-processing does not centre).
    """

    values: dict[str, np.ndarray]
    features: np.ndarray | None
    copies: list[CalibrationCopy]
    copy_index: np.ndarray
    uncentred: dict[str, np.ndarray] | None = None


def calibration_voxels(derivatives_dir: str | Path, prefixes: Sequence[str], scores: Sequence[str],
                       postprocessing: PostProcessing, with_features: bool,
                       augmented: Sequence[str | Path] = ()) -> CalibrationVoxels:
    """Gather the calibration scans' post-processed scores, and those of their copies in ``augmented`` trees.

    ``augmented`` are derivative trees of noisier copies (``anomri preprocess
    --noise-factor``, then ``anomri score``); a scan missing from a tree is skipped.
    """
    trees = [(Path(derivatives_dir), True)] + [(Path(t), False) for t in augmented]
    values: dict[str, list[np.ndarray]] = {k: [] for k in scores}
    features, copies, index = [], [], []
    for tree, measured in trees:
        for prefix in prefixes:
            scan = ScanDerivatives(tree, prefix)
            if not measured and not scan.features.exists():
                continue
            processed = [postprocessed_scores(scan, k, postprocessing) for k in scores]
            # Every score of a scan is valid in the same post-processed mask.
            mask = processed[0][1]
            for k, (volume, _, _) in zip(scores, processed):
                values[k].append(volume[mask])  # before centring: the null's values are centred below
            if with_features:
                features.append(masked_features(scan, mask))
            index.append(np.full(int(mask.sum()), len(copies), np.int32))
            copies.append(_copy(scan))
    centred = {k: np.concatenate([postprocessing.centre(part) for part in v]) for k, v in values.items()}
    uncentred = {k: np.concatenate(v) for k, v in values.items()} if postprocessing.centring != "none" else None
    return CalibrationVoxels(centred, np.concatenate(features) if with_features else None, copies,
                             np.concatenate(index), uncentred)


def _copy(scan: ScanDerivatives) -> CalibrationCopy:
    """A scan's noise factor and SNR, from the sidecar preprocessing wrote."""
    factor = read_preprocessing(scan.features).get("noise_augmentation", {}).get("factor", 1.0)
    return CalibrationCopy(scan.prefix, float(factor), read_snr(scan.features))


def calibrate(derivatives_dir: str | Path, prefixes: Sequence[str], scores: Sequence[str],
              postprocessing: PostProcessing, *, tail_fraction: float = default("probability.tail_fraction"),
              combination: str = default("probability.combination"),
              tissue_classes: int = default("probability.tissue_classes"), seed: int = default("probability.seed"),
              unit: str = default("probability.calibration_unit"), augmented: Sequence[str | Path] = ()) -> HealthyNull:
    """The healthy null of the controls' out-of-fold maps (and their noisier copies, for :meth:`HealthyNull.matched`).

    Tissue classes are fitted to the voxels of the scans as measured, so
    adding copies leaves the classes unchanged. ``unit`` is what p counts,
    pooled healthy voxels or healthy people (:data:`anomri.maps.probability.UNITS`).
    Every control's own subject shift is measured as a new person's would be,
    against the null of the *other* controls matched to its SNR
    (:func:`control_shifts`): the range the out-of-distribution check compares
    scans with. Raises
    :class:`~anomri.errors.InputError` when the voxels cannot be calibrated.
    """
    if tissue_classes < 1:
        raise InputError("--tissue-classes", f"must be at least 1; got {tissue_classes}")
    voxels = calibration_voxels(derivatives_dir, prefixes, scores, postprocessing, tissue_classes > 1, augmented)
    measured = voxels.copy_index < len(prefixes)
    tissue = log_posterior = None
    try:
        if tissue_classes > 1:
            tissue = TissueModel.fit(voxels.features[measured], tissue_classes, seed)
            log_posterior = tissue.log_posterior(voxels.features)
        null = HealthyNull(voxels.values, postprocessing, tail_fraction, combination, list(prefixes), tissue,
                           log_posterior, voxels.copies, voxels.copy_index, uncentred=voxels.uncentred, unit=unit)
        if len({participant(p) for p in prefixes}) > 1:
            null.control_shifts = control_shifts(null, voxels.features)
    except ValueError as exc:
        raise InputError(", ".join(prefixes), f"cannot calibrate: {exc}") from exc
    logger.info("calibration null of %s from %d voxels of %d controls' out-of-fold maps and %d noisier copies, "
                "%d tissue class(es); controls' out-of-fold shifts %s", "+".join(scores), int(measured.sum()),
                len(prefixes), len(voxels.copies) - len(prefixes), tissue_classes,
                ", ".join(f"{k} {v:.2f}" for k, v in null.control_shifts.items()))
    return null


def control_shifts(null: HealthyNull, features: np.ndarray | None) -> dict[str, float]:
    """Every calibration scan's subject shift against the null of the other participants, matched to its SNR.

    ``features`` are the q-space features of the null's voxels (None without
    tissue classes). The probability map of a control is computed the same
    way (:func:`anomri.maps.writing.write_probability_map`), so its sidecar
    reports the same shift.
    """
    shifts = {}
    for copy in null.copies:
        if copy.factor != 1.0:
            continue
        voxels = null.scan_voxels(copy.scan)
        others = null.matched(copy.snr, exclude=[participant(copy.scan)]).shift_null()
        scores = null.values if null.uncentred is None else null.uncentred
        log_p = others.log_tail_probability({k: v[voxels] for k, v in scores.items()},
                                            None if features is None else features[voxels])
        shifts[copy.scan] = subject_shift(log_p)
    return shifts
