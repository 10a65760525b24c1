"""Calibration: the healthy null of held-out control scans, and of their noisier copies.

``anomri calibrate`` calls :func:`calibrate`; ``anomri learn-combination``
gathers the same voxels with :func:`calibration_voxels`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomri.errors import InputError
from anomri.io.derivatives import ScanDerivatives
from anomri.io.voxels import read_feature_description, read_snr
from anomri.maps.postprocess import PostProcessing
from anomri.maps.probability import CalibrationCopy, HealthyNull
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
    """

    values: dict[str, np.ndarray]
    features: np.ndarray | None
    copies: list[CalibrationCopy]
    copy_index: np.ndarray


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
                values[k].append(volume[mask])
            if with_features:
                features.append(masked_features(scan, mask))
            index.append(np.full(int(mask.sum()), len(copies), np.int32))
            copies.append(_copy(scan) if augmented else CalibrationCopy(prefix, 1.0, None))
    return CalibrationVoxels({k: np.concatenate(v) for k, v in values.items()},
                             np.concatenate(features) if with_features else None, copies, np.concatenate(index))


def _copy(scan: ScanDerivatives) -> CalibrationCopy:
    """A scan's noise factor and SNR, from the sidecar preprocessing wrote."""
    factor = read_feature_description(scan.features).get("Preprocessing", {}).get("noise_augmentation", {}).get(
        "factor", 1.0)
    return CalibrationCopy(scan.prefix, float(factor), read_snr(scan.features))


def calibrate(derivatives_dir: str | Path, prefixes: Sequence[str], scores: Sequence[str],
              postprocessing: PostProcessing, *, tail_fraction: float = default("probability.tail_fraction"),
              combination: str = default("probability.combination"),
              tissue_classes: int = default("probability.tissue_classes"), seed: int = default("probability.seed"),
              augmented: Sequence[str | Path] = ()) -> HealthyNull:
    """The healthy null of the calibration scans (and their noisier copies, for :meth:`HealthyNull.matched`).

    Tissue classes are fitted to the voxels of the scans as measured, so
    adding copies leaves the classes unchanged. Raises
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
                           log_posterior, *((voxels.copies, voxels.copy_index) if augmented else (None, None)))
    except ValueError as exc:
        raise InputError(", ".join(prefixes), f"cannot calibrate: {exc}") from exc
    logger.info("calibration null of %s from %d voxels of %d held-out controls and %d noisier copies, "
                "%d tissue class(es)", "+".join(scores), int(measured.sum()), len(prefixes),
                len(voxels.copies) - len(prefixes), tissue_classes)
    return null
