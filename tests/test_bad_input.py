"""Every kind of bad input ends in one clear line naming the file, and touches nothing.

Each case starts from a valid synthetic scan, breaks one thing and runs the
real command line. The contract checked every time: exit status 2, exactly
one stderr line ``anomri: error: <file>: <problem>`` naming the offending
file, no output file, and the input files byte-identical afterwards.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    B_VALUE,
    DIRECTION_SEED,
    N_DIRECTIONS,
    REPO,
    CliResult,
    SyntheticScan,
    digest_tree,
    files_under,
    unit_directions,
    write_gradients,
    write_synthetic_scan,
)

from anomri.errors import InputError
from anomri.io.bids import index_cohort

RunCli = Callable[[list[str]], CliResult]


def assert_one_line_error(code: int, err: str, offending: Path) -> None:
    """Exit status 2 and the single ``anomri: error:`` line naming ``offending``."""
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anomri: error: "), err
    assert str(offending) in lines[0], err


def assert_rejected(run: Callable[[], tuple[int, str]], offending: Path, inputs: Path, outputs: Path) -> None:
    """Run a command on bad input and check the whole bad-input contract."""
    before = digest_tree(inputs)
    assert before, "the test must hash some input files"
    code, err = run()
    assert_one_line_error(code, err, offending)
    assert files_under(outputs) == []
    assert digest_tree(inputs) == before


def reject_preprocess(run_cli: RunCli, scan: SyntheticScan, offending: Path, *extra: str) -> None:
    """``anomri preprocess`` on ``scan`` (plus ``extra`` options) must reject ``offending``."""
    outputs = scan.dwi.parent.parent / "derivatives"

    def run() -> tuple[int, str]:
        result = run_cli(scan.preprocess_argv(outputs) + list(extra))
        assert result.out == ""
        return result.code, result.err

    assert_rejected(run, offending, scan.dwi.parent, outputs)


def reject_preprocess_subprocess(scan: SyntheticScan, offending: Path) -> None:
    """As :func:`reject_preprocess`, through a real ``python -m anomri`` process."""
    outputs = scan.dwi.parent.parent / "derivatives"

    def run() -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-m", "anomri", *scan.preprocess_argv(outputs)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.stdout == ""
        return proc.returncode, proc.stderr

    assert_rejected(run, offending, scan.dwi.parent, outputs)


def save_like(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


# --------------------------------------------------------------------------- gradient files


def test_missing_bval_real_process(synthetic_scan: SyntheticScan) -> None:
    synthetic_scan.bval.unlink()
    reject_preprocess_subprocess(synthetic_scan, synthetic_scan.bval)


def test_missing_bvec(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    synthetic_scan.bvec.unlink()
    reject_preprocess(run_cli, synthetic_scan, synthetic_scan.bvec)


def test_fewer_bvals_than_volumes(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    s = synthetic_scan
    np.savetxt(s.bval, s.bvals[None, :-1], fmt="%g")
    reject_preprocess(run_cli, s, s.bval)


def test_fewer_bvecs_than_volumes(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    s = synthetic_scan
    np.savetxt(s.bvec, s.bvecs[:-1].T, fmt="%.8f")
    reject_preprocess(run_cli, s, s.bvec)


def test_no_b0_volume(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    s = synthetic_scan
    n = len(s.bvals)
    write_gradients(s.bval, s.bvec, np.full(n, 1000.0), unit_directions(seed=2, n=n))
    reject_preprocess(run_cli, s, s.bval)


@pytest.mark.parametrize("norm", [0.0, 0.8, 1.3], ids=["zero", "short", "long"])
def test_non_unit_bvec_on_dw_volume(run_cli: RunCli, synthetic_scan: SyntheticScan, norm: float) -> None:
    s = synthetic_scan
    bvecs = s.bvecs.copy()
    bvecs[5] *= norm  # volume 5 is diffusion-weighted
    assert s.bvals[5] > 50
    write_gradients(s.bval, s.bvec, s.bvals, bvecs)
    reject_preprocess(run_cli, s, s.bvec)


# --------------------------------------------------------------------------- images


def test_3d_image_where_4d_expected(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    s = synthetic_scan
    save_like(s.dwi, s.data[..., 0], s.affine)
    reject_preprocess(run_cli, s, s.dwi)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_image(run_cli: RunCli, synthetic_scan: SyntheticScan, value: float) -> None:
    s = synthetic_scan
    data = s.data.copy()
    data[4, 4, 3, 7] = value
    save_like(s.dwi, data, s.affine)
    reject_preprocess(run_cli, s, s.dwi)


def test_garbage_bytes_real_process(synthetic_scan: SyntheticScan) -> None:
    s = synthetic_scan
    s.dwi.write_bytes(np.random.default_rng(0).bytes(4000))
    reject_preprocess_subprocess(s, s.dwi)


@pytest.mark.parametrize("keep", [0.02, 0.6], ids=["cut-in-header", "cut-in-data"])
def test_truncated_gzip(run_cli: RunCli, synthetic_scan: SyntheticScan, keep: float) -> None:
    s = synthetic_scan
    s.dwi.write_bytes(s.dwi.read_bytes()[: int(keep * s.dwi.stat().st_size)])
    reject_preprocess(run_cli, s, s.dwi)


def test_truncated_uncompressed_stream(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    # A complete gzip container of a short NIfTI, as left by an interrupted uncompressed copy.
    s = synthetic_scan
    raw = gzip.decompress(s.dwi.read_bytes())
    s.dwi.write_bytes(gzip.compress(raw[: len(raw) // 2], mtime=0))
    reject_preprocess(run_cli, s, s.dwi)


# --------------------------------------------------------------------------- masks


def test_lesion_mask_of_other_shape(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    s = synthetic_scan
    lesion = save_like(s.dwi.parent / "lesion.nii.gz", np.zeros((8, 8, 5), np.uint8), s.affine)
    reject_preprocess(run_cli, s, lesion, "--lesion-mask", str(lesion))


def test_lesion_mask_of_other_affine(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    s = synthetic_scan
    shifted = s.affine.copy()
    shifted[0, 3] += 2.0  # one voxel off
    lesion = save_like(s.dwi.parent / "lesion.nii.gz", np.zeros(s.data.shape[:3], np.uint8), shifted)
    reject_preprocess(run_cli, s, lesion, "--lesion-mask", str(lesion))


def test_empty_brain_mask(run_cli: RunCli, synthetic_scan: SyntheticScan) -> None:
    s = synthetic_scan
    mask = save_like(s.dwi.parent / "brain_mask.nii.gz", np.zeros(s.data.shape[:3], np.uint8), s.affine)
    reject_preprocess(run_cli, s, mask, "--mask", str(mask))


# --------------------------------------------------------------------------- cohort


def bids_without_controls(root: Path) -> Path:
    """A BIDS tree whose only participants are patients."""
    for pid in ("sub-01", "sub-02"):
        write_synthetic_scan(root / pid / "dwi", name=f"{pid}_dwi")
    (root / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tpatient\nsub-02\tpatient\n")
    return root


def test_no_controls_index_cohort(tmp_path: Path) -> None:
    bids = bids_without_controls(tmp_path / "bids")
    before = digest_tree(bids)
    with pytest.raises(InputError) as info:
        index_cohort(bids)
    assert info.value.path == str(bids / "participants.tsv")
    assert "control" in info.value.problem
    assert digest_tree(bids) == before


def test_no_controls_snakemake_dry_run(tmp_path: Path) -> None:
    bids = bids_without_controls(tmp_path / "bids")
    outputs = tmp_path / "derivatives"
    before = digest_tree(bids)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", f"bids_dir={bids}",
         f"output_dir={outputs}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    # Snakemake decides where its own messages go; the anomri line must be whole in one of them.
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("anomri: error:")]
    assert len(errors) == 1, proc.stdout + proc.stderr
    assert str(bids / "participants.tsv") in errors[0]
    assert "no controls" in errors[0]
    assert files_under(outputs) == []
    assert digest_tree(bids) == before


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize(("directions", "b_value"), [
    (unit_directions(seed=7), B_VALUE),  # same count and b-value, other directions
    (unit_directions(DIRECTION_SEED), 2000.0),  # same directions, other shell
    (unit_directions(DIRECTION_SEED, n=N_DIRECTIONS - 1), B_VALUE),  # one direction fewer
], ids=["directions", "b-value", "count"])
def test_pool_rejects_a_different_gradient_scheme(run_cli: RunCli, tmp_path: Path, directions: np.ndarray,
                                                  b_value: float) -> None:
    derivatives, pool = tmp_path / "derivatives", tmp_path / "pool"
    first = write_synthetic_scan(tmp_path / "inputs" / "sub-01", name="sub-01_dwi")
    second = write_synthetic_scan(tmp_path / "inputs" / "sub-02", name="sub-02_dwi", directions=directions,
                                  b_value=b_value)
    for prefix, scan in (("sub-01", first), ("sub-02", second)):
        assert run_cli(scan.preprocess_argv(derivatives, prefix)).code == 0
    second_features = derivatives / "sub-02" / "dwi" / "sub-02_space-dwi_desc-qspace_features.nii.gz"
    assert second_features.is_file()

    def run() -> tuple[int, str]:
        result = run_cli(["pool", "--derivatives-dir", str(derivatives), "--scans", "sub-01", "sub-02",
                          "--out", str(pool / "pool.npz")])
        return result.code, result.err

    assert_rejected(run, second_features, derivatives, pool)
    # The scans are fine on their own: only mixing them is wrong.
    assert run_cli(["pool", "--derivatives-dir", str(derivatives), "--scans", "sub-02",
                    "--out", str(pool / "pool.npz")]).code == 0
