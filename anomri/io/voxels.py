"""Gathering in-mask voxel vectors from preprocessed scans."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from anomri.dmri.features import check_compatible
from anomri.io.derivatives import sidecar_path
from anomri.io.nifti import load_mask, load_nifti, read_data


def load_masked(volume_path: str | Path, mask_path: str | Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """In-mask values of a 3-D or 4-D volume: (N,) or (N, D), the mask, and the image."""
    img = load_nifti(volume_path)
    mask = load_mask(mask_path, img, volume_path)
    return read_data(img, volume_path)[mask], mask, img


def read_feature_description(features_path: str | Path) -> dict:
    """The feature sidecar written by preprocessing."""
    return json.loads(sidecar_path(features_path).read_text())


def read_snr(features_path: str | Path) -> float | None:
    """The scan's SNR recorded by preprocessing (:func:`anomri.dmri.noise.signal_to_noise`); None if unknown."""
    noise = read_feature_description(features_path).get("Preprocessing", {}).get("noise") or {}
    return noise.get("snr")


def pool_samples(
    feature_paths: list[str | Path], mask_paths: list[str | Path], max_per_scan: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pool in-mask feature vectors of several scans, at most ``max_per_scan`` from each.

    Sub-sampling is uniform within a scan and seeded, so every scan is
    represented equally however large it is.

    Returns
    -------
    samples : ndarray, (N, D) float32
    scan_index : ndarray, (N,) int
        Which scan (position in ``feature_paths``) each sample came from.
    description : dict
        The shared feature description; every scan must be compatible with
        the first one.
    """
    rng = np.random.default_rng(seed)
    description = read_feature_description(feature_paths[0])
    parts, index = [], []
    for k, (features, mask) in enumerate(zip(feature_paths, mask_paths, strict=True)):
        check_compatible(description, read_feature_description(features), features)
        values, _, _ = load_masked(features, mask)
        if max_per_scan is not None and len(values) > max_per_scan:
            values = values[np.sort(rng.choice(len(values), max_per_scan, replace=False))]
        parts.append(values)
        index.append(np.full(len(values), k))
    return np.concatenate(parts).astype(np.float32), np.concatenate(index), description
