"""Shared fixtures: a small valid synthetic diffusion scan, the CLI runner and file digests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomri.cli import main

REPO = Path(__file__).resolve().parents[1]

#: The CLI defaults most tests were written against, before the flags took the pipeline's (config.yaml) values:
#: raw S/S0 features left unharmonised (so tests can check them against the signal they were made from), and
#: calibration without erosion, smoothing or tissue classes.
RAW_FEATURES = ["--features", "raw", "--harmonisation", "none"]
PLAIN_CALIBRATION = ["--erosion-voxels", "0", "--smoothing-fwhm-mm", "0", "--tissue-classes", "1", "--centring", "none"]

#: Grid of the synthetic scan: small enough to preprocess in milliseconds.
SHAPE = (8, 8, 6)
AFFINE = np.array([[2.0, 0, 0, -8], [0, 2.0, 0, -8], [0, 0, 2.5, -7.5], [0, 0, 0, 1]])
N_B0, N_DIRECTIONS, B_VALUE = 2, 12, 1000.0
DIRECTION_SEED = 1  # seed of the default gradient directions


@dataclass(frozen=True)
class SyntheticScan:
    """A valid scan on disk and the arrays it was written from."""

    dwi: Path
    bval: Path
    bvec: Path
    data: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray  # (N, 3)

    @property
    def affine(self) -> np.ndarray:
        return AFFINE

    def preprocess_argv(self, output_dir: Path, prefix: str = "sub-01") -> list[str]:
        """``anomri preprocess`` arguments for this scan."""
        return ["preprocess", "--dwi", str(self.dwi), "--bval", str(self.bval), "--bvec", str(self.bvec),
                "--output-dir", str(output_dir), "--prefix", prefix, *RAW_FEATURES]


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def unit_directions(seed: int, n: int = N_DIRECTIONS) -> np.ndarray:
    """``n`` random unit vectors (seeded)."""
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_gradients(bval: Path, bvec: Path, bvals: np.ndarray, bvecs: np.ndarray) -> None:
    """FSL layout: one row of b-values, three rows of b-vectors."""
    np.savetxt(bval, bvals[None], fmt="%g")
    np.savetxt(bvec, bvecs.T, fmt="%.8f")


def write_synthetic_scan(folder: Path, name: str = "sub-01_dwi", directions: np.ndarray | None = None,
                         b_value: float = B_VALUE, seed: int = 0) -> SyntheticScan:
    """Write a 2 b0 + 12 direction scan of a bright ellipsoidal "brain" in dark background.

    The brain is an anisotropic tensor (so DW volumes differ) with Gaussian
    noise; the background is dim noise, which ``median_otsu`` separates.
    """
    directions = unit_directions(DIRECTION_SEED) if directions is None else directions
    bvals = np.r_[np.zeros(N_B0), np.full(len(directions), b_value)]
    bvecs = np.r_[np.zeros((N_B0, 3)), directions]
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"), -1)
    brain = ((grid / np.array([3.2, 3.2, 2.4])) ** 2).sum(-1) <= 1.0
    # Zeppelin along x, mm^2/s: S = S0 exp(-b (d_perp + (d_par - d_perp) (g . x)^2)).
    adc = 0.4e-3 + 1.2e-3 * bvecs[:, 0] ** 2
    s0 = np.where(brain, 1000.0, 30.0)
    rng = np.random.default_rng(seed)
    data = s0[..., None] * np.exp(-bvals * adc) + rng.normal(0.0, 10.0, SHAPE + (len(bvals),))
    data = np.abs(data).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    dwi, bval, bvec = folder / f"{name}.nii.gz", folder / f"{name}.bval", folder / f"{name}.bvec"
    nib.save(nib.Nifti1Image(data, AFFINE), dwi)
    write_gradients(bval, bvec, bvals, bvecs)
    return SyntheticScan(dwi, bval, bvec, data, bvals, bvecs)


@pytest.fixture
def synthetic_scan(tmp_path: Path) -> SyntheticScan:
    """A valid synthetic scan in ``tmp_path / "inputs"``."""
    return write_synthetic_scan(tmp_path / "inputs")


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch):
    """Put torch's thread count, every BLAS/OpenMP limit and the thread variables back after the test
    (``anomri --threads N`` sets them for the whole process)."""
    import torch
    from threadpoolctl import threadpool_limits

    from anomri.cli import THREAD_VARIABLES

    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)  # undone (the old value restored) after the test
    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores the original limits on exit
        yield
    torch.set_num_threads(before)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], CliResult]:
    """Run ``anomri.cli.main`` in-process and capture what it printed."""

    def run(argv: list[str]) -> CliResult:
        capsys.readouterr()  # drop anything printed before this command
        code = main(argv)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def digest_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root``, keyed by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def files_under(root: Path) -> list[Path]:
    """Every file below ``root`` (none when it does not exist)."""
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def derivative_grid(side: int) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A 2 mm reference image of ``side``^3 voxels and a cubic brain mask one voxel in from its edge."""
    reference = nib.Nifti1Image(np.zeros((side,) * 3, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    brain = np.zeros((side,) * 3, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    return reference, brain


def new_derivative_scan(root: Path, prefix: str, brain: np.ndarray, reference: nib.Nifti1Image):
    """An anomri derivatives folder for ``prefix`` under ``root``, holding only its brain mask."""
    from anomri.io.derivatives import ScanDerivatives
    from anomri.io.nifti import save_volume

    scan = ScanDerivatives(root, prefix)
    scan.dir.mkdir(parents=True)
    save_volume(scan.mask, brain, reference, dtype=np.uint8)
    return scan
