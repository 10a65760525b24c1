"""``anomri bids``: the BIDS-App command, its exit codes, and one real run on a tiny cohort.

The bad-input tests stop before Snakemake starts; the run builds a 6 mm cohort of 4 controls and
2 patients (one DWI uncompressed, one participant's gradients inherited from the dataset root) and
runs the participant level, then the group level, through Snakemake in this process.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from anomri.cli.bids import CONFIG_FILE, REPORT_FILE, ExitCode
from anomri.io.bids import index_cohort
from anomri.io.derivatives import ScanDerivatives

from conftest import CliResult, digest_tree, files_under, write_synthetic_scan

RunCli = Callable[[list[str]], CliResult]

#: Settings that keep the tiny run to a few minutes on 2 cores.
FAST = ["training.max_epochs=4", "training.patience=2", "training.noise_augmentation=[]",
        "scoring.scores=[neg-elbo]", "scoring.reference_size=2000", "scoring.n_samples=4",
        "split.folds=2", "evaluation.bootstrap=50"]


def small_bids(root: Path, rows: dict[str, str], with_dwi: tuple[str, ...]) -> Path:
    """participants.tsv with ``rows`` (label: group) and a real small scan for each label in ``with_dwi``."""
    root.mkdir(parents=True)
    lines = ["participant_id\tgroup"] + [f"sub-{label}\t{group}" for label, group in rows.items()]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    for label in with_dwi:
        write_synthetic_scan(root / f"sub-{label}" / "dwi", name=f"sub-{label}_dwi")
    return root


def assert_stopped(result: CliResult, code: ExitCode, named: str, bids: Path, before: dict, out: Path) -> None:
    """One error line naming ``named``, the exit code, nothing written, the input untouched."""
    assert result.code == code, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("anomri: error:")]
    assert len(lines) == 1 and named in lines[0], result.err
    assert files_under(out) == [] and not out.exists()
    assert digest_tree(bids) == before


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """sub-01..03 controls and sub-04 a patient, each with a scan; sub-05 listed without one."""
    return small_bids(tmp_path / "bids", {"01": "control", "02": "control", "03": "control", "04": "patient",
                                          "05": "patient"}, with_dwi=("01", "02", "03", "04"))


def test_listed_participant_without_dwi(run_cli: RunCli, cohort: Path, tmp_path: Path) -> None:
    before, out = digest_tree(cohort), tmp_path / "out"
    result = run_cli(["bids", str(cohort), str(out), "participant"])
    assert_stopped(result, ExitCode.INVALID_DATASET, "sub-05 listed but without a diffusion scan", cohort, before, out)


@pytest.mark.parametrize("flag", ["--participant-label", "--exclude-participant-label"])
def test_label_matching_nobody(run_cli: RunCli, cohort: Path, tmp_path: Path, flag: str) -> None:
    before, out = digest_tree(cohort), tmp_path / "out"
    result = run_cli(["bids", str(cohort), str(out), "participant", flag, "01", "07"])
    assert_stopped(result, ExitCode.EMPTY_SELECTION, "'07' matches no participant", cohort, before, out)


@pytest.mark.parametrize(("argv", "code", "named"), [
    (["group-level"], ExitCode.UNKNOWN_LEVEL, "'group-level'"),
    (["participant", "--config", "training.max_epochs=many"], ExitCode.USAGE, "$.training.max_epochs"),
    (["participant", "--config", "scorng=1"], ExitCode.USAGE, "'scorng' was unexpected"),
    (["participant", "--config", "bids_dir=/elsewhere"], ExitCode.USAGE, "BIDS_DIR"),
    (["participant", "--profile", "no-such-profile"], ExitCode.USAGE, "no-such-profile"),
    (["participant", "--participant-label", "0 1"], ExitCode.USAGE, "$.participant_label[0]"),
    (["participant", "--participant-label", "04", "05"], ExitCode.EMPTY_SELECTION, "no controls among"),
])
def test_bad_usage(run_cli: RunCli, cohort: Path, tmp_path: Path, argv: list[str], code: ExitCode,
                   named: str) -> None:
    before, out = digest_tree(cohort), tmp_path / "out"
    assert_stopped(run_cli(["bids", str(cohort), str(out), *argv]), code, named, cohort, before, out)


def test_missing_dataset_and_output_inside_it(run_cli: RunCli, cohort: Path, tmp_path: Path) -> None:
    before = digest_tree(cohort)
    result = run_cli(["bids", str(tmp_path / "nothing"), str(tmp_path / "out"), "participant"])
    assert_stopped(result, ExitCode.NO_INPUT, "BIDS directory not found", cohort, before, tmp_path / "out")
    result = run_cli(["bids", str(cohort), str(cohort / "anomri"), "participant"])
    assert_stopped(result, ExitCode.USAGE, "inside the input dataset", cohort, before, cohort / "anomri")


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo cohort as real BIDS: sub-C02's DWI uncompressed (.nii) and sub-C01's gradients only at the
    dataset root (dwi.bval, dwi.bvec: every demo scan has the same scheme)."""
    from anomri.demo.cohort import make_demo_cohort

    bids = make_demo_cohort(tmp_path_factory.mktemp("app") / "bids", n_controls=4, n_patients=2, seed=3,
                            voxel_size=6.0)
    for ext in ("bval", "bvec"):
        (bids / "sub-C01" / "dwi" / f"sub-C01_dwi.{ext}").rename(bids / f"dwi.{ext}")
    packed = bids / "sub-C02" / "dwi" / "sub-C02_dwi.nii.gz"
    with gzip.open(packed) as src, open(packed.with_suffix(""), "wb") as dst:
        shutil.copyfileobj(src, dst)
    packed.unlink()
    return bids


