"""Writing a scan's novelty and probability maps with provenance sidecars."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import logsumexp

from anomri import __version__
from anomri.io.atomic import write_json
from anomri.io.checksum import file_sha256
from anomri.io.derivatives import ScanDerivatives, sidecar_path
from anomri.io.nifti import load_mask, load_nifti, read_data, save_volume
from anomri.io.voxels import read_snr
from anomri.maps.postprocess import MASK_CONNECTIVITY, PostProcessing, label_components
from anomri.maps.probability import HealthyNull, participant
from anomri.maps.quality import ShiftCheck, check_shift, subject_shift
from anomri.settings import default

if TYPE_CHECKING:  # the model layer imports torch and MONAI, which the probability jobs never need
    from anomri.maps.novelty import NoveltyModel

logger = logging.getLogger(__name__)


def _generated_by() -> dict:
    return {"Name": "anomri", "Version": __version__}


def _provenance(scan: ScanDerivatives, sources: list[Path]) -> dict:
    """BIDS ``SpatialReference`` and ``Sources`` of a map of ``scan``, as BIDS URIs.

    Every map lies on the grid of the scan's mean b0, whose own sidecar names the source DWI.
    """
    return {"SpatialReference": scan.uri(scan.b0), "Sources": [scan.uri(path) for path in sources]}


def write_novelty_maps(models: Sequence[NoveltyModel], scan: ScanDerivatives, model_paths: Sequence[str | Path],
                       fold_maps: Sequence[str | Path] = (), fold_scores: Sequence[str] = ()) -> None:
    """Score every in-mask voxel of ``scan`` with each model; write one map + sidecar per score.

    The first model gives the scan its maps, of every score of that model. With
    ``fold_maps`` (one derivative tree per model: the cross-fitting folds'
    models, none of which trained on the scan), each model's own maps of
    ``fold_scores`` are also written there, for the cross-conformal lesion
    probability; the other models need compute only those scores.
    """
    if fold_maps and len(fold_maps) != len(models):
        raise ValueError(f"{len(fold_maps)} fold-map trees for {len(models)} models")
    img = load_nifti(scan.features, ndim=4)
    mask_img = load_nifti(scan.mask, ndim=3)
    data, brain = read_data(img, scan.features), read_data(mask_img, scan.mask) > 0
    fits = [model.fit(data, mask=brain) for model in models]
    checkpoints = [{"Path": str(path), "SHA256": file_sha256(path)} for path in model_paths]
    first = models[0]
    settings = {"n_samples": first.n_samples, "seed": first.seed, "batch_size": first.batch_size}

    def write(target: ScanDerivatives, score, volume: np.ndarray, checkpoint: dict) -> None:
        path = target.novelty(score.id)
        save_volume(path, volume, mask_img)
        write_json(sidecar_path(path), {
            "Description": score.description,
            "Formula": score.formula,
            "SignConvention": "higher = more novel; 0 outside the brain mask",
            "ScoreId": score.id,
            "Model": checkpoint,
            "Settings": settings,
            **_provenance(scan, [scan.features, scan.mask]),
            "GeneratedBy": _generated_by(),
        })

    for score in first.scores:
        write(scan, score, fits[0].maps[score.id], checkpoints[0])
    for tree, model, fit, checkpoint in zip(fold_maps, models, fits, checkpoints):
        for score in (s for s in model.scores if s.id in fold_scores):
            write(ScanDerivatives(Path(tree), scan.prefix), score, fit.maps[score.id], checkpoint)
    logger.info("%s: wrote %d novelty maps%s", scan.prefix, len(first.scores),
                f" and {len(fold_scores)} per fold model for {len(models)} models" if fold_maps else "")


def postprocessed_scores(scan: ScanDerivatives, score_id: str, postprocessing: PostProcessing,
                         maps: ScanDerivatives | None = None) -> tuple:
    """A scan's post-processed score map *before centring*: (volume, mask it is valid in, image).

    ``postprocessing.centre(volume[mask])`` gives the values the null compares. ``maps`` is where the novelty
    map lies when not beside the scan's brain mask (a fold model's tree).
    """
    path = (maps or scan).novelty(score_id)
    img = load_nifti(path, ndim=3)
    mask = load_mask(scan.mask, img, path)
    volume, mask = postprocessing.apply(read_data(img, path), mask, img.header.get_zooms(), centre=False)
    return volume, mask, img


def masked_features(scan: ScanDerivatives, mask: np.ndarray) -> np.ndarray:
    """A scan's q-space features at the voxels of ``mask`` (N, F)."""
    img = load_nifti(scan.features, ndim=4)
    return read_data(img, scan.features)[mask]


#: What thresholding the map at 1 - a means, per calibration unit (:data:`anomri.maps.probability.UNITS`).
UNIT_MEANING = {
    "voxel": "Thresholding at 1 - a flags a fraction a of healthy voxels, on average over healthy people.",
    "subject": "p is the largest of the healthy controls' own tail probabilities (calibration unit 'subject'): "
               "thresholding at 1 - a flags at most a fraction a of any control's voxels, and a new healthy "
               "person beyond a with probability at most 1 / (n + 1) for n controls in the null.",
}


