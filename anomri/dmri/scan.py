"""Preprocess one scan end to end: validate, mask, denoise, normalise, extract features.

Writes the brain mask (voxels with a usable S0), the mean b0 (the anatomical
reference for overlays) and the 4-D features (0 outside the mask) whose
sidecar lists the feature names, the representation and the acquisition
scheme they depend on. Paths follow :mod:`anomri.io.derivatives`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from anomri import __version__
from anomri.dmri.context import add_context
from anomri.dmri.features import FeatureSet, compute_features
from anomri.dmri.gradients import load_gradient_table
from anomri.dmri.preprocess import brain_mask, denoise, normalize_by_b0
from anomri.errors import InputError
from anomri.io.atomic import write_json
from anomri.io.derivatives import ScanDerivatives, sidecar_path
from anomri.io.nifti import load_mask, load_nifti, read_data, save_volume

logger = logging.getLogger(__name__)


def preprocess_scan(
    dwi: str | Path,
    bval: str | Path,
    bvec: str | Path,
    outputs: ScanDerivatives,
    mask: str | Path | None = None,
    lesion_mask: str | Path | None = None,
    b0_threshold: float = 50.0,
    denoising: str = "none",
    representation: str = "raw",
    context: str = "none",
    context_radius: int = 1,
) -> FeatureSet:
    """Validate and preprocess one scan, writing ``outputs``.

    Everything is checked before anything is written, so bad input leaves no
    partial outputs; each output is written atomically. ``context`` and
    ``context_radius`` optionally append in-mask neighbourhood statistics
    (:func:`anomri.dmri.context.add_context`).

    Raises
    ------
    InputError
        Any problem with the inputs, naming the file.
    """
    dwi = Path(dwi)
    img = load_nifti(dwi, ndim=4)
    gtab = load_gradient_table(bval, bvec, img.shape[3], b0_threshold)
    data = read_data(img, dwi)
    if lesion_mask is not None:
        load_mask(lesion_mask, img, dwi)
    if mask is not None:
        brain = load_mask(mask, img, dwi)
    else:
        brain = brain_mask(data, gtab)
    if not brain.any():
        raise InputError(mask or dwi, "the brain mask is empty")
    data = denoise(data, gtab, denoising, brain)
    norm = normalize_by_b0(data, gtab, brain)
    if not norm.mask.any():
        raise InputError(dwi, "no brain voxel has a usable b0 signal")
    features = add_context(compute_features(norm, gtab, representation), norm.mask, context, context_radius)

    save_volume(outputs.mask, norm.mask, img, dtype=np.uint8)
    save_volume(outputs.b0, norm.mean_b0, img)
    save_volume(outputs.features, features.data, img)
    write_json(
        sidecar_path(outputs.features),
        {
            **features.description(),
            "Sources": [str(dwi), str(bval), str(bvec)] + ([str(mask)] if mask else []),
            "Preprocessing": {"b0_threshold": b0_threshold, "denoising": denoising,
                              "brain_mask": "provided" if mask else "median_otsu"},
            "GeneratedBy": {"Name": "anomri", "Version": __version__},
        },
    )
    logger.info("%s: %d brain voxels, %d features (%s)", dwi.name, int(norm.mask.sum()), len(features.names),
                representation)
    return features
