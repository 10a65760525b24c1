"""The evaluate command and the report figures on a hand-built cohort with hand-computed metrics.

Grid 10 x 10 x 10 of 2 mm voxels (8 mm^3 = 0.008 mL), every voxel in the brain.

* Calibration control sub-C01: map values 0.000, 0.001, ..., 0.999, so the 1 % healthy-FPR
  threshold (flags 10 of 1000 voxels) is 0.990.
* Patient sub-P01: lesion A, a 2x2x2 block scored 0.995 (flagged); lesion B, one voxel scored 0.5
  (missed); false positives: a 2-voxel blob at 0.999 and one voxel at 0.992; everything else 0.
  Flagged 11, lesion 9, true positives 8: Dice 16/20; lesion sensitivity 1/2; 2 FP components;
  healthy FPR 3/991; volume error (11 - 9) x 0.008 = 0.016 mL, relative 2/9.
  AUROC: each 0.995 lesion voxel beats 989 of the 991 healthy, the 0.5 voxel beats 988:
  (8 x 989 + 988) / (9 x 991) = 8900/8919.
  AUPRC: thresholds 0.999 (P 0, R 0), 0.995 (8/10, 8/9), 0.992 (8/11, 8/9), 0.5 (9/12, 1):
  AP = 8/9 x 0.8 + 1/9 x 0.75 = 7.15/9.
  Best Dice: 18/21 at 0.5 (12 predicted, 9 TP).
* Patient sub-P02: one lesion voxel scored 0.999, nothing else: Dice 1, everything exact.
* Pooled: flagged 12, lesion 10, TP 9: Dice 18/22; sensitivity 2/3; 2 FP components; volume
  error 0.016 mL, relative 0.016/0.080 = 0.2; healthy FPR 3/1990.
* Held-out control sub-C02 (neither trains nor calibrates): its 1 % lesion mask flags 12 of its
  1000 voxels in 2 components (realised FPR 1.2 %), its 0.1 % mask flags 1 voxel.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from anomri.cli import main
from anomri.evaluate.table import POOLED, PROBABILITY, SUMMARY_METRICS, summarise
from anomri.io.derivatives import ScanDerivatives, sidecar_path
from conftest import PLAIN_CALIBRATION

SHAPE = (10, 10, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SCORE = "vae-reg"


def _save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), AFFINE), path)


def _calibration_record(scan: ScanDerivatives, erosion_voxels: int = 0) -> None:
    """The probability sidecar's record of the post-processing: the lesion masks' domain is the brain eroded so."""
    scan.dir.mkdir(parents=True, exist_ok=True)
    sidecar_path(scan.probseg).write_text(json.dumps({"Calibration": {"postprocessing": {
        "erosion_voxels": erosion_voxels, "median_filter_voxels": 0, "smoothing_fwhm_mm": 0.0}}}))


def _scan(root: Path, prefix: str, values: np.ndarray) -> None:
    scan = ScanDerivatives(root, prefix)
    _calibration_record(scan)
    _save(scan.mask, np.ones(SHAPE))
    _save(scan.b0, np.random.default_rng(0).random(SHAPE) + 1.0)
    # The same values in both kinds of map: each gets its own calibration threshold all the same.
    _save(scan.novelty(SCORE), values)
    _save(scan.neglog10p, values)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluation")
    control = np.random.default_rng(1).permutation(np.arange(1000) / 1000).reshape(SHAPE)
    _scan(root, "sub-C01", control)

    p1, lesion1 = np.zeros(SHAPE), np.zeros(SHAPE)
    lesion1[1:3, 1:3, 1:3] = 1
    p1[1:3, 1:3, 1:3] = 0.995
    lesion1[7, 7, 7] = 1
    p1[7, 7, 7] = 0.5
    p1[5, 5, 1:3] = 0.999
    p1[9, 0, 9] = 0.992
    p2, lesion2 = np.zeros(SHAPE), np.zeros(SHAPE)
    lesion2[4, 4, 4] = 1
    p2[4, 4, 4] = 0.999
    _scan(root, "sub-P01", p1)
    _scan(root, "sub-P02", p2)
    lesions = {p: root / "lesions" / f"{p}_mask.nii.gz" for p in ("sub-P01", "sub-P02")}
    _save(lesions["sub-P01"], lesion1)
    _save(lesions["sub-P02"], lesion2)
    held_out = ScanDerivatives(root, "sub-C02")
    _save(held_out.mask, np.ones(SHAPE))
    _calibration_record(held_out, erosion_voxels=1)  # its masks could flag the inner 8^3 voxels only
    p01, p001 = np.zeros(SHAPE), np.zeros(SHAPE)
    p01[0:2, 0:2, 0:2] = 1
    p01[5, 5, 5:9] = 1
    p001[0, 0, 0] = 1
    _save(held_out.lesion_mask(0.01), p01)
    _save(held_out.lesion_mask(0.001), p001)

    out = {"table": root / "evaluation.tsv", "summary": root / "evaluation_summary.tsv",
           "curves": root / "evaluation_curves.json", "healthy": root / "evaluation_healthy.tsv", "root": root,
           "lesions": lesions}
    args = ["evaluate", "--derivatives-dir", str(root), "--scores", SCORE, "--calibration", "sub-C01",
            "--out", str(out["table"]), "--summary", str(out["summary"]), "--curves", str(out["curves"]),
            "--healthy-out", str(out["healthy"]), "--healthy", "sub-C02", "--bootstrap", "500"]
    for prefix, path in lesions.items():
        args += ["--scan", prefix, str(path)]
    assert main(args) == 0
    return out


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _row(rows: list[dict], participant: str, score: str = SCORE) -> dict:
    return next(r for r in rows if r["participant_id"] == participant and r["score"] == score)


def test_per_patient_metrics_hand_computed(cohort) -> None:
    rows = _rows(cohort["table"])
    assert len(rows) == 2 * 3  # (2 patients + pooled) x (1 score + probability)
    for score in (SCORE, PROBABILITY):
        row = _row(rows, "sub-P01", score)
        assert row["session"] == "n/a"
        assert float(row["threshold"]) == pytest.approx(0.990)
        assert float(row["auroc"]) == pytest.approx(8900 / 8919, abs=1e-6)
        assert float(row["auprc"]) == pytest.approx(7.15 / 9, abs=1e-6)
        assert float(row["best_dice"]) == pytest.approx(18 / 21, abs=1e-6)
        assert float(row["dice_at_fpr"]) == pytest.approx(16 / 20, abs=1e-6)
        assert float(row["healthy_fpr"]) == pytest.approx(3 / 991, abs=1e-6)
        assert (row["n_lesions"], row["n_detected"], row["n_fp_components"]) == ("2", "1", "2")
        assert float(row["lesion_sensitivity"]) == 0.5
        assert float(row["true_volume_ml"]) == pytest.approx(0.072)
        assert float(row["pred_volume_ml"]) == pytest.approx(0.088)
        assert float(row["volume_error_ml"]) == pytest.approx(0.016)
        assert float(row["relative_volume_error"]) == pytest.approx(2 / 9, abs=1e-6)
        assert (row["n_lesion_voxels"], row["n_brain_voxels"]) == ("9", "1000")
    row = _row(rows, "sub-P02")
    assert float(row["dice_at_fpr"]) == 1.0 and float(row["lesion_sensitivity"]) == 1.0
    assert float(row["volume_error_ml"]) == 0.0 and row["n_fp_components"] == "0"


def test_pooled_rows_hand_computed(cohort) -> None:
    row = _row(_rows(cohort["table"]), POOLED)
    assert float(row["dice_at_fpr"]) == pytest.approx(18 / 22, abs=1e-6)
    assert float(row["lesion_sensitivity"]) == pytest.approx(2 / 3, abs=1e-6)
    assert (row["n_lesions"], row["n_detected"], row["n_fp_components"]) == ("3", "2", "2")
    assert float(row["volume_error_ml"]) == pytest.approx(0.016)
    assert float(row["relative_volume_error"]) == pytest.approx(0.2, abs=1e-6)
    assert float(row["healthy_fpr"]) == pytest.approx(3 / 1990, abs=1e-6)
    assert (row["n_lesion_voxels"], row["n_brain_voxels"]) == ("10", "2000")


def test_realised_false_positive_rate_of_unseen_controls(cohort) -> None:
    rows = _rows(cohort["healthy"])
    one = next(r for r in rows if r["participant_id"] == "sub-C02" and float(r["level"]) == 0.01)
    # The denominator is the voxels that could be flagged: the brain eroded by one voxel, 8^3 of its 10^3. Of the
    # 12 flagged voxels, 1 of the corner cube and the 4-voxel line lie inside it.
    assert float(one["realised_fpr"]) == pytest.approx(5 / 512)
    assert float(one["ratio_to_level"]) == pytest.approx(500 / 512)
    assert (one["n_flagged_voxels"], one["n_flagged_components"], one["n_scored_voxels"], one["n_brain_voxels"]) == (
        "5", "2", "512", "1000")
    assert one["role"] == "control"
    tenth = next(r for r in rows if r["participant_id"] == "sub-C02" and float(r["level"]) == 0.001)
    assert float(tenth["realised_fpr"]) == 0.0  # its one flagged voxel is on the peeled edge
    assert {r["participant_id"] for r in rows} == {"sub-C02", POOLED}
    assert json.loads(cohort["healthy"].with_suffix(".json").read_text())["realised_fpr"]["Description"]


def test_lesion_voxels_outside_the_brain_are_misses(tmp_path) -> None:
    """A lesion voxel outside the brain mask ranks below every brain voxel and is never flagged."""
    control = np.random.default_rng(1).permutation(np.arange(1000) / 1000).reshape(SHAPE)
    _scan(tmp_path, "sub-C01", control)
    values, lesion = np.zeros(SHAPE), np.zeros(SHAPE)
    lesion[1:3, 1:3, 1:3] = 1  # 8 voxels, all scored 0.995 (flagged)
    values[1:3, 1:3, 1:3] = 0.995
    lesion[0, 9, 0:2] = 1  # 2 lesion voxels the brain mask leaves out; the map holds a high value there
    values[0, 9, 0:2] = 0.999
    _scan(tmp_path, "sub-P01", values)
    brain = np.ones(SHAPE)
    brain[0, 9, :] = 0
    _save(ScanDerivatives(tmp_path, "sub-P01").mask, brain)
    _save(tmp_path / "lesion.nii.gz", lesion)
    table = tmp_path / "evaluation.tsv"
    assert main(["evaluate", "--derivatives-dir", str(tmp_path), "--scores", SCORE, "--calibration", "sub-C01",
                 "--scan", "sub-P01", str(tmp_path / "lesion.nii.gz"), "--out", str(table),
                 "--summary", str(tmp_path / "s.tsv"), "--curves", str(tmp_path / "c.json"),
                 "--healthy-out", str(tmp_path / "h.tsv"), "--bootstrap", "10"]) == 0
    row = _row(_rows(table), "sub-P01")
    # 990 brain voxels + 2 lesion voxels outside; 10 lesion voxels, 8 found.
    assert (row["n_lesion_voxels"], row["n_brain_voxels"]) == ("10", "992")
    assert float(row["dice_at_fpr"]) == pytest.approx(16 / 18)
    assert float(row["auroc"]) == pytest.approx((8 * 982 + 2 * 0) / (10 * 982))
    # Two lesions (26-connected components); the one outside the brain is missed.
    assert (row["n_lesions"], row["n_detected"]) == ("2", "1")


def test_summary_means_and_bootstrap_ci(cohort) -> None:
    rows = _rows(cohort["summary"])
    assert [r["score"] for r in rows] == [SCORE, PROBABILITY]
    row = rows[0]
    assert row["n_patients"] == "2"
    # Two patients: the resampled means are 0.8, 0.9 or 1.0, each extreme with probability 1/4.
    assert float(row["dice_at_fpr"]) == pytest.approx(0.9)
    assert (float(row["dice_at_fpr_ci_low"]), float(row["dice_at_fpr_ci_high"])) == (0.8, 1.0)
    assert float(row["lesion_sensitivity"]) == pytest.approx(0.75)
    # AUROC/AUPRC of sub-P02 exist (one lesion voxel); n/a would be dropped, never averaged as 0.
    assert float(row["auroc"]) == pytest.approx((8900 / 8919 + 1.0) / 2, abs=1e-6)
    sidecar = json.loads(cohort["summary"].with_suffix(".json").read_text())
    assert set(sidecar) == set(rows[0]) and sidecar["volume_error_ml"]["Units"] == "mL"
    assert set(json.loads(cohort["table"].with_suffix(".json").read_text())) == set(_rows(cohort["table"])[0])


def test_summary_is_deterministic_and_skips_missing_values() -> None:
    rows = [{"participant_id": f"sub-{i}", "score": "s", **{m: float(i) for m in SUMMARY_METRICS}}
            for i in range(5)]
    rows.append({"participant_id": "sub-x", "score": "s", **{m: "n/a" for m in SUMMARY_METRICS}})
    rows.append({"participant_id": POOLED, "score": "s", **{m: 100.0 for m in SUMMARY_METRICS}})
    first, again = summarise(rows, n_boot=300, seed=4), summarise(rows, n_boot=300, seed=4)
    assert first == again
    assert first[0]["n_patients"] == 6 and first[0]["auroc"] == 2.0  # the pooled row and n/a left out
    assert first[0]["auroc_ci_low"] < 2.0 < first[0]["auroc_ci_high"]


def test_missing_values_are_written_as_na(cohort, tmp_path) -> None:
    # A lesion-free patient: AUROC, AUPRC, best Dice, sensitivity and relative error are undefined.
    root = cohort["root"]
    empty = tmp_path / "empty_mask.nii.gz"
    _save(empty, np.zeros(SHAPE))
    out = tmp_path / "evaluation.tsv"
    scan = ScanDerivatives(root, "sub-P02")
    flagged = np.zeros(SHAPE)
    flagged[4, 4, 4] = 1  # its one high voxel, now a false positive
    _save(scan.lesion_mask(0.01), flagged)
    _save(scan.lesion_mask(0.001), np.zeros(SHAPE))
    assert main(["evaluate", "--derivatives-dir", str(root), "--scores", SCORE, "--calibration", "sub-C01",
                 "--scan", "sub-P02", str(empty), "--out", str(out), "--summary", str(tmp_path / "s.tsv"),
                 "--curves", str(tmp_path / "c.json"), "--healthy-out", str(tmp_path / "h.tsv"),
                 "--bootstrap", "10"]) == 0
    # A lesion-free "patient" is an unseen healthy subject: its realised false-positive rate is reported.
    healthy = next(r for r in _rows(tmp_path / "h.tsv") if r["participant_id"] == "sub-P02" and r["level"] == "0.01")
    assert float(healthy["realised_fpr"]) == pytest.approx(1 / 1000)
    row = _row(_rows(out), "sub-P02")
    for column in ("auroc", "auprc", "best_dice", "lesion_sensitivity", "relative_volume_error"):
        assert row[column] == "n/a", column
    assert row["n_fp_components"] == "1" and float(row["dice_at_fpr"]) == 0.0
    curves = json.loads((tmp_path / "c.json").read_text())
    assert curves["maps"][SCORE]["sub-P02"]["roc"]["fpr"] == []


def test_bad_input_is_one_error_line(cohort, tmp_path, capsys) -> None:
    root = cohort["root"]
    wrong = tmp_path / "wrong_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), AFFINE), wrong)
    common = ["evaluate", "--derivatives-dir", str(root), "--scores", SCORE, "--calibration", "sub-C01",
              "--out", str(tmp_path / "e.tsv"), "--summary", str(tmp_path / "s.tsv"),
              "--curves", str(tmp_path / "c.json"), "--healthy-out", str(tmp_path / "h.tsv")]
    assert main([*common, "--scan", "sub-P01", str(wrong)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anomri: error:") and "wrong_grid" in err[0]
    assert main([*common, "--scan", "sub-P01", str(cohort["lesions"]["sub-P01"]), "--fpr", "1.5"]) == 2
    assert "--fpr" in capsys.readouterr().err
    assert main([*common, "--scan", "sub-P09", str(cohort["lesions"]["sub-P01"])]) == 2
    assert "file not found" in capsys.readouterr().err
    assert not (tmp_path / "e.tsv").exists()


def test_curves_json(cohort) -> None:
    curves = json.loads(cohort["curves"].read_text())
    assert curves["fpr"] == 0.01 and curves["calibration"] == ["sub-C01"]
    entry = curves["maps"][PROBABILITY][POOLED]
    assert entry["auroc"] == pytest.approx(float(_row(_rows(cohort["table"]), POOLED, PROBABILITY)["auroc"]))
    assert entry["prevalence"] == pytest.approx(10 / 2000)
    # Operating point at the threshold: 9 of 10 lesion voxels, 9 of 12 flagged voxels are lesion.
    assert entry["operating_point"] == pytest.approx({"fpr": 3 / 1990, "tpr": 0.9, "precision": 0.75})


def _png(path: Path) -> np.ndarray:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    return image


def test_figures(cohort, tmp_path) -> None:
    root = cohort["root"]
    assert main(["plot-curves", "--curves", str(cohort["curves"]), "--figures-dir", str(tmp_path)]) == 0
    _png(tmp_path / f"score-{SCORE}_curves.png")
    _png(tmp_path / f"score-{PROBABILITY}_curves.png")
    overlay = tmp_path / "sub-P01_overlay.png"
    assert main(["plot-overlay", "--derivatives-dir", str(root), "--prefix", "sub-P01", "--lesion-mask",
                 str(cohort["lesions"]["sub-P01"]), "--evaluation", str(cohort["table"]), "--out",
                 str(overlay)]) == 0
    two_rows = _png(overlay)
    assert main(["plot-overlay", "--derivatives-dir", str(root), "--prefix", "sub-P01", "--lesion-mask",
                 str(cohort["lesions"]["sub-P01"]), "--evaluation", str(cohort["table"]), "--out",
                 str(overlay), "--n-lesions", "1"]) == 0
    assert _png(overlay).shape[0] < two_rows.shape[0]  # one row of slices per lesion
    history = tmp_path / "history.tsv"
    history.write_text("epoch\ttrain_loss\ttrain_rec\ttrain_kl\tval_loss\n1\t3\t2.5\t0.5\t3.1\n2\t2\t1.6\t0.4\tn/a\n")
    assert main(["plot-training", "--history", str(history), "--out", str(tmp_path / "training.png")]) == 0
    _png(tmp_path / "training.png")


def test_lesion_centres_pick_the_largest_lesions_inside_them() -> None:
    from anomri.report.figures import lesion_centres

    lesion = np.zeros((12, 12, 12), bool)
    lesion[1, 1, 1] = True  # 1 voxel
    lesion[5:8, 5:8, 5:8] = True  # 27 voxels, centre (6, 6, 6)
    # A U shape (14 voxels) whose centroid, about (2.4, 6.5, 10), lies between its arms.
    lesion[1, 4:10, 10] = lesion[1:6, 4, 10] = lesion[1:6, 9, 10] = True
    centres = lesion_centres(lesion, 2)
    assert centres[0] == ((6, 6, 6), 27)
    assert centres[1][1] == 14 and lesion[centres[1][0]]
    assert [size for _, size in lesion_centres(lesion, 5)] == [27, 14, 1]
    assert lesion_centres(np.zeros((3, 3, 3), bool), 2) == []


def _shifted_controls(root: Path, shifts: dict[str, float], shape: tuple[int, int, int], seed: int) -> None:
    """Controls whose score maps are N(shift, 1) noise: people who differ by a global shift, as real ones do."""
    rng = np.random.default_rng(seed)
    for prefix, shift in shifts.items():
        scan = ScanDerivatives(root, prefix)
        for path, data in ((scan.mask, np.ones(shape)), (scan.b0, np.ones(shape)),
                           (scan.novelty(SCORE), shift + rng.normal(size=shape))):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.asarray(data, np.float32), AFFINE), path)


@pytest.mark.parametrize("unit", ["voxel", "subject"])
def test_out_of_fold_false_positive_rate_of_controls_that_differ_by_a_global_shift(tmp_path, unit: str) -> None:
    """calibrate -> probability -> evaluate on controls that differ by a global shift (between-subject variance).

    Each control's p comes from the null of the *other* controls (leave-subject-out), so its flagged fraction at
    level a is, exactly, the fraction of its voxels whose conformal rank among the others' voxels gives
    (1 + #{others >= s}) / (n_others + 1) <= a (unit ``voxel``), or whose largest rank among each other person's
    voxels, max_j (1 + #{person j >= s}) / (n_j + 1), is <= a (unit ``subject``): checked against that brute force.
    Pooled, the mean over people is near a (exchangeable subjects), although each person is flagged well above or
    below it: the spread in people a single calibration control cannot show. Per person, no one is far above a, at
    the price of most people sitting below it.
    """
    shape, level = (20, 20, 20), 0.05  # a level in the conformal body (tail_fraction 0.01): an exact count
    rng = np.random.default_rng(5)
    shifts = {f"sub-C{i:02d}": float(s) for i, s in enumerate(rng.normal(0.0, 0.4, 12), start=1)}
    _shifted_controls(tmp_path, shifts, shape, seed=6)
    null = tmp_path / "null.npz"
    assert main(["calibrate", "--derivatives-dir", str(tmp_path), "--scans", *shifts, "--scores", SCORE,
                 "--out", str(null), *PLAIN_CALIBRATION, "--calibration-unit", unit]) == 0
    for prefix in shifts:
        assert main(["probability", "--derivatives-dir", str(tmp_path), "--prefix", prefix, "--null", str(null),
                     "--levels", str(level)]) == 0
    healthy, empty = tmp_path / "healthy.tsv", tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), AFFINE), empty)
    # The last person as a "patient" whose lesion mask is empty: it joins the healthy table as such.
    assert main(["evaluate", "--derivatives-dir", str(tmp_path), "--scores", SCORE, "--calibration", *shifts,
                 "--scan", "sub-C12", str(empty), "--healthy", *list(shifts)[:-1], "--levels", str(level),
                 "--out", str(tmp_path / "e.tsv"), "--summary", str(tmp_path / "s.tsv"),
                 "--curves", str(tmp_path / "c.json"), "--healthy-out", str(healthy), "--bootstrap", "10"]) == 0
    rows = {r["participant_id"]: r for r in _rows(healthy)}
    assert set(rows) == {*shifts, POOLED}
    assert rows["sub-C01"]["role"] == "control" and rows["sub-C12"]["role"] == "patient-without-lesions"
    maps = {p: np.asarray(nib.load(ScanDerivatives(tmp_path, p).novelty(SCORE)).dataobj, np.float64).ravel()
            for p in shifts}
    realised = []
    for prefix in shifts:
        people = [np.sort(v) for q, v in maps.items() if q != prefix] if unit == "subject" else \
            [np.sort(np.concatenate([v for q, v in maps.items() if q != prefix]))]
        p = np.max([(len(o) - np.searchsorted(o, maps[prefix], side="left") + 1.0) / (len(o) + 1.0) for o in people],
                   axis=0)
        expected = np.mean(p <= level)
        assert float(rows[prefix]["realised_fpr"]) == pytest.approx(expected, abs=1e-9), prefix
        assert int(rows[prefix]["n_scored_voxels"]) == np.prod(shape)
        realised.append(expected)
    if unit == "voxel":
        # Every person differs from the level (the shifts are real)...
        assert max(realised) > 2 * level and min(realised) < level / 2
        # ...but over people the out-of-fold rate stays near it: a 0.4-sd shift spread, 12 people.
        assert level / 2 < np.mean(realised) < 1.5 * level
    else:
        # Judged against the worst of 11 others, a person is above the level only when it is the most shifted of
        # the 12 (here: once at most), and then by less than the pooled null lets the most shifted one go.
        assert sum(r > level for r in realised) <= 1 and max(realised) < 2 * level
