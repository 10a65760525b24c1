"""Writing a scan's novelty and probability maps with provenance sidecars."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from anomri import __version__
from anomri.io.atomic import write_json
from anomri.io.derivatives import ScanDerivatives, sidecar_path
from anomri.io.nifti import load_mask, load_nifti, read_data, save_volume
from anomri.io.voxels import read_snr
from anomri.maps.novelty import NoveltyModel
from anomri.maps.postprocess import PostProcessing, label_components
from anomri.maps.probability import HealthyNull
from anomri.models.checkpoint import file_sha256

logger = logging.getLogger(__name__)


def _generated_by() -> dict:
    return {"Name": "anomri", "Version": __version__}


def _provenance(scan: ScanDerivatives, sources: list[Path]) -> dict:
    """BIDS ``SpatialReference`` and ``Sources`` of a map of ``scan``, as BIDS URIs.

    Every map lies on the grid of the scan's mean b0, whose own sidecar names the source DWI.
    """
    return {"SpatialReference": scan.uri(scan.b0), "Sources": [scan.uri(path) for path in sources]}


def write_novelty_maps(model: NoveltyModel, scan: ScanDerivatives, model_path: str | Path) -> None:
    """Score every in-mask voxel of ``scan`` and write one map + sidecar per score."""
    img = load_nifti(scan.features, ndim=4)
    mask_img = load_nifti(scan.mask, ndim=3)
    fit = model.fit(read_data(img, scan.features), mask=read_data(mask_img, scan.mask) > 0)
    checkpoint_hash = file_sha256(model_path)
    for score in model.scores:
        path = scan.novelty(score.id)
        save_volume(path, fit.maps[score.id], mask_img)
        write_json(sidecar_path(path), {
            "Description": score.description,
            "Formula": score.formula,
            "SignConvention": "higher = more novel; 0 outside the brain mask",
            "ScoreId": score.id,
            "Model": {"Path": str(model_path), "SHA256": checkpoint_hash},
            "Settings": {"n_samples": model.n_samples, "seed": model.seed, "batch_size": model.batch_size},
            **_provenance(scan, [scan.features, scan.mask]),
            "GeneratedBy": _generated_by(),
        })
    logger.info("%s: wrote %d novelty maps", scan.prefix, len(model.scores))


def postprocessed_scores(scan: ScanDerivatives, score_id: str, postprocessing: PostProcessing) -> tuple:
    """A scan's post-processed score map: (volume, mask it is valid in, image)."""
    img = load_nifti(scan.novelty(score_id), ndim=3)
    mask = load_mask(scan.mask, img, scan.novelty(score_id))
    volume, mask = postprocessing.apply(read_data(img, scan.novelty(score_id)), mask, img.header.get_zooms())
    return volume, mask, img


def masked_features(scan: ScanDerivatives, mask: np.ndarray) -> np.ndarray:
    """A scan's q-space features at the voxels of ``mask`` (N, F)."""
    img = load_nifti(scan.features, ndim=4)
    return read_data(img, scan.features)[mask]


