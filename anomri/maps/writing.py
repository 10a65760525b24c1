"""Writing a scan's novelty and probability maps with provenance sidecars."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from anomri import __version__
from anomri.io.atomic import write_json
from anomri.io.derivatives import ScanDerivatives, sidecar_path
from anomri.io.nifti import load_mask, load_nifti, read_data, save_volume
from anomri.maps.novelty import NoveltyModel
from anomri.maps.postprocess import PostProcessing
from anomri.maps.probability import EmpiricalNull
from anomri.models.checkpoint import file_sha256

logger = logging.getLogger(__name__)


def _generated_by() -> dict:
    return {"Name": "anomri", "Version": __version__}


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
            "Sources": [str(scan.features), str(scan.mask)],
            "GeneratedBy": _generated_by(),
        })
    logger.info("%s: wrote %d novelty maps", scan.prefix, len(model.scores))


def postprocessed_scores(scan: ScanDerivatives, score_id: str, postprocessing: PostProcessing) -> tuple:
    """A scan's post-processed score map: (volume, mask it is valid in, image)."""
    img = load_nifti(scan.novelty(score_id), ndim=3)
    mask = load_mask(scan.mask, img, scan.novelty(score_id))
    volume, mask = postprocessing.apply(read_data(img, scan.novelty(score_id)), mask, img.header.get_zooms())
    return volume, mask, img


def write_probability_map(scan: ScanDerivatives, null: EmpiricalNull, score_id: str, null_path: str | Path) -> None:
    """Lesion probability = empirical CDF of the post-processed ``score_id`` among healthy calibration voxels."""
    volume, mask, img = postprocessed_scores(scan, score_id, null.postprocessing)
    probability = np.zeros(mask.shape, np.float32)
    probability[mask] = null.cdf(score_id, volume[mask])
    save_volume(scan.probseg, probability, img)
    write_json(sidecar_path(scan.probseg), {
        "Description": "Lesion probability: the empirical CDF of the post-processed novelty score among "
                       "voxels of healthy calibration controls that the model never saw (0 outside the "
                       "post-processed brain mask).",
        "Score": score_id,
        "PostProcessing": null.postprocessing.record(),
        "Calibration": {"Path": str(null_path), "SHA256": file_sha256(null_path),
                        "n_null_voxels": int(len(null.sorted[score_id]))},
        "Sources": [str(scan.novelty(score_id)), str(scan.mask)],
        "GeneratedBy": _generated_by(),
    })