def run_app(*argv: str) -> int:
    """``python -m anomri bids ...`` in its own process, as a user runs it. (In this process, snakemake.shell would
    keep the sys.stdout of whichever test first imported it: pytest's capture stream, closed by then.)"""
    return subprocess.run([sys.executable, "-m", "anomri", "bids", *argv]).returncode


@pytest.fixture(scope="module")
def participant_run(tiny: Path) -> tuple[Path, dict[str, str], int]:
    """``anomri bids tiny out participant``: (output dir, input digests before, exit code)."""
    before = digest_tree(tiny)
    out = tiny.parent / "derivatives" / "anomri"
    code = run_app(str(tiny), str(out), "participant", "--cores", "2", "--config", *FAST)
    return out, before, code


def test_participant_level_writes_every_map(participant_run: tuple[Path, dict[str, str], int], tiny: Path) -> None:
    out, before, code = participant_run
    assert code == ExitCode.SUCCESS
    scans = index_cohort(tiny)
    assert [s.bval for s in scans[:2]] == [tiny / "dwi.bval", tiny / "sub-C02" / "dwi" / "sub-C02_dwi.bval"]
    assert scans[1].dwi.name == "sub-C02_dwi.nii"
    for scan in scans:
        derivatives = ScanDerivatives(out, scan.prefix)
        for path in (derivatives.novelty("neg-elbo"), derivatives.probseg, derivatives.lesion_mask(0.01)):
            assert path.is_file(), path
    assert (out / "evaluation.tsv").is_file() and (out / CONFIG_FILE).is_file()
    assert digest_tree(tiny) == before  # inputs are never modified


def test_group_level_writes_the_report(participant_run: tuple[Path, dict[str, str], int], tiny: Path) -> None:
    out, before, code = participant_run
    assert code == ExitCode.SUCCESS
    assert run_app(str(tiny), str(out), "group", "--cores", "2", "--config", *FAST) == ExitCode.SUCCESS
    html = (out / REPORT_FILE).read_text()
    assert "evaluation.tsv" in html and "training_history.tsv" in html
    assert digest_tree(tiny) == before


def test_workflow_config_error_is_one_line(run_cli: RunCli, tmp_path: Path) -> None:
    # Valid for the schema, refused by the workflow itself (workflow/rules/common.smk) once Snakemake reads it.
    bids = small_bids(tmp_path / "bids", {"01": "control", "02": "control", "03": "patient"},
                      with_dwi=("01", "02", "03"))
    result = run_cli(["bids", str(bids), str(tmp_path / "out"), "participant", "--config",
                      "scoring.scores=[neg-elbo]", "probability.scores=[vae-reg]"])
    assert result.code == ExitCode.USAGE, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("anomri: error:")]
    assert lines == ["anomri: error: config: probability.scores ['vae-reg'] are not among the computed scores "
                     "['neg-elbo']"]
