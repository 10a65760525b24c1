"""End to end: the real ``snakemake`` on a tiny generated cohort."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from anomri.cli import main
from anomri.demo.cohort import demo_participants
from anomri.io.derivatives import ScanDerivatives, desc_label, sidecar_path
from anomri.scores import score_ids

REPO = Path(__file__).resolve().parents[1]
#: Three controls, the smallest cohort the defaults must run: three cross-fitting folds, one control each.
N_CONTROLS, N_PATIENTS = 3, 2
#: Detection floor of the tiny run (test_detection_quality_floor): pooled AUROC, and AUPRC as a multiple of the
#: lesion prevalence (chance). Measured 0.862 and 12.3x (AUPRC 0.075 at prevalence 0.0061) on 2026-12-05; the
#: floors sit well below so that only a collapse of detection, not a seed or a platform, fails them.
AUROC_FLOOR, AUPRC_GAIN_FLOOR = 0.75, 4.0


def snakemake(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True)


def write_tiny_config(path: Path, output_dir: Path, n_controls: int = N_CONTROLS, n_patients: int = N_PATIENTS,
                      **sections) -> Path:
    """A config file for a tiny demo cohort (6 mm voxels) written to ``output_dir``; ``sections`` add or
    replace top-level keys (``bids_dir``, ``training``, ...)."""
    config = {
        "output_dir": str(output_dir),
        "demo": {"n_controls": n_controls, "n_patients": n_patients, "voxel_size": 6.0, "scheme": "3shell",
                 "seed": 3},
        **sections,
    }
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Run the default target on a tiny demo cohort; return the output dir."""
    tmp = tmp_path_factory.mktemp("workflow")
    out = tmp / "derivatives"
    configfile = write_tiny_config(
        tmp / "tiny.yaml", out,
        training={"max_epochs": 4, "patience": 2},
        # Every registered score, end to end; a small reference set keeps them quick.
        scoring={"scores": "all", "n_samples": 4, "reference_size": 2000},
        probability={"learned_combination": {"enabled": True, "C": 1.0}},
    )
    result = snakemake("--cores", "2", "--configfile", str(configfile))
    assert result.returncode == 0, result.stderr[-4000:]
    (tmp / "snakemake.stderr").write_text(result.stderr)  # the jobs' requested resources, for the memory test
    return out


