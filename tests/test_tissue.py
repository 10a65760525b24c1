"""Per-tissue healthy nulls: the Gaussian-mixture tissue classes and the class-mixture tail probability."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PLAIN_CALIBRATION, derivative_grid, new_derivative_scan
from scipy import stats

from anomri.maps.probability import HealthyNull
from anomri.maps.tissue import TissueModel, log_features

# Three tissues, as log q-space features (F = 3): free water, grey matter, white matter.
LOG_MEANS = np.array([[-1.5, -4.0, -6.0], [0.3, -3.0, -5.0], [0.8, -1.0, -2.5]])


def draw_tissue(rng: np.random.Generator, n: int, weights=(0.2, 0.45, 0.35)) -> tuple[np.ndarray, np.ndarray]:
    """Positive features of ``n`` voxels (N, 3) and their true tissue labels."""
    labels = rng.choice(3, size=n, p=weights)
    log_x = LOG_MEANS[labels] + 0.15 * rng.normal(size=(n, 3))
    return np.exp(log_x), labels


def test_posterior_is_bayes_rule_with_the_fitted_gaussians() -> None:
    rng = np.random.default_rng(0)
    features, _ = draw_tissue(rng, 3000)
    tissue = TissueModel.fit(features, 3, seed=0)
    query = features[:200]
    x = log_features(query)
    joint = np.stack([tissue.weights[k] * stats.multivariate_normal(tissue.means[k], tissue.covariances[k]).pdf(x)
                      for k in range(3)], axis=1)
    np.testing.assert_allclose(tissue.posterior(query), joint / joint.sum(1, keepdims=True), atol=1e-10)
    np.testing.assert_allclose(tissue.posterior(query).sum(1), 1.0)


def test_classes_recover_the_tissues_in_a_fixed_order() -> None:
    rng = np.random.default_rng(1)
    features, labels = draw_tissue(rng, 6000)
    for seed in (0, 1, 2):
        tissue = TissueModel.fit(features, 3, seed=seed)
        # Ordered by the first log feature: free water (-1.5) < grey (0.3) < white (0.8).
        assert np.all(np.diff(tissue.means[:, 0]) > 0)
        predicted = np.argmax(tissue.posterior(features), axis=1)
        assert (predicted == labels).mean() > 0.99
        np.testing.assert_allclose(tissue.weights, [0.2, 0.45, 0.35], atol=0.03)


def healthy_scores(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """A novelty score whose healthy law depends on the tissue: white matter scores high."""
    scale = np.array([1.0, 1.0, 3.0])[labels]
    return rng.gamma(2.0, size=len(labels)) * scale


def test_per_tissue_null_flags_the_nominal_rate_overall_and_within_each_tissue() -> None:
    rng = np.random.default_rng(2)
    features, labels = draw_tissue(rng, 150_000)
    tissue = TissueModel.fit(features, 3, seed=0)
    null = HealthyNull({"s": healthy_scores(rng, labels)}, tissue=tissue, log_posterior=tissue.log_posterior(features))
    new_features, new_labels = draw_tissue(rng, 150_000)
    new_scores = healthy_scores(rng, new_labels)
    p = null.tail_probability({"s": new_scores}, new_features)
    brain_wide = HealthyNull({"s": null.values["s"]}).tail_probability({"s": new_scores})
    for level in (0.01, 0.001):
        assert abs((p <= level).mean() - level) < 4 * np.sqrt(level / len(p)) + 1e-4
    white = new_labels == 2
    # Within white matter the per-tissue null still flags ~1 %; the brain-wide one flags far more,
    # and almost never flags the other tissues: the false positives the tissue classes remove.
    assert abs((p[white] <= 0.01).mean() - 0.01) < 4 * np.sqrt(0.01 / white.sum()) + 1e-3
    assert (brain_wide[white] <= 0.01).mean() > 0.025
    # A lesion that scores high for grey matter, but ordinary for white matter, is found only per tissue.
    grey_like = np.exp(LOG_MEANS[[1]])
    lesion_score = np.array([np.quantile(healthy_scores(rng, np.ones(100_000, int)), 0.9995)])
    assert null.tail_probability({"s": lesion_score}, grey_like)[0] < 0.002
    assert HealthyNull({"s": null.values["s"]}).tail_probability({"s": lesion_score})[0] > 0.002


def test_tissue_null_round_trips_through_its_file(tmp_path) -> None:
    rng = np.random.default_rng(3)
    features, labels = draw_tissue(rng, 20_000)
    tissue = TissueModel.fit(features, 3, seed=0)
    values = {"a": healthy_scores(rng, labels), "b": healthy_scores(rng, labels)}
    null = HealthyNull(values, combination="fisher", tissue=tissue, log_posterior=tissue.log_posterior(features))
    null.save(tmp_path / "null.npz")
    loaded = HealthyNull.load(tmp_path / "null.npz")
    query = {"a": values["a"][:500] * 2, "b": values["b"][:500]}
    np.testing.assert_allclose(loaded.tail_probability(query, features[:500]),
                               null.tail_probability(query, features[:500]), rtol=1e-6)
    assert loaded.record()["tissue_classes"]["n_classes"] == 3
    assert set(loaded.record()["tails"]) == {"class-0", "class-1", "class-2", "mixture"}


def test_tissue_null_refuses_missing_features_and_empty_classes() -> None:
    rng = np.random.default_rng(4)
    features, labels = draw_tissue(rng, 20_000)
    tissue = TissueModel.fit(features, 3, seed=0)
    null = HealthyNull({"s": healthy_scores(rng, labels)}, tissue=tissue, log_posterior=tissue.log_posterior(features))
    with pytest.raises(ValueError, match="features"):
        null.tail_probability({"s": np.ones(3)})
    with pytest.raises(ValueError, match="posteriors"):
        HealthyNull({"s": np.ones(1000)}, tissue=tissue)
    # Calibration voxels all of one tissue leave the other classes without a null.
    wm = labels == 2
    with pytest.raises(ValueError, match="tissue class 0"):
        HealthyNull({"s": healthy_scores(rng, labels[wm])}, tissue=tissue,
                    log_posterior=tissue.log_posterior(features[wm]))


def test_calibrate_and_probability_commands_with_tissue_classes(tmp_path, run_cli) -> None:
    import json

    import nibabel as nib

    from anomri.io.derivatives import ScanDerivatives, sidecar_path
    from anomri.io.nifti import save_volume

    rng = np.random.default_rng(5)
    reference, mask = derivative_grid(14)
    shape = mask.shape

    def write_scan(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        scan = new_derivative_scan(tmp_path, prefix, mask, reference)
        features, labels = draw_tissue(rng, mask.size)
        score = healthy_scores(rng, labels).reshape(shape).astype(np.float32)
        save_volume(scan.novelty("vae-reg"), np.where(mask, score, 0), reference)
        nib.save(nib.Nifti1Image(features.reshape(*shape, 3).astype(np.float32), reference.affine), scan.features)
        return score, features.reshape(*shape, 3)

    calibration = [write_scan(f"sub-C0{i}") for i in (1, 2, 3)]
    score, features = write_scan("sub-P01")
    null_path = tmp_path / "null.npz"
    common = ["--derivatives-dir", str(tmp_path), "--scans", "sub-C01", "sub-C02", "sub-C03", "--scores", "vae-reg",
              "--out", str(null_path), *PLAIN_CALIBRATION]
    # Voxels pooled, as the null built by hand below (the per-subject unit: tests/test_subject_calibration.py).
    assert run_cli(["calibrate", *common, "--tissue-classes", "3", "--seed", "0", "--calibration-unit", "voxel"]).code == 0
    assert run_cli(["probability", "--derivatives-dir", str(tmp_path), "--prefix", "sub-P01",
                    "--null", str(null_path), "--levels", "0.01"]).code == 0

    # The same null, built by hand from the calibration voxels, gives the written map.
    tissue = TissueModel.fit(np.concatenate([f[mask] for _, f in calibration]), 3, seed=0)
    cal_features = np.concatenate([f[mask] for _, f in calibration])
    null = HealthyNull({"vae-reg": np.concatenate([s[mask] for s, _ in calibration])}, tissue=tissue,
                       log_posterior=tissue.log_posterior(cal_features))
    scan = ScanDerivatives(tmp_path, "sub-P01")
    prob = np.asarray(nib.load(scan.probseg).dataobj)
    expected = 1.0 - null.tail_probability({"vae-reg": score[mask]}, features[mask])
    np.testing.assert_allclose(prob[mask], expected, atol=1e-6)
    sidecar = json.loads(sidecar_path(scan.probseg).read_text())
    assert sidecar["Calibration"]["tissue_classes"]["n_classes"] == 3
    assert scan.uri(scan.features) in sidecar["Sources"]

    # Too many classes for the calibration voxels: one error line naming the option.
    result = run_cli(["calibrate", *common, "--tissue-classes", "1000"])
    assert result.code != 0 and result.err.count("\n") == 1 and "tissue" in result.err
