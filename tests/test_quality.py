"""The subject-level out-of-distribution check: shift statistic, the controls' out-of-fold range, the verdicts."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from anomri.cli import main
from anomri.io.derivatives import ScanDerivatives, sidecar_path
from anomri.maps.probability import HealthyNull
from anomri.maps.quality import ABOVE, BELOW, UNKNOWN, WITHIN, check_shift, expected_flagged_fraction, subject_shift
from conftest import PLAIN_CALIBRATION

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SCORE = "vae-reg"


@pytest.mark.parametrize("shift", [-1.0, 0.0, 0.4, 1.5])
def test_shift_of_a_scan_whose_bulk_sits_higher_by_d_healthy_sds(shift: float) -> None:
    # A healthy null N(0, 1); a scan N(d, 1): its voxels' p = Phi(-(x)) and its median voxel sits at d.
    x = np.random.default_rng(0).normal(shift, 1.0, 200_001)
    log_p = stats.norm.logsf(x)
    assert subject_shift(log_p) == pytest.approx(np.median(x), abs=1e-9)
    assert subject_shift(log_p) == pytest.approx(shift, abs=0.01)


def test_expected_flagged_fraction_matches_a_shifted_normal() -> None:
    assert expected_flagged_fraction(0.0, 0.01) == pytest.approx(0.01)
    x = np.random.default_rng(1).normal(0.8, 1.0, 1_000_000)
    brute = np.mean(stats.norm.sf(x) <= 0.01)
    assert expected_flagged_fraction(0.8, 0.01) == pytest.approx(brute, rel=0.02)


def test_verdicts_against_the_other_controls_range() -> None:
    shifts = {"sub-C01": -0.2, "sub-C02": 0.1, "sub-C03_ses-1": 0.3, "sub-C03_ses-2": 0.35}
    assert check_shift(0.5, shifts, margin=0.25).verdict == WITHIN
    assert check_shift(0.7, shifts, margin=0.25).verdict == ABOVE
    assert check_shift(-0.5, shifts, margin=0.25).verdict == BELOW
    # A control is compared with the others only: without its own two sessions the range ends at 0.1.
    check = check_shift(0.5, shifts, exclude="sub-C03", margin=0.25)
    assert check.control_range == (-0.2, 0.1) and check.verdict == ABOVE and check.out_of_distribution
    assert check_shift(3.0, {"sub-C01": 0.0}, exclude="sub-C01").verdict == UNKNOWN
    assert "a healthy brain this shifted would be flagged on about" in check.message((0.01,))
    with pytest.raises(ValueError, match="margin"):
        check_shift(0.0, shifts, margin=-1.0)


def _scan(root, prefix: str, values: np.ndarray) -> None:
    scan = ScanDerivatives(root, prefix)
    for path, data in ((scan.mask, np.ones(values.shape)), (scan.b0, np.ones(values.shape)),
                       (scan.novelty(SCORE), values)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), AFFINE), path)


@pytest.mark.parametrize("centring", ["none", "median-iqr"])
def test_calibration_measures_every_controls_shift_out_of_fold_and_flags_a_shifted_scan(tmp_path,
                                                                                       centring: str) -> None:
    """Eight controls N(s_i, 1) with known shifts s_i; a patient N(2, 1) whose whole brain sits higher.

    Each control's recorded shift is its median's position among the *other* controls' voxels, as a normal
    quantile (brute force below); the shifted patient is out of distribution, a patient like the controls is not.
    Centring each scan (which takes the shift out of its lesion probability) leaves the check as it is: it is
    measured on the scores before centring.
    """
    shape, rng = (16, 16, 16), np.random.default_rng(2)
    true = dict(zip([f"sub-C0{i}" for i in range(1, 9)], np.linspace(-0.3, 0.3, 8)))
    maps = {p: s + rng.normal(size=shape) for p, s in true.items()}
    for prefix, values in maps.items():
        _scan(tmp_path, prefix, values)
    _scan(tmp_path, "sub-P01", 2.0 + rng.normal(size=shape))
    _scan(tmp_path, "sub-P02", rng.normal(size=shape))
    null_path = tmp_path / "null.npz"
    assert main(["calibrate", "--derivatives-dir", str(tmp_path), "--scans", *true, "--scores", SCORE,
                 "--out", str(null_path), *PLAIN_CALIBRATION, "--centring", centring]) == 0
    null = HealthyNull.load(null_path)
    assert null.postprocessing.centring == centring
    for prefix, values in maps.items():
        others = np.sort(np.concatenate([v.ravel() for q, v in maps.items() if q != prefix]))
        median = np.median(values)
        p = (1 + len(others) - np.searchsorted(others, median, side="left")) / (len(others) + 1)
        assert null.control_shifts[prefix] == pytest.approx(stats.norm.isf(p), abs=0.02), prefix
    assert np.argsort(list(null.control_shifts.values())).tolist() == list(range(8))  # the true order
    verdicts = {}
    for prefix in ["sub-P01", "sub-P02", "sub-C08"]:
        assert main(["probability", "--derivatives-dir", str(tmp_path), "--prefix", prefix, "--null",
                     str(null_path), "--levels", "0.01"]) == 0
        record = json.loads(sidecar_path(ScanDerivatives(tmp_path, prefix).probseg).read_text())["QualityCheck"]
        verdicts[prefix] = record["Verdict"]
    assert verdicts == {"sub-P01": ABOVE, "sub-P02": WITHIN, "sub-C08": WITHIN}
    # The shifted patient's verdict reaches the cohort table, and the log says it once more.
    out = tmp_path / "quality.tsv"
    assert main(["quality", "--derivatives-dir", str(tmp_path), "--scans", "sub-P01", "sub-P02", "sub-C08",
                 "--controls", "sub-C08", "--levels", "0.01", "--out", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    header = rows[0]
    table = {r[0]: dict(zip(header, r)) for r in rows[1:]}
    assert table["sub-P01"]["verdict"] == ABOVE and table["sub-C08"]["role"] == "control"
    if centring == "none":
        assert float(table["sub-P01"]["flagged_p01"]) > 0.2  # painted (28 % at 1 %): why the check exists
    else:
        assert float(table["sub-P01"]["flagged_p01"]) < 0.03  # centred: its shift is gone from its masks
    assert json.loads(out.with_suffix(".json").read_text())["shift"]["Description"]
