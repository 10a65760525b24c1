"""Gathering in-mask voxel vectors from preprocessed scans."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

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


def read_preprocessing(features_path: str | Path) -> dict:
    """The ``Preprocessing`` record of a feature sidecar; empty when there is no sidecar (maps made elsewhere)."""
    if not sidecar_path(features_path).exists():
        return {}
    return read_feature_description(features_path).get("Preprocessing", {})


def read_snr(features_path: str | Path) -> float | None:
    """The scan's SNR recorded by preprocessing (:func:`anomri.dmri.noise.signal_to_noise`); None if unknown."""
    return (read_preprocessing(features_path).get("noise") or {}).get("snr")
