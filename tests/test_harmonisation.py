"""Per-subject feature harmonisation: invariance to per-feature scales, robustness to lesions, physics."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CliResult, SyntheticScan
from dipy.core.gradients import gradient_table

from anomri.dmri.augmentation import scale_diffusivity
from anomri.dmri.features import FeatureSet, check_compatible, compute_features
from anomri.dmri.harmonisation import harmonise
from anomri.dmri.preprocess import NormalizedDWI
from anomri.errors import InputError

NAMES = ["b1000_l0", "b1000_l2", "b2500_l0"]


def lognormal_features(shape: tuple[int, ...], seed: int) -> tuple[FeatureSet, np.ndarray]:
    """Positive, skewed features (like SH power) and an irregular brain mask."""
    rng = np.random.default_rng(seed)
    data = np.exp(rng.normal(0.0, 0.3, shape + (len(NAMES),)) + np.array([0.0, -3.0, -1.0])).astype(np.float32)
    return FeatureSet(data, list(NAMES), "sh-invariant", {"shells": ["b1000", "b2500"]}), rng.random(shape) < 0.7


def test_a_per_feature_scale_is_removed_and_the_brain_median_becomes_one() -> None:
    features, mask = lognormal_features((12, 10, 8), seed=0)
    scales = np.array([0.8, 1.3, 0.6], np.float32)
    scaled = FeatureSet(features.data * scales, features.names, features.representation, features.scheme)
    a, b = harmonise(features, mask, "median"), harmonise(scaled, mask, "median")
    np.testing.assert_allclose(a.data[mask], b.data[mask], rtol=1e-5)
    np.testing.assert_allclose(np.median(a.data[mask].astype(np.float64), 0), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a.data[~mask], features.data[~mask])  # outside the brain: untouched
    np.testing.assert_allclose(np.array(b.harmonisation["Divisors"]) / a.harmonisation["Divisors"], scales, rtol=1e-4)
    assert harmonise(features, mask, "none") is features


def test_a_lesion_barely_moves_the_divisor() -> None:
    # 3 % of the brain loses 80 % of every feature: the median moves about half as far as the mean.
    features, mask = lognormal_features((16, 16, 12), seed=1)
    lesioned = features.data.copy()
    brain = np.flatnonzero(mask.ravel())
    hit = np.random.default_rng(2).choice(brain, size=int(0.03 * brain.size), replace=False)
    lesioned.reshape(-1, len(NAMES))[hit] *= 0.2
    lesion_set = FeatureSet(lesioned, features.names, features.representation, features.scheme)
    before = np.array(harmonise(features, mask, "median").harmonisation["Divisors"])
    after = np.array(harmonise(lesion_set, mask, "median").harmonisation["Divisors"])
    mean_shift = 1.0 - lesioned[mask].mean(0) / features.data[mask].mean(0)
    assert np.all(np.abs(after / before - 1.0) < 0.02)
    assert np.all(np.abs(after / before - 1.0) < 0.6 * mean_shift)


def test_a_subject_wide_diffusivity_change_is_mostly_harmonised_away() -> None:
    # Voxels with diffusivities drawn over white and grey matter's range, two shells; the same subject with every
    # diffusivity 6 % higher differs in its raw features by about 12 %, in its harmonised ones by a third of that.
    rng = np.random.default_rng(3)
    directions = rng.normal(size=(60, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bvals = np.r_[0.0, 0.0, np.full(30, 1000.0), np.full(30, 2500.0)]
    gtab = gradient_table(bvals, bvecs=np.r_[np.zeros((2, 3)), directions])
    shape = (10, 10, 10)
    axes = rng.normal(size=shape + (3,))
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    parallel = rng.uniform(1.2e-3, 1.8e-3, shape)
    perpendicular = parallel * rng.uniform(0.2, 0.9, shape)
    cos2 = (axes @ gtab.bvecs.T) ** 2
    signal = np.exp(-bvals * (perpendicular[..., None] + (parallel - perpendicular)[..., None] * cos2))
    mask = np.ones(shape, bool)
    norm = NormalizedDWI(signal.astype(np.float32), np.ones(shape, np.float32), mask)
    shifted = scale_diffusivity(norm, 1.06)

    def change(method: str) -> float:
        a = harmonise(compute_features(norm, gtab, "sh-invariant"), mask, method).data[mask]
        b = harmonise(compute_features(shifted, gtab, "sh-invariant"), mask, method).data[mask]
        return float(np.median(np.abs(b / a - 1.0)))

    raw, harmonised = change("none"), change("median")
    assert raw > 0.05
    assert harmonised < 0.4 * raw


def test_a_feature_without_a_positive_median_is_refused() -> None:
    features, mask = lognormal_features((6, 6, 6), seed=4)
    features.data[..., 1] = 0.0
    with pytest.raises(ValueError, match="no positive brain median: b1000_l2"):
        harmonise(features, mask, "median")
    with pytest.raises(ValueError, match="unknown harmonisation"):
        harmonise(features, mask, "rish")


def test_scans_harmonised_differently_are_not_compared() -> None:
    features, mask = lognormal_features((6, 6, 6), seed=5)
    with pytest.raises(InputError, match="harmonised by 'median'"):
        check_compatible(features.description(), harmonise(features, mask, "median").description(), "scan.nii.gz")
    check_compatible(features.description(), features.description(), "scan.nii.gz")


def test_preprocess_cli_writes_harmonised_features(
    synthetic_scan: SyntheticScan, tmp_path: Path, run_cli: Callable[[list[str]], CliResult]
) -> None:
    plain_dir, harmonised_dir = tmp_path / "plain", tmp_path / "harmonised"
    assert run_cli(synthetic_scan.preprocess_argv(plain_dir)).code == 0
    assert run_cli(synthetic_scan.preprocess_argv(harmonised_dir) + ["--harmonisation", "median"]).code == 0
    stem = "sub-01/dwi/sub-01_space-dwi_desc-"
    plain = np.asarray(nib.load(plain_dir / f"{stem}qspace_features.nii.gz").dataobj, np.float64)
    harmonised = np.asarray(nib.load(harmonised_dir / f"{stem}qspace_features.nii.gz").dataobj, np.float64)
    mask = np.asarray(nib.load(harmonised_dir / f"{stem}brain_mask.nii.gz").dataobj) > 0
    medians = np.median(plain[mask], 0)
    np.testing.assert_allclose(harmonised[mask], plain[mask] / medians, rtol=1e-5)
    sidecar = json.loads((harmonised_dir / f"{stem}qspace_features.json").read_text())
    assert sidecar["Harmonisation"]["Method"] == "median"
    np.testing.assert_allclose(sidecar["Harmonisation"]["Divisors"], medians, rtol=1e-5)