def test_every_map_written_and_viewable(run: Path) -> None:
    bids = run / "sourcedata" / "demo"
    description = json.loads((run / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "anomri"
    for pid, _ in demo_participants(N_CONTROLS, N_PATIENTS):
        source = nib.load(bids / pid / "dwi" / f"{pid}_dwi.nii.gz")
        scan = ScanDerivatives(run, pid)
        mask = np.asarray(nib.load(scan.mask).dataobj) > 0
        assert mask.any()
        for path in [scan.novelty(s) for s in score_ids()] + [scan.probseg]:
            img = nib.load(path)
            data = np.asarray(img.dataobj)
            assert img.get_data_dtype() == np.float32
            np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
            assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
            assert np.all(data[~mask] == 0), path.name
            assert np.isfinite(data).all()
            sidecar = json.loads(sidecar_path(path).read_text())
            assert sidecar["GeneratedBy"]["Name"] == "anomri"
        prob = np.asarray(nib.load(scan.probseg).dataobj)
        assert prob.min() >= 0 and prob.max() <= 1
        sidecar = json.loads(sidecar_path(scan.novelty("det-rec-lik")).read_text())
        # Every map comes from one fold model: a control's own, a patient's the one it was dealt to.
        assert sidecar["Formula"] and len(sidecar["Model"]["SHA256"]) == 64


def _controls() -> list[str]:
    return [pid for pid, group in demo_participants(N_CONTROLS, N_PATIENTS) if group == "control"]


def _patients() -> list[str]:
    return [pid for pid, group in demo_participants(N_CONTROLS, N_PATIENTS) if group == "patient"]


def _sidecar(path: Path) -> dict:
    return json.loads(sidecar_path(path).read_text())


def test_every_control_is_scored_and_calibrated_out_of_fold(run: Path) -> None:
    """Fold k's model trains on the other folds' controls; a control's maps come from the one model that never saw
    it (its noisier copies' too) and its p from the other controls' null; a patient's maps from the one fold model it
    is dealt to, exactly as that model's own map of it, and its p from every fold model."""
    controls, folds = _controls(), sorted((run / "models").glob("fold-*"))
    assert len(folds) == N_CONTROLS  # three controls: three folds of one (leave one out)
    model_of = {}
    for fold in folds:
        with np.load(fold / "training_voxels.npz") as pool:
            trained = {str(s).split(" ")[0] for s in pool["scans"]}
        held_out = set(controls) - trained
        assert len(held_out) == 1 and len(trained) == N_CONTROLS - 1
        model_of[held_out.pop()] = str(fold / "vae.pt")
    for pid in controls:
        scan = ScanDerivatives(run, pid)
        assert _sidecar(scan.novelty("neg-elbo"))["Model"]["Path"] == model_of[pid]
        copies = sorted((run / "models" / "augmented").glob(f"noise-*/{pid}/dwi/{pid}_*_desc-negelbo_novelty.json"))
        assert copies and {json.loads(c.read_text())["Model"]["Path"] for c in copies} == {model_of[pid]}
        calibration = _sidecar(scan.probseg)["Calibration"]
        assert calibration["LeftOut"] == [pid] and calibration["FoldMaps"] == []
        assert pid not in {c["scan"] for c in calibration["copies"]} and pid not in calibration["scans"]
    for pid in _patients():
        scan = ScanDerivatives(run, pid)
        dealt = Path(_sidecar(scan.novelty("neg-elbo"))["Model"]["Path"]).parent
        assert str(dealt / "vae.pt") in model_of.values()
        for fold in folds:
            own = ScanDerivatives(fold / "maps", pid)
            assert _sidecar(own.novelty("neg-elbo"))["Model"]["Path"] == str(fold / "vae.pt")
            assert not own.novelty("det-rec-lik").exists()  # the other models compute the probability scores only
        own_map = ScanDerivatives(dealt / "maps", pid).novelty("neg-elbo")
        np.testing.assert_array_equal(np.asarray(nib.load(scan.novelty("neg-elbo")).dataobj),
                                      np.asarray(nib.load(own_map).dataobj))
        calibration = _sidecar(scan.probseg)["Calibration"]
        assert calibration["LeftOut"] == [] and len(calibration["FoldMaps"]) == N_CONTROLS
        assert sorted(calibration["scans"]) == controls
    for pid, _ in demo_participants(N_CONTROLS, N_PATIENTS):
        scan = ScanDerivatives(run, pid)
        prob = np.asarray(nib.load(scan.probseg).dataobj)
        lesions = np.asarray(nib.load(scan.lesion_mask(0.01)).dataobj)
        assert nib.load(scan.lesion_mask(0.01)).get_data_dtype() == np.uint8
        assert set(np.unique(lesions)) <= {0, 1}
        # The mask is the probability map thresholded at the level (min_component_voxels is 1 here),
        # up to the float32 rounding of the map.
        assert np.all(prob[lesions > 0] >= 0.99 - 1e-6)
        assert np.all(lesions[prob > 0.99 + 1e-6] == 1)
    sidecar = _sidecar(ScanDerivatives(run, "sub-C01").lesion_mask(0.01))
    assert sidecar["FalsePositiveLevel"] == 0.01 and sidecar["Type"] == "Lesion"


def test_evaluation_table(run: Path) -> None:
    with open(run / "evaluation.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert set(rows[0]) >= {"participant_id", "score", "auroc", "auprc", "best_dice", "n_lesion_voxels"}
    assert set(rows[0]) >= {"threshold", "dice_at_fpr", "healthy_fpr", "lesion_sensitivity", "n_fp_components",
                            "volume_error_ml", "relative_volume_error"}
    patients = [pid for pid, group in demo_participants(N_CONTROLS, N_PATIENTS) if group == "patient"]
    assert sorted({r["participant_id"] for r in rows}) == sorted(patients + ["pooled"])
    maps = score_ids() + ["lesion-probability"]
    assert len(rows) == (len(patients) + 1) * len(maps)
    for row in rows:
        assert 0.0 <= float(row["auroc"]) <= 1.0
        assert 0.0 < float(row["auprc"]) <= 1.0
        assert int(row["n_lesion_voxels"]) > 0
        assert 0.0 <= float(row["dice_at_fpr"]) <= 1.0 and 0.0 <= float(row["lesion_sensitivity"]) <= 1.0
        # One threshold per map kind, set on the calibration controls.
        assert row["threshold"] == next(r["threshold"] for r in rows if r["score"] == row["score"])
    with open(run / "evaluation_summary.tsv") as fh:
        summary = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["score"] for r in summary] == maps
    for row in summary:
        assert row["n_patients"] == str(len(patients))
        assert float(row["auroc_ci_low"]) <= float(row["auroc"]) <= float(row["auroc_ci_high"])


def test_out_of_fold_false_positive_rate_and_noise_matched_calibration(run: Path) -> None:
    from scipy import ndimage

    controls = _controls()
    with open(run / "evaluation_healthy.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert {r["participant_id"] for r in rows} == {*controls, "pooled"}
    for row in rows:
        if row["participant_id"] == "pooled":
            continue
        assert row["role"] == "control"
        scan = ScanDerivatives(run, row["participant_id"])
        brain = np.asarray(nib.load(scan.mask).dataobj) > 0
        # The voxels that could be flagged: the brain peeled by probability.erosion_voxels (1), not the whole brain.
        scored = ndimage.binary_erosion(brain)
        flagged = np.asarray(nib.load(scan.lesion_mask(float(row["level"]))).dataobj) > 0
        assert int(row["n_brain_voxels"]) == int(brain.sum()) and int(row["n_scored_voxels"]) == int(scored.sum())
        # The table holds 6 significant digits.
        assert float(row["realised_fpr"]) == pytest.approx(flagged[scored].sum() / scored.sum(), rel=1e-5)
    # Each scan is calibrated against, per other control, its copy nearest the scan's SNR.
    snr_of = {}
    for pid in controls:
        for level in ("100", "150", "200"):
            tree = run if level == "100" else run / "models" / "augmented" / f"noise-{level}"
            features = ScanDerivatives(tree, pid).features
            snr_of[pid, int(level) / 100] = _sidecar(features)["Preprocessing"]["noise"]["snr"]
    for pid, _ in demo_participants(N_CONTROLS, N_PATIENTS):
        record = _sidecar(ScanDerivatives(run, pid).probseg)["Calibration"]
        snr = _sidecar(ScanDerivatives(run, pid).features)["Preprocessing"]["noise"]["snr"]
        assert record["ScanSNR"] == snr
        expected = []
        for other in (c for c in controls if c != pid):
            nearest = min((1.0, 1.5, 2.0), key=lambda f: abs(np.log(snr_of[other, f]) - np.log(snr)))
            expected.append((other, nearest))
        assert sorted((c["scan"], c["factor"]) for c in record["copies"]) == expected  # any order of the controls
        # The -log10 p map is the probability map's p, unsaturated (checked where float32 1 - p is exact enough).
        prob = np.asarray(nib.load(ScanDerivatives(run, pid).probseg).dataobj, np.float64)
        evidence = np.asarray(nib.load(ScanDerivatives(run, pid).neglog10p).dataobj, np.float64)
        inside = (prob > 0) & (prob < 0.999)
        np.testing.assert_allclose(evidence[inside], -np.log10(1 - prob[inside]), rtol=1e-3, atol=1e-4)


def test_quality_table_lists_every_scan_with_its_shift_check(run: Path) -> None:
    with open(run / "quality.tsv") as fh:
        rows = {r["participant_id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert set(rows) == {pid for pid, _ in demo_participants(N_CONTROLS, N_PATIENTS)}
    for pid, row in rows.items():
        check = _sidecar(ScanDerivatives(run, pid).probseg)["QualityCheck"]
        assert row["role"] == ("control" if pid in _controls() else "patient")
        assert row["verdict"] == check["Verdict"] in ("within", "above", "below")
        assert float(row["shift"]) == pytest.approx(check["Shift"], abs=1e-4)
        # A control is compared with the *other* controls' out-of-fold shifts.
        others = [float(rows[c]["shift"]) for c in _controls() if c != pid]
        assert float(row["control_shift_low"]) == pytest.approx(min(others), abs=1e-3)
        assert float(row["control_shift_high"]) == pytest.approx(max(others), abs=1e-3)


def test_detection_quality_floor(run: Path) -> None:
    """A floor that fails if detection collapses: on this tiny 6 mm cohort (4 epochs, 4 Monte Carlo samples) the
    lesion probability must still rank lesion voxels well above the brain's and beat their prevalence many times."""
    with open(run / "evaluation.tsv") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["score"] == "lesion-probability"]
    pooled = next(r for r in rows if r["participant_id"] == "pooled")
    prevalence = int(pooled["n_lesion_voxels"]) / int(pooled["n_brain_voxels"])
    assert float(pooled["auroc"]) >= AUROC_FLOOR, pooled
    assert float(pooled["auprc"]) >= AUPRC_GAIN_FLOOR * prevalence, (pooled, prevalence)


def test_opt_in_learned_combination_is_cross_validated(run: Path) -> None:
    learned = json.loads((run / "calibration" / "learned_combination.json").read_text())
    patients = [pid for pid, group in demo_participants(N_CONTROLS, N_PATIENTS) if group == "patient"]
    assert learned["model"]["scores"] == score_ids() and learned["model"]["patients"] == patients
    for pid in patients:
        assert pid not in learned["folds"][pid]["patients"]
        assert 0.0 <= learned["cross_validation"][pid]["auprc"] <= 1.0
    for pid, _ in demo_participants(N_CONTROLS, N_PATIENTS):
        img = nib.load(ScanDerivatives(run, pid).learned_probseg)
        assert img.get_data_dtype() == np.float32
        assert 0.0 <= float(np.min(img.dataobj)) and float(np.max(img.dataobj)) <= 1.0


def test_report_figures_and_html(run: Path) -> None:
    figures = run / "figures"
    expected = [f"score-{m}_curves.png" for m in score_ids() + ["lesion-probability"]]
    expected += [f"{pid}_overlay.png" for pid, group in demo_participants(N_CONTROLS, N_PATIENTS)
                 if group == "patient"]
    expected += [f"{pid}_findings.png" for pid, _ in demo_participants(N_CONTROLS, N_PATIENTS)]
    expected.append("training_curves.png")
    assert sorted(p.name for p in figures.iterdir()) == sorted(expected)
    report = run.parent / "report.html"
    result = snakemake("--cores", "1", "--configfile", str(run.parent / "tiny.yaml"), "--report", str(report))
    assert result.returncode == 0, result.stderr[-2000:]
    html = report.read_text()
    for name in expected + ["evaluation_summary.tsv", "evaluation.tsv", "training_history.tsv"]:
        assert name in html, name


def test_every_participant_has_findings_on_the_cohort_page(run: Path) -> None:
    """Every participant, control or patient, has a clusters table (its rows the components of its lesion masks)
    and a findings figure, and the cohort page lists them all with links that resolve."""
    from scipy import ndimage

    from test_findings import page_links

    pids = [pid for pid, _ in demo_participants(N_CONTROLS, N_PATIENTS)]
    for pid in pids:
        scan = ScanDerivatives(run, pid)
        with open(scan.clusters_table, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        assert "neglog10p_peak" in json.loads(scan.clusters_table.with_suffix(".json").read_text())
        for level in (0.01, 0.001):
            mask = np.asarray(nib.load(scan.lesion_mask(level)).dataobj) > 0
            found = [r for r in rows if float(r["level"]) == level]
            assert sum(int(r["n_voxels"]) for r in found) == int(mask.sum())
            assert len(found) == ndimage.label(mask, np.ones((3, 3, 3)))[1]
        assert (run / "figures" / f"{pid}_findings.png").stat().st_size > 0
    links, rows = page_links(run / "cohort.html")
    assert sorted(row[0] for row in rows) == sorted(pids)
    assert {f"figures/{pid}_findings.png" for pid in pids} <= set(links)


def bids_validator() -> str | None:
    """The ``bids-validator-deno`` command: beside this interpreter (the test extra installs it) or on PATH."""
    beside = Path(sys.executable).parent / "bids-validator-deno"
    return str(beside) if beside.exists() else shutil.which("bids-validator-deno")


def test_derivatives_pass_the_bids_validator(run: Path) -> None:
    validator = bids_validator()
    if validator is None:
        pytest.skip("bids-validator-deno is not installed (pip install -e '.[test]')")
    result = subprocess.run([validator, "--format", "json", str(run)], capture_output=True, text=True)
    assert result.stdout, result.stderr[-2000:]
    issues = json.loads(result.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location"), i.get("issueMessage")) for i in issues if i["severity"] == "error"]
    assert errors == []


def test_descriptions_name_every_desc_label(run: Path) -> None:
    with open(run / "descriptions.tsv", newline="") as fh:
        rows = {row["desc_id"]: row for row in csv.DictReader(fh, delimiter="\t")}
    used = {part for path in run.glob("sub-*/dwi/*") for part in path.name.split("_") if part.startswith("desc-")}
    assert used == set(rows)
    assert {rows[f"desc-{desc_label(s)}"]["score_id"] for s in score_ids()} == set(score_ids())


def test_no_job_used_more_memory_than_it_requested(run: Path) -> None:
    """Each job's max RSS (its benchmark file) stays within the mem_mb Snakemake gave it (the resources line of
    the job in Snakemake's log), including the rules whose mem_mb grows with their input (measured_mem_mb in
    workflow/rules/common.smk)."""
    checked = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", (run.parent / "snakemake.stderr").read_text()):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        bench = re.search(r"^\s+benchmark: (.+)$", block, re.M)
        mem = re.search(r"\bmem_mb=(\d+)", block)
        if not (rule and bench and mem):
            continue
        with open(bench.group(1).strip(), newline="") as fh:
            max_rss = float(next(csv.DictReader(fh, delimiter="\t"))["max_rss"])
        assert max_rss <= int(mem.group(1)), (rule.group(1), bench.group(1), max_rss, mem.group(1))
        checked.append(rule.group(1))
    # Every rule that ran with a benchmark file, the input-scaled ones among them.
    assert {"preprocess", "preprocess_control", "score_control", "score_ensemble", "probability", "calibrate", "evaluate",
            "train"} <= set(checked)


def test_rerun_has_nothing_to_do(run: Path) -> None:
    result = snakemake("-n", "--cores", "1", "--configfile", str(run.parent / "tiny.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_scoring_is_deterministic(run: Path, tmp_path: Path) -> None:
    pid = _controls()[0]
    original, copy = ScanDerivatives(run, pid), ScanDerivatives(tmp_path, pid)
    copy.dir.mkdir(parents=True)
    for path in (original.features, sidecar_path(original.features), original.mask):
        shutil.copy(path, copy.dir)
    model = _sidecar(original.novelty("neg-elbo"))["Model"]["Path"]  # the control's out-of-fold model
    args = ["score", "--model", model, "--derivatives-dir", str(tmp_path),
            "--prefix", pid, "--scores", "neg-elbo", "enc-stoch-rec-err", "--n-samples", "4", "--device", "cpu"]
    assert main(args) == 0
    for score in ("neg-elbo", "enc-stoch-rec-err"):
        np.testing.assert_array_equal(np.asarray(nib.load(copy.novelty(score)).dataobj),
                                      np.asarray(nib.load(original.novelty(score)).dataobj))


def test_a_copy_unlike_the_model_is_named_before_any_map_is_written(run: Path, tmp_path: Path, capsys) -> None:
    pid = _controls()[0]
    original = ScanDerivatives(run, pid)
    scan, copy = ScanDerivatives(tmp_path / "scan", pid), ScanDerivatives(tmp_path / "copy", pid)
    for target in (scan, copy):
        target.dir.mkdir(parents=True)
        for path in (original.features, sidecar_path(original.features), original.mask):
            shutil.copy(path, target.dir)
    sidecar = json.loads(sidecar_path(copy.features).read_text())
    sidecar["FeatureNames"] = [f"other-{name}" for name in sidecar["FeatureNames"]]  # as if other shells
    sidecar_path(copy.features).write_text(json.dumps(sidecar))
    model = _sidecar(original.novelty("neg-elbo"))["Model"]["Path"]
    args = ["score", "--model", model, "--derivatives-dir", str(tmp_path / "scan"), "--prefix", pid,
            "--scores", "neg-elbo", "--copies", str(tmp_path / "copy"), "--copy-scores", "neg-elbo",
            "--n-samples", "2", "--device", "cpu"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(copy.features) in error[0] and "feature names differ" in error[0]
    assert not scan.novelty("neg-elbo").exists() and not copy.novelty("neg-elbo").exists()


def test_config_typo_is_rejected(tmp_path: Path) -> None:
    result = snakemake("-n", "--cores", "1", "--config", f"output_dir={tmp_path}", "scorng=1")
    assert result.returncode != 0
    assert "scorng" in result.stdout + result.stderr