def write_probability_map(scan: ScanDerivatives, null: HealthyNull, null_path: str | Path,
                          levels: tuple[float, ...] = (0.01, 0.001), min_component_voxels: int = 1,
                          fold_maps: Sequence[str | Path] = (),
                          ood_margin: float = default("probability.ood_margin")) -> ShiftCheck:
    """Write the lesion probability map 1 - p and a lesion mask per false-positive level; return the shift check.

    p is the calibrated tail probability of the post-processed score(s) among
    healthy voxels (:class:`~anomri.maps.probability.HealthyNull`), matched to
    the scan's SNR (:meth:`HealthyNull.matched`). A control's own scans are
    left out of the null, so its map is what a new person's would be. With
    ``fold_maps`` (the derivative trees where each fold model wrote this
    scan's maps), p is the mean of the fold models' p: the cross-conformal
    p-value. The mask at level a holds the voxels with p <= a, less any
    connected component (26-connectivity) smaller than ``min_component_voxels``.
    The scan's shift is checked against the controls' out-of-fold range
    (:func:`anomri.maps.quality.check_shift`) and reported in the log and sidecar.
    """
    snr = read_snr(scan.features)
    own = participant(scan.prefix)
    left_out = [own] if any(participant(s) == own for s in null.scans) else []
    null = null.matched(snr, left_out)
    shift_null = null.shift_null()
    pp = null.postprocessing
    trees = [ScanDerivatives(Path(tree), scan.prefix) for tree in fold_maps] or [scan]
    log_ps, shift_log_ps = [], []
    for tree in trees:
        processed = {k: postprocessed_scores(scan, k, pp, tree) for k in null.scores}
        _, mask, img = processed[null.scores[0]]
        features = masked_features(scan, mask) if null.tissue is not None else None
        raw = {k: volume[mask] for k, (volume, _, _) in processed.items()}
        log_ps.append(null.log_tail_probability({k: pp.centre(v) for k, v in raw.items()}, features))
        shift_log_ps.append(log_ps[-1] if shift_null is null else shift_null.log_tail_probability(raw, features))
    # Cross-conformal: the mean of the fold models' p (one model: its own p).
    log_p = logsumexp(log_ps, axis=0) - np.log(len(log_ps))
    p = np.exp(log_p)
    shift = subject_shift(logsumexp(shift_log_ps, axis=0) - np.log(len(shift_log_ps)))
    check = check_shift(shift, null.control_shifts, own, ood_margin)
    probability = np.zeros(mask.shape, np.float32)
    probability[mask] = 1.0 - p
    save_volume(scan.probseg, probability, img)
    # float32 1 - p is 1 for every p below ~3e-8; -log10 p keeps ranking lesions far into the tail.
    evidence = np.zeros(mask.shape, np.float32)
    evidence[mask] = -log_p / np.log(10.0)
    save_volume(scan.neglog10p, evidence, img)
    calibration = {"Path": str(null_path), "SHA256": file_sha256(null_path), "ScanSNR": snr,
                   "LeftOut": left_out, "FoldMaps": [scan.uri(t.dir) for t in trees if t is not scan]} | null.record()
    sources = [t.novelty(k) for t in trees for k in null.scores] + [scan.mask, scan.features]
    flagged = {level: float(np.mean(p <= level)) for level in levels}
    quality = check.record() | {"SNR": snr, "FlaggedFraction": {f"{level:g}": f for level, f in flagged.items()}}
    write_json(sidecar_path(scan.probseg), {
        "Description": "Lesion probability 1 - p, with p the tail probability of the post-processed novelty "
                       "score among voxels of healthy controls scored by models that never trained on them "
                       "(cross-fitting; a control's own scans left out; several fold models' p averaged; several "
                       "scores combined and recalibrated; with tissue classes, per-class nulls mixed by the "
                       "voxel's class posteriors and recalibrated; generalised Pareto tail beyond the top of the "
                       "healthy null; 0 outside the post-processed brain mask). " + UNIT_MEANING[null.unit],
        "Calibration": calibration,
        "QualityCheck": quality,
        **_provenance(scan, sources),
        "GeneratedBy": _generated_by(),
    })
    write_json(sidecar_path(scan.neglog10p), {
        "Description": "-log10 p of the lesion probability map's calibrated tail probability p (0 outside the "
                       "post-processed brain mask): the same ranking as 1 - p without its float32 saturation "
                       "below p ~ 3e-8. Values >= 2 are the 1 % healthy false-positive level, >= 3 the 0.1 %.",
        "Calibration": {"Path": str(null_path), "SHA256": calibration["SHA256"]},
        "QualityCheck": quality,
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
                           "healthy voxels is flagged at this level"
                           + (" (this scan is out of distribution: see QualityCheck)." if check.out_of_distribution
                              else "."),
            "Type": "Lesion",
            "FalsePositiveLevel": level,
            # The threshold on the statistic whose tail p is (ThresholdOn says which); with several fold models
            # p is their mean, so it holds for each model's p alone.
            "Threshold": null.final.quantile(level),
            "ThresholdOn": null.statistic,
            "MinComponentVoxels": min_component_voxels,
            "Connectivity": MASK_CONNECTIVITY,
            "QualityCheck": quality,
            "Calibration": {"Path": str(null_path), "SHA256": calibration["SHA256"]},
            **_provenance(scan, [scan.probseg]),
            "GeneratedBy": _generated_by(),
        })
    logger.info("%s: lesion probability from %s (%d fold model%s%s); %s", scan.prefix, "+".join(null.scores),
                len(trees), "s" if len(trees) > 1 else "", f", {own} left out of the null" if left_out else "",
                ", ".join(f"{100 * f:.2f} % of the brain at p <= {a:g}" for a, f in flagged.items()))
    log = logger.warning if check.out_of_distribution else logger.info
    log("%s: %s%s", scan.prefix, check.message(tuple(levels)),
        "; OUT OF DISTRIBUTION: its lesion masks are not reliable" if check.out_of_distribution else "")
    return check


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without its connected components (:data:`MASK_CONNECTIVITY`) of fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1:
        return mask
    labels, _ = label_components(mask, MASK_CONNECTIVITY)
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
