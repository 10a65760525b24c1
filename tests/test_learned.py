"""The opt-in learned combination: logistic fit, leave-one-patient-out folds, evidence and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PLAIN_CALIBRATION, derivative_grid, new_derivative_scan

from anomri.maps.learned import LearnedCombination, leave_one_patient_out, score_evidence
from anomri.maps.probability import HealthyNull


def simulated_patients(rng: np.random.Generator, n_patients: int = 4, n: int = 20_000,
                       weights=(1.5, -0.5), intercept: float = -6.0):
    """Evidence of ``n`` voxels per patient (Exp(1) per score) and labels drawn from a known logistic law."""
    evidence, labels = [], []
    for _ in range(n_patients):
        e = rng.exponential(size=(n, 2)) * 2.0
        p = 1.0 / (1.0 + np.exp(-(e @ np.asarray(weights) + intercept)))
        evidence.append(e)
        labels.append(rng.random(n) < p)
    return evidence, labels


def test_fit_recovers_the_logistic_law_that_made_the_labels() -> None:
    evidence, labels = simulated_patients(np.random.default_rng(0), n_patients=5, n=60_000)
    model = LearnedCombination.fit(["a", "b"], evidence, labels, ["p1", "p2", "p3", "p4", "p5"], C=100.0)
    np.testing.assert_allclose(model.weights, [1.5, -0.5], atol=0.1)
    assert abs(model.intercept + 6.0) < 0.4
    e = evidence[0][:5]
    np.testing.assert_allclose(model.predict(e), 1 / (1 + np.exp(-(e @ model.weights + model.intercept))), rtol=1e-12)
    assert np.all(np.isfinite(model.predict(np.array([[1e4, 0.0], [0.0, 1e4]]))))


def test_each_fold_never_sees_its_own_patient() -> None:
    evidence, labels = simulated_patients(np.random.default_rng(1))
    patients = ["p1", "p2", "p3", "p4"]
    folds = leave_one_patient_out(["a", "b"], evidence, labels, patients)
    assert [f.patients for f in folds] == [tuple(p for p in patients if p != q) for q in patients]
    # Scrambling patient 1's labels changes every fold but its own.
    scrambled = [labels[0], np.random.default_rng(2).permutation(labels[1]), *labels[2:]]
    again = leave_one_patient_out(["a", "b"], evidence, scrambled, patients)
    np.testing.assert_array_equal(again[1].weights, folds[1].weights)
    assert all(not np.allclose(again[i].weights, folds[i].weights) for i in (0, 2, 3))


def test_refuses_too_few_patients_and_labels_of_one_kind() -> None:
    evidence, labels = simulated_patients(np.random.default_rng(3), n_patients=2)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_patient_out(["a", "b"], evidence[:1], labels[:1], ["p1"])
    with pytest.raises(ValueError, match="both lesion and healthy"):
        LearnedCombination.fit(["a", "b"], evidence, [np.zeros_like(y) for y in labels], ["p1", "p2"])


def test_evidence_is_minus_log_of_each_scores_brute_force_tail_probability() -> None:
    rng = np.random.default_rng(4)
    nulls = {"a": HealthyNull({"a": rng.normal(size=4000)}), "b": HealthyNull({"b": rng.gamma(2.0, size=4000)})}
    scores = {"a": rng.normal(size=50) * 0.5, "b": rng.gamma(2.0, size=50) * 0.5}
    got = score_evidence(nulls, scores)
    for j, k in enumerate(("a", "b")):
        null = nulls[k].values[k].astype(np.float64)
        s = scores[k].astype(np.float32).astype(np.float64)
        expected = -np.log([(1 + (null >= v).sum()) / (len(null) + 1) for v in s])
        np.testing.assert_allclose(got[:, j], expected, rtol=1e-9)


def test_learn_combination_command(tmp_path, run_cli) -> None:
    import nibabel as nib

    from anomri.io.derivatives import ScanDerivatives, sidecar_path
    from anomri.io.nifti import save_volume

    rng = np.random.default_rng(5)
    reference, brain = derivative_grid(16)
    shape = brain.shape

    def write_scan(prefix: str, lesion: np.ndarray) -> None:
        scan = new_derivative_scan(tmp_path, prefix, brain, reference)
        for k, gain in (("vae-reg", 4.0), ("neg-elbo", 0.0)):  # neg-elbo carries no lesion signal here
            score = rng.normal(size=shape).astype(np.float32) + gain * lesion
            save_volume(scan.novelty(k), np.where(brain, score, 0), reference)

    for c in ("sub-C01", "sub-C02"):
        write_scan(c, np.zeros(shape, bool))
    argv = ["learn-combination", "--derivatives-dir", str(tmp_path), "--calibration", "sub-C01", "sub-C02",
            "--scores", "vae-reg", "neg-elbo", "--out", str(tmp_path / "learned.json"), "--apply", "sub-C01",
            *PLAIN_CALIBRATION]
    for i in range(3):
        lesion = np.zeros(shape, bool)
        lesion[3 + 3 * i:6 + 3 * i, 4:8, 5:9] = True
        write_scan(f"sub-P0{i + 1}", lesion)
        path = tmp_path / f"sub-P0{i + 1}_lesion.nii.gz"
        save_volume(path, lesion, reference, dtype=np.uint8)
        argv += ["--scan", f"sub-P0{i + 1}", str(path)]

    result = run_cli(argv)
    assert result.code == 0, result.err
    out = json.loads((tmp_path / "learned.json").read_text())
    assert out["folds"]["sub-P02"]["patients"] == ["sub-P01", "sub-P03"]
    assert out["model"]["weights"][0] > 3 * abs(out["model"]["weights"][1])  # the informative score dominates
    assert all(v["auroc"] > 0.97 for v in out["cross_validation"].values())
    for prefix, fitted_on in (("sub-P01", ["sub-P02", "sub-P03"]), ("sub-C01", ["sub-P01", "sub-P02", "sub-P03"])):
        scan = ScanDerivatives(tmp_path, prefix)
        img = nib.load(scan.learned_probseg)
        data = np.asarray(img.dataobj)
        assert img.get_data_dtype() == np.float32 and np.all(data[~brain] == 0) and data.max() <= 1
        sidecar = json.loads(sidecar_path(scan.learned_probseg).read_text())
        assert sidecar["Model"]["patients"] == fitted_on

    # One labelled patient cannot be cross-validated: one error line, non-zero exit.
    one = argv[: argv.index("--scan") + 3]
    result = run_cli(one)
    assert result.code != 0 and result.err.count("\n") == 1 and "at least 2" in result.err
