"""Rotation-invariant q-space features: spherical-harmonic power per shell.

On each shell the signal is fit by real, even spherical harmonics
``f(u) = sum_{l,m} c_lm Y_lm(u)`` on that shell's own gradient directions, and
summarised by the power of each even degree l::

    P_l = sum_m c_lm²  =  ∫ |f_l(u)|² dΩ   (Parseval; no 1/(2l+1) factor)

A rotation mixes the coefficients of one degree by an orthogonal matrix when
the basis is orthonormal (dipy's ``descoteaux07``, non-legacy), so P_l does not
depend on the fibre orientation. Because each shell is fit on its own
directions, scans with different gradient directions or counts give comparable
features. For an isotropic signal ``s`` on a shell, ``P_0 = 4π s²`` and
``P_l = 0`` for l > 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from dipy.core.geometry import cart2sphere
from dipy.reconst.shm import real_sh_descoteaux, smooth_pinv

from anomri.dmri.shells import assign_shells, detect_shells

logger = logging.getLogger(__name__)

__all__ = ["sh_basis", "sh_invariants"]


def sh_basis(directions: np.ndarray, sh_order_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal real even SH (dipy ``descoteaux07``, non-legacy) at unit ``directions`` (n, 3).

    Returns
    -------
    basis : ndarray (n, K)
        ``K = (sh_order_max + 1)(sh_order_max + 2) / 2`` harmonics.
    l_values : ndarray (K,)
        Degree of each column.
    """
    if sh_order_max < 0 or sh_order_max % 2:
        raise ValueError(f"sh_order_max must be even and >= 0; got {sh_order_max}")
    _, theta, phi = cart2sphere(*np.asarray(directions, dtype=np.float64).T)
    basis, _, l_values = real_sh_descoteaux(sh_order_max, theta, phi, full_basis=False, legacy=False)
    return basis, l_values


def _fit_matrix(directions: np.ndarray, sh_order_max: int, smooth: float, bval: float) -> tuple[np.ndarray, np.ndarray]:
    """Regularised least-squares map from a shell's samples (n,) to SH coefficients (K,).

    Minimises ``(4π/n) |B c - y|² + smooth Σ (l(l+1))² c_lm²``: the sum
    approximates ``∫ (f - y)² dΩ + smooth ∫ (Δf)² dΩ``, with Δ the
    Laplace–Beltrami operator. The 4π/n keeps the penalty's strength
    independent of the number of directions; dipy's ``smooth`` omits it, so the
    same value would shrink a 30-direction fit more than a 90-direction one.
    """
    basis, l_values = sh_basis(directions, sh_order_max)
    n, n_coef = basis.shape
    if n < n_coef or np.linalg.matrix_rank(basis) < n_coef:
        raise ValueError(
            f"shell b={bval:g}: {n} directions do not determine the {n_coef} SH coefficients of "
            f"order {sh_order_max}; lower sh_order_max or leave this shell out (shells=...)"
        )
    penalty = np.sqrt(smooth * n / (4.0 * np.pi)) * l_values * (l_values + 1.0)
    return smooth_pinv(basis, penalty), l_values


def sh_invariants(
    signal: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    sh_order_max: int = 4,
    b0_threshold: float = 50.0,
    shells: Sequence[float] | None = None,
    smooth: float = 1e-4,
    tolerance: float = 100.0,
) -> tuple[np.ndarray, list[str]]:
    """SH power per even degree on every shell, for every voxel.

    Parameters
    ----------
    signal : ndarray (..., N)
        Normalised signal S/S0 of all N volumes (b0 volumes are ignored).
        A voxel with NaN gives NaN features, other voxels are unaffected.
    bvals : ndarray (N,)
        b-values, s/mm².
    bvecs : ndarray (N, 3)
        Gradient directions; normalised here, must be non-zero on shells.
    sh_order_max : int
        Highest even SH degree, the same on every shell so that scans share
        feature names. Every shell needs enough non-degenerate directions to
        determine ``(sh_order_max + 1)(sh_order_max + 2) / 2`` coefficients.
    b0_threshold : float
        b-values up to this are b0.
    shells : sequence of float, optional
        Nominal b-values of the shells to use, in feature order (volumes
        within ``tolerance`` join the nearest; see
        :func:`~anomri.dmri.shells.assign_shells`). Pass the same list for
        every scan of a study. Default: every shell
        :func:`~anomri.dmri.shells.detect_shells` finds.
    smooth : float
        Laplace–Beltrami regularisation weight, independent of the number of
        directions. For well-spread directions it scales ``P_l`` by about
        ``(1 + smooth (l(l+1))²)^-2``: 0.993 at l = 2 and 0.92 at l = 4 for
        the default 1e-4, which steadies fits on few directions. Use 0 for
        plain least squares.
    tolerance : float
        Largest b-value gap within a shell.

    Returns
    -------
    features : ndarray (..., F)
        ``P_l`` for each shell (increasing b unless ``shells`` orders them)
        and l = 0, 2, ..., sh_order_max; F = n_shells × (sh_order_max/2 + 1).
        float32 unless ``signal`` is float64.
    names : list of str
        Feature names such as ``b1000_l0``, ``b1000_l2``.
    """
    signal = np.asarray(signal)
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if signal.shape[-1] != bvals.size or bvecs.shape != (bvals.size, 3):
        raise ValueError(
            f"signal (..., N), bvals (N,) and bvecs (N, 3) disagree: {signal.shape}, {bvals.shape}, {bvecs.shape}"
        )
    if shells is None:
        shell_list = detect_shells(bvals, b0_threshold=b0_threshold, tolerance=tolerance)
    else:
        shell_list = assign_shells(bvals, shells, b0_threshold=b0_threshold, tolerance=tolerance)
    if not shell_list:
        raise ValueError(f"no diffusion-weighted volume (every b-value <= {b0_threshold:g})")

    dtype = np.result_type(signal.dtype, np.float32)
    degrees = np.arange(0, sh_order_max + 1, 2)
    features = np.empty(signal.shape[:-1] + (len(shell_list) * degrees.size,), dtype)
    names = []
    for k, shell in enumerate(shell_list):
        directions = bvecs[shell.indices]
        norms = np.linalg.norm(directions, axis=1, keepdims=True)
        if not (norms > 0).all():
            raise ValueError(f"shell b={shell.bval:g} has zero b-vectors")
        fit, l_values = _fit_matrix(directions / norms, sh_order_max, smooth, shell.bval)
        coefficients = signal[..., shell.indices].astype(dtype, copy=False) @ fit.T.astype(dtype)
        # Sum the squared coefficients of each degree with one matmul.
        degree_sum = (l_values[:, None] == degrees[None, :]).astype(dtype)
        features[..., k * degrees.size : (k + 1) * degrees.size] = np.square(coefficients) @ degree_sum
        names += [f"b{shell.bval:g}_l{l}" for l in degrees]
    return features, names
