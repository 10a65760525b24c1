"""Reading and checking FSL b-value / b-vector files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dipy.core.gradients import GradientTable, gradient_table

from anomri.errors import InputError

#: A diffusion-weighted b-vector whose norm is farther than this from 1 is rejected.
UNIT_TOLERANCE = 0.05


def _read_table(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, f"{what} file not found (FSL format, beside the DWI)")
    try:
        return np.atleast_2d(np.loadtxt(path, dtype=np.float64))
    except ValueError as exc:
        raise InputError(path, f"unreadable {what} file ({exc})") from exc


def read_bvals_bvecs(bval_path: str | Path, bvec_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read FSL gradient files; return bvals (N,) and bvecs (N, 3).

    b-vectors stored one row per volume (N x 3) instead of FSL's 3 x N are
    accepted and transposed, a common quirk of real data.
    """
    bval_path, bvec_path = Path(bval_path), Path(bvec_path)
    bvals = _read_table(bval_path, "b-value")
    if min(bvals.shape) != 1:
        raise InputError(bval_path, f"b-values must be one row, got shape {bvals.shape}")
    bvals = bvals.ravel()
    bvecs = _read_table(bvec_path, "b-vector")
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T
    if bvecs.shape[0] != 3:
        raise InputError(bvec_path, f"b-vectors must be 3 rows (FSL), got shape {bvecs.shape}")
    if not np.isfinite(bvals).all():
        raise InputError(bval_path, "contains NaN/Inf")
    return bvals, bvecs.T


def load_gradient_table(
    bval_path: str | Path, bvec_path: str | Path, n_volumes: int, b0_threshold: float = 50.0
) -> GradientTable:
    """Read and check a scan's gradients, returning a dipy ``GradientTable``.

    Checks, each failing with an :class:`~anomri.errors.InputError` naming the file:
    counts agree with the image's ``n_volumes``, at least one b0 volume
    (b <= ``b0_threshold``), and unit b-vectors on diffusion-weighted volumes.
    """
    bval_path, bvec_path = Path(bval_path), Path(bvec_path)
    bvals, bvecs = read_bvals_bvecs(bval_path, bvec_path)
    if len(bvals) != n_volumes:
        raise InputError(bval_path, f"{len(bvals)} b-values for {n_volumes} volumes")
    if len(bvecs) != n_volumes:
        raise InputError(bvec_path, f"{len(bvecs)} b-vectors for {n_volumes} volumes")
    if (bvals < 0).any():
        raise InputError(bval_path, "negative b-values")
    is_b0 = bvals <= b0_threshold
    if not is_b0.any():
        raise InputError(bval_path, f"no b0 volume (no b-value <= {b0_threshold:g})")
    if not np.isfinite(bvecs[~is_b0]).all():
        raise InputError(bvec_path, "NaN/Inf b-vectors on diffusion-weighted volumes")
    norms = np.linalg.norm(bvecs[~is_b0], axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_TOLERANCE)
    if bad.size:
        volumes = np.flatnonzero(~is_b0)[bad]
        raise InputError(
            bvec_path,
            f"{bad.size} diffusion-weighted volume(s) have zero or non-unit b-vectors "
            f"(volume {volumes[0]}: norm {norms[bad[0]]:.3f})",
        )
    # b0 volumes may carry arbitrary (even NaN) vectors in real data; they carry no direction.
    bvecs = bvecs.copy()
    bvecs[is_b0] = 0.0
    bvecs[~is_b0] /= norms[:, None]
    return gradient_table(bvals, bvecs=bvecs, b0_threshold=b0_threshold)
