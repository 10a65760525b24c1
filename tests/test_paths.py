"""Any path, any dataset: the real ``snakemake`` with awkward folder names, and labels that try to inject.

Paths may hold spaces, quotes, non-ASCII characters and shell syntax: every value reaches the
shell quoted, so the runs succeed and nothing runs that the folder names spell. BIDS labels are
alphanumeric: a cohort whose labels are not stops before anything runs, with one clear line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, digest_tree, files_under, write_synthetic_scan
from test_findings import page_links
from test_workflow import snakemake, write_tiny_config

from anomri.demo.cohort import demo_participants
from anomri.io.derivatives import ScanDerivatives

#: A space, a single quote, a non-ASCII letter, and shell syntax that would create PWNED if a shell read it.
AWKWARD = "my cohort's ü $(touch PWNED) `touch PWNED`"
N_CONTROLS, N_PATIENTS = 2, 2
PIDS = [pid for pid, _ in demo_participants(N_CONTROLS, N_PATIENTS)]
PATIENTS = [pid for pid, group in demo_participants(N_CONTROLS, N_PATIENTS) if group == "patient"]
#: As small as a full run gets: one training and one calibration control, one cheap score.
TINY = {
    "split": {"folds": 2},
    "training": {"max_epochs": 2, "patience": 2, "noise_augmentation": []},
    "scoring": {"scores": ["neg-elbo"], "n_samples": 2},
    "probability": {"scores": ["neg-elbo"], "learned_combination": {"enabled": False, "C": 1.0}},
    "evaluation": {"bootstrap": 50},
}


def no_pwned(*folders: Path) -> None:
    """No file PWNED in the working directory, the temporary directory or below ``folders``."""
    assert not (REPO / "PWNED").exists()
    assert not (Path(tempfile.gettempdir()) / "PWNED").exists()
    for folder in folders:
        assert list(folder.rglob("PWNED")) == [], folder


def assert_complete(out: Path) -> None:
    """The default target's outputs of the tiny cohort are all there."""
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    for pid in PIDS:
        scan = ScanDerivatives(out, pid)
        for path in (scan.mask, scan.features, scan.novelty("neg-elbo"), scan.probseg, scan.lesion_mask(0.01)):
            assert path.stat().st_size > 0, path
    assert {line.split("\t")[0] for line in (out / "evaluation.tsv").read_text().splitlines()[1:]} == {
        *PATIENTS, "pooled"}
    assert (out / "figures" / "training_curves.png").stat().st_size > 0
    assert all((out / "figures" / f"{pid}_overlay.png").stat().st_size > 0 for pid in PATIENTS)
    # Every participant's findings, and the cohort page whose relative links resolve below the awkward folder.
    assert all(ScanDerivatives(out, pid).clusters_table.stat().st_size > 0 for pid in PIDS)
    assert all((out / "figures" / f"{pid}_findings.png").stat().st_size > 0 for pid in PIDS)
    assert sorted(row[0] for row in page_links(out / "cohort.html")[1]) == sorted(PIDS)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo, end to end, written to an awkward folder; return the output dir.

    It also runs the opt-in learned combination, so that every rule of the default target runs here or
    in :func:`test_a_bids_cohort_in_awkward_folders`.
    """
    tmp = tmp_path_factory.mktemp("paths")
    out = tmp / AWKWARD / "derivatives"
    config = write_tiny_config(tmp / "tiny.yaml", out, N_CONTROLS, N_PATIENTS, **{
        **TINY, "probability": {**TINY["probability"], "learned_combination": {"enabled": True, "C": 1.0}}})
    result = snakemake("--cores", "2", "--configfile", str(config))
    assert result.returncode == 0, result.stderr[-4000:]
    no_pwned(tmp)
    return out


def test_demo_runs_end_to_end_in_an_awkward_folder(demo_run: Path) -> None:
    assert_complete(demo_run)
    learned = json.loads((demo_run / "calibration" / "learned_combination.json").read_text())
    assert learned["model"]["patients"] == PATIENTS
    # Every job logged to its own file, found where the awkward path says.
    assert (demo_run / "logs" / "preprocess" / PIDS[0] / f"{PIDS[0]}.log").stat().st_size > 0
    result = snakemake("-n", "--cores", "1", "--configfile", str(demo_run.parent.parent / "tiny.yaml"))
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


def test_a_bids_cohort_in_awkward_folders(demo_run: Path, tmp_path: Path) -> None:
    # The demo's BIDS tree as a user's own cohort, in and out of awkward folders; this run adds the
    # rules the demo run leaves out (noise augmentation, a reference-set score).
    bids = tmp_path / AWKWARD / "bids dir"
    shutil.copytree(demo_run / "sourcedata" / "demo", bids)
    out = tmp_path / "out dir ü 'x'"
    before = digest_tree(bids)
    config = write_tiny_config(tmp_path / "cohort.yaml", out, bids_dir=str(bids), **{
        **TINY,
        "training": {**TINY["training"], "noise_augmentation": [1.5]},
        "scoring": {"scores": ["neg-elbo", "latent-nn-euclid"], "n_samples": 2, "reference_size": 500},
    })
    result = snakemake("--cores", "2", "--configfile", str(config))
    assert result.returncode == 0, result.stderr[-4000:]
    assert_complete(out)
    assert ScanDerivatives(out, PIDS[0]).novelty("latent-nn-euclid").stat().st_size > 0
    assert (out / "models" / "augmented" / "noise-150").is_dir()
    assert json.loads((out / "dataset_description.json").read_text())["SourceDatasets"][0]["URL"] == bids.as_uri()
    assert digest_tree(bids) == before
    no_pwned(tmp_path)


@pytest.mark.parametrize("label", ["01`touch PWNED`", "01$(touch PWNED)"])
def test_a_label_that_injects_stops_the_run_before_anything_runs(tmp_path: Path, label: str) -> None:
    bids, out = tmp_path / "bids", tmp_path / "derivatives"
    for pid in ("sub-C1", "sub-C2", f"sub-{label}"):
        write_synthetic_scan(bids / pid / "dwi", name=f"{pid}_dwi")
    tsv = bids / "participants.tsv"
    tsv.write_text(f"participant_id\tgroup\nsub-C1\tcontrol\nsub-C2\tcontrol\nsub-{label}\tpatient\n")
    before = digest_tree(bids)
    assert len(before) == 10
    config = write_tiny_config(tmp_path / "cohort.yaml", out, bids_dir=str(bids), **TINY)
    # A real run, not a dry run: nothing may start.
    result = snakemake("--cores", "1", "--configfile", str(config))
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("anomri: error:")]
    assert len(errors) == 1, result.stdout + result.stderr
    assert errors[0] == (f"anomri: error: {tsv}: line 4: participant_id 'sub-{label}' is not sub-<label> with an "
                         "alphanumeric label (BIDS labels are letters and digits only (A-Z, a-z, 0-9))")
    assert files_under(out) == []
    assert digest_tree(bids) == before
    no_pwned(tmp_path)


def test_wildcards_match_alphanumeric_labels_only(demo_run: Path) -> None:
    # A target whose label is not alphanumeric matches no rule, even when asked for by name.
    config = str(demo_run.parent.parent / "tiny.yaml")
    for label in ("C01", "C01;touch PWNED"):
        target = str(ScanDerivatives(demo_run, f"sub-{label}").mask)
        result = snakemake(target, "-n", "--cores", "1", "--configfile", config)
        if label == "C01":  # the same target with a valid label: built already
            assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr, result.stderr
        else:
            assert result.returncode != 0
            messages = result.stdout + result.stderr
            assert "MissingRuleException" in messages or "No rule to produce" in messages, messages