def write_probability_map(scan: ScanDerivatives, null: HealthyNull, null_path: str | Path,
                          levels: tuple[float, ...] = (0.01, 0.001), min_component_voxels: int = 1) -> None:
    """Write the lesion probability map 1 - p and a lesion mask per false-positive level.

    p is the calibrated tail probability of the post-processed score(s) among
    healthy calibration voxels (:class:`~anomri.maps.probability.HealthyNull`).
    The mask at level a holds the voxels with p <= a, so a fraction a of
    healthy voxels is flagged, less any connected component (26-connectivity)
    smaller than ``min_component_voxels``. A null with noisier calibration
    copies is first matched to the scan's SNR (:meth:`HealthyNull.matched`).
    """
    snr = read_snr(scan.features) if null.copies is not None else None
    null = null.matched(snr)
    processed = {k: postprocessed_scores(scan, k, null.postprocessing) for k in null.scores}
    _, mask, img = processed[null.scores[0]]
    features = masked_features(scan, mask) if null.tissue is not None else None
    log_p = null.log_tail_probability({k: volume[mask] for k, (volume, _, _) in processed.items()}, features)
    p = np.exp(log_p)
    probability = np.zeros(mask.shape, np.float32)
    probability[mask] = 1.0 - p
    save_volume(scan.probseg, probability, img)
    # float32 1 - p is 1 for every p below ~3e-8; -log10 p keeps ranking lesions far into the tail.
    evidence = np.zeros(mask.shape, np.float32)
    evidence[mask] = -log_p / np.log(10.0)
    save_volume(scan.neglog10p, evidence, img)
    calibration = {"Path": str(null_path), "SHA256": file_sha256(null_path), "ScanSNR": snr} | null.record()
    sources = [scan.novelty(k) for k in null.scores] + [scan.mask]
    if null.tissue is not None or null.copies is not None:
        sources.append(scan.features)
    write_json(sidecar_path(scan.probseg), {
        "Description": "Lesion probability 1 - p, with p the tail probability of the post-processed novelty "
                       "score among voxels of healthy calibration controls that the model never saw "
                       "(several scores are combined and the combination recalibrated; with tissue classes, "
                       "per-class nulls mixed by the voxel's class posteriors and recalibrated; generalised Pareto "
                       "tail beyond the top of the healthy null; 0 outside the post-processed brain mask). "
                       "Thresholding at 1 - a flags a fraction a of healthy voxels.",
        "Calibration": calibration,
        **_provenance(scan, sources),
        "GeneratedBy": _generated_by(),
    })
    write_json(sidecar_path(scan.neglog10p), {
        "Description": "-log10 p of the lesion probability map's calibrated tail probability p (0 outside the "
                       "post-processed brain mask): the same ranking as 1 - p without its float32 saturation "
                       "below p ~ 3e-8. Values >= 2 are the 1 % healthy false-positive level, >= 3 the 0.1 %.",
        "Calibration": {"Path": str(null_path), "SHA256": calibration["SHA256"]},
        **_provenance(scan, sources),
        "GeneratedBy": _generated_by(),
    })
    for level in levels:
        lesions = np.zeros(mask.shape, bool)
        lesions[mask] = p <= level
        lesions = remove_small_components(lesions, min_component_voxels)
        save_volume(scan.lesion_mask(level), lesions, img, dtype=np.uint8)
        write_json(sidecar_path(scan.lesion_mask(level)), {
            "Description": f"Voxels whose lesion probability exceeds 1 - {level:g}: a fraction {level:g} of "
                           "healthy calibration voxels is flagged at this level.",
            "Type": "Lesion",
            "FalsePositiveLevel": level,
            # The threshold on the statistic whose tail p is (ThresholdOn says which).
            "Threshold": null.final.quantile(level),
            "ThresholdOn": null.statistic,
            "MinComponentVoxels": min_component_voxels,
            "Connectivity": 26,
            "Calibration": {"Path": str(null_path), "SHA256": calibration["SHA256"]},
            **_provenance(scan, [scan.probseg]),
            "GeneratedBy": _generated_by(),
        })
    logger.info("%s: lesion probability from %s; %s", scan.prefix, "+".join(null.scores),
                ", ".join(f"{int((p <= a).sum())} voxels at p <= {a:g}" for a in levels))


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without its 26-connected components of fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1:
        return mask
    labels, _ = label_components(mask, 26)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def write_learned_probability(scan: ScanDerivatives, probability: np.ndarray, valid: np.ndarray, img,
                              model, settings: dict, fitted_on: str) -> np.ndarray:
    """Write the learned lesion probability of ``scan`` (its voxels in ``valid``); return the volume.

    ``model`` is the :class:`~anomri.maps.learned.LearnedCombination` that made it;
    ``fitted_on`` says which patients it saw (for a labelled patient, never itself).
    """
    volume = np.zeros(valid.shape, np.float32)
    volume[valid] = probability
    save_volume(scan.learned_probseg, volume, img)
    write_json(sidecar_path(scan.learned_probseg), {
        "Description": "Learned lesion probability P(lesion | x) = sigmoid(w . E + b), E_s = -log p_s the calibrated "
                       "per-score evidence; a logistic model fitted on labelled patients' voxels (opt-in). Its "
                       "prevalence is that of the labelled patients. 0 outside the post-processed brain mask.",
        "FittedOn": fitted_on,
        "Model": model.record(),
        "Settings": settings,
        **_provenance(scan, [scan.novelty(k) for k in model.scores] + [scan.mask]),
        "GeneratedBy": _generated_by(),
    })
    return volume
