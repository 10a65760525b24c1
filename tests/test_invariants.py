"""Shell detection and rotation-invariant SH power features.

References are independent of the code under test: an exact product
quadrature on the sphere, the Legendre addition theorem (basis-free power) and
the closed-form SH power of an axially symmetric signal.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from dipy.data import DATA_DIR, get_3shell_gtab, get_fnames, get_sphere
from dipy.io.gradients import read_bvals_bvecs
from numpy.polynomial.legendre import leggauss
from scipy.spatial.transform import Rotation
from scipy.special import eval_legendre

from anomri.dmri.invariants import sh_basis, sh_invariants
from anomri.dmri.shells import assign_shells, detect_shells

# Zeppelin (cylindrically symmetric tensor) typical of white matter, mm²/s.
LAMBDA_PAR, LAMBDA_PERP = 1.7e-3, 0.3e-3


def sphere_quadrature(n_theta: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre in cos θ × equispaced φ: exact for spherical polynomials of degree <= 2 n_theta - 1."""
    cos_theta, w_theta = leggauss(n_theta)
    phi = np.arange(2 * n_theta) * np.pi / n_theta
    c, p = np.meshgrid(cos_theta, phi, indexing="ij")
    s = np.sqrt(1.0 - c**2)
    points = np.stack([s * np.cos(p), s * np.sin(p), c], axis=-1).reshape(-1, 3)
    weights = np.repeat(w_theta, phi.size) * (np.pi / n_theta)
    return points, weights


def basis_free_power(f_at_nodes: np.ndarray, nodes: np.ndarray, weights: np.ndarray, degree: int) -> float:
    """P_l = Σ_m c_lm² without any SH basis.

    Addition theorem: Σ_m Y_lm(u) Y_lm(v) = (2l+1)/(4π) P_l(u·v), hence
    Σ_m c_lm² = (2l+1)/(4π) ∫∫ f(u) f(v) P_l(u·v) dΩ_u dΩ_v.
    """
    fw = f_at_nodes * weights
    return (2 * degree + 1) / (4 * np.pi) * fw @ eval_legendre(degree, nodes @ nodes.T) @ fw


def zeppelin(directions: np.ndarray, bvals: np.ndarray, fibre: np.ndarray) -> np.ndarray:
    """S/S0 = exp(-b (λ⊥ + (λ∥ - λ⊥) (g·n)²)) for every volume (b0 rows give 1)."""
    return np.exp(-bvals * (LAMBDA_PERP + (LAMBDA_PAR - LAMBDA_PERP) * (directions @ fibre) ** 2))


def zeppelin_power(bval: float, degrees: np.ndarray) -> np.ndarray:
    """Closed-form P_l of the zeppelin on one shell, for any fibre direction.

    For f(u) = h(u·n) = Σ_l a_l P_l(u·n) with a_l = (2l+1)/2 ∫ h P_l dt, the
    addition theorem gives c_lm = a_l 4π/(2l+1) Y_lm(n), so
    P_l = a_l² 4π/(2l+1) = π (2l+1) (∫_{-1}^{1} h(t) P_l(t) dt)².
    The 1-D integral uses 64-point Gauss–Legendre (exact to rounding here).
    """
    t, w = leggauss(64)
    h = np.exp(-bval * (LAMBDA_PERP + (LAMBDA_PAR - LAMBDA_PERP) * t**2))
    return np.array([np.pi * (2 * l + 1) * np.sum(w * h * eval_legendre(l, t)) ** 2 for l in degrees])


def aliasing_bound(bval: float, sh_order_max: int) -> np.ndarray:
    """How far a truncated fit's P_l (l <= L) may move from the true P_l.

    The part of the signal above degree L (energy P_>L) aliases into the
    fitted coefficients; if the aliased energy per degree is at most P_>L
    (well-spread directions), |P̂_l - P_l| <= 2 sqrt(P_l P_>L) + P_>L.
    """
    power = zeppelin_power(bval, np.arange(0, 41, 2))
    kept = power[: sh_order_max // 2 + 1]
    tail = power[sh_order_max // 2 + 1 :].sum()
    return 2 * np.sqrt(kept * tail) + tail


def random_fibres(n: int, seed: int) -> np.ndarray:
    return Rotation.random(n, random_state=seed).apply([0.0, 0.0, 1.0])


def three_shells() -> tuple[np.ndarray, np.ndarray, list[float]]:
    """dipy's 3-shell table (q = b g rows of gtab_3shell.txt): 1 b0 + 64 directions at b = 1000, 2000, 3500."""
    gtab = get_3shell_gtab()
    return gtab.bvals, gtab.bvecs, [1000.0, 2000.0, 3500.0]


# ---------------------------------------------------------------- shells


def test_detect_shells_small_64d_is_one_shell_at_1000():
    _, bval_file, bvec_file = get_fnames(name="small_64D")
    bvals, _ = read_bvals_bvecs(str(bval_file), str(bvec_file))
    assert bvals.min() == 0 and 980 < bvals[bvals > 0].min() and bvals.max() < 1010  # measured b scatter
    shells = detect_shells(bvals)
    assert len(shells) == 1
    assert shells[0].bval == 1000.0  # nominal, although every measured b-value is < 1005
    np.testing.assert_array_equal(shells[0].indices, np.flatnonzero(bvals > 50))


def test_detect_shells_small_101d_follows_the_dsi_grid():
    # DSI samples q on an integer grid: b ∝ |q|², |q|² ∈ sums of three squares <= 13
    # (7 is not one), with b_max ≈ 4000 at |q|² = 13. Its one b0 is stored as b = 15.
    _, bval_file, bvec_file = get_fnames(name="small_101D")
    bvals, _ = read_bvals_bvecs(str(bval_file), str(bvec_file))
    assert 0 < bvals.min() <= 50
    norms2 = {a * a + b * b + c * c for a, b, c in itertools.product(range(4), repeat=3)}
    expected_levels = sorted(k for k in norms2 if 0 < k <= 13)
    level = bvals / (4000.0 / 13.0)
    nearest = np.round(level)
    weighted = bvals > 50
    # Measured b scatter by up to ±0.25 of a level; levels are 1 apart, so rounding is unambiguous.
    assert np.abs(level - nearest)[weighted].max() < 0.3
    shells = detect_shells(bvals)
    assert len(shells) == len(expected_levels) == 12
    for shell, k in zip(shells, expected_levels, strict=True):
        np.testing.assert_array_equal(shell.indices, np.flatnonzero(weighted & (nearest == k)))


def test_detect_shells_with_jitter_and_nonzero_b0():
    rng = np.random.default_rng(3)
    nominal = np.repeat([0, 1000, 2000, 3000], [6, 30, 30, 30])
    jitter = np.where(nominal == 0, rng.choice([0, 5, 20, 50], nominal.size), rng.uniform(-20, 20, nominal.size))
    order = rng.permutation(nominal.size)
    nominal, bvals = nominal[order], (nominal + jitter)[order]
    shells = detect_shells(bvals)
    assert [s.bval for s in shells] == [1000.0, 2000.0, 3000.0]
    for shell in shells:
        np.testing.assert_array_equal(shell.indices, np.flatnonzero(nominal == shell.bval))


def test_detect_shells_splits_only_at_gaps_wider_than_tolerance():
    bvals = np.array([0, 1000, 1090, 1180, 2000])
    # Gaps 90, 90 chain 1000..1180 into one shell of mean 1090 -> 1100.
    chained = detect_shells(bvals, tolerance=100)
    assert [(s.bval, s.indices.tolist()) for s in chained] == [(1100.0, [1, 2, 3]), (2000.0, [4])]
    split = detect_shells(bvals, tolerance=80)
    assert [s.bval for s in split] == [1000.0, 1100.0, 1200.0, 2000.0]  # 1090 and 1180 round to 50s
    assert detect_shells(np.array([0.0, 10.0])) == []


def test_assign_shells_uses_the_given_nominal_values():
    bvals, _, _ = three_shells()
    shells = assign_shells(bvals, [3500, 1000])
    assert [s.bval for s in shells] == [3500.0, 1000.0]
    np.testing.assert_array_equal(shells[0].indices, np.flatnonzero(np.abs(bvals - 3500) < 1))
    np.testing.assert_array_equal(shells[1].indices, np.flatnonzero(np.abs(bvals - 1000) < 1))
    with pytest.raises(ValueError, match="b=3000"):
        assign_shells(bvals, [1000, 3000])


# ---------------------------------------------------------------- SH features


def test_sh_basis_is_orthonormal():
    nodes, weights = sphere_quadrature(12)  # exact for products of degree <= 16
    basis, l_values = sh_basis(nodes, 8)
    gram = basis.T @ (weights[:, None] * basis)
    np.testing.assert_allclose(gram, np.eye(l_values.size), atol=1e-12)


def test_band_limited_power_is_exact_and_rotation_invariant():
    bvals, bvecs, shell_bvals = three_shells()
    order = 4
    rng = np.random.default_rng(0)
    rotation = Rotation.random(random_state=7).as_matrix()
    nodes, weights = sphere_quadrature(12)
    signal = np.ones((2, bvals.size))
    expected = []
    for b in shell_bvals:
        coef = rng.normal(size=(order + 1) * (order + 2) // 2)
        on_shell = np.flatnonzero(np.abs(bvals - b) < 1)
        signal[0, on_shell] = sh_basis(bvecs[on_shell], order)[0] @ coef
        # f rotated by R: f_R(g) = f(R^T g); rows g -> g R.
        signal[1, on_shell] = sh_basis(bvecs[on_shell] @ rotation, order)[0] @ coef
        f_nodes = sh_basis(nodes, order)[0] @ coef
        expected += [basis_free_power(f_nodes, nodes, weights, l) for l in range(0, order + 1, 2)]
    assert np.abs(signal[0] - signal[1]).max() > 0.5  # the rotation really changes the samples
    features, names = sh_invariants(signal, bvals, bvecs, sh_order_max=order, smooth=0.0)
    assert names == [f"b{b:g}_l{l}" for b in (1000, 2000, 3500) for l in (0, 2, 4)]
    np.testing.assert_allclose(features[0], expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(features[1], expected, rtol=1e-10, atol=1e-12)


def test_regularisation_does_not_depend_on_the_number_of_directions():
    # On a spherical design B^T B = (n/4π) I, so the fit is the true coefficient
    # times 1 / (1 + smooth (l(l+1))²), whatever n. The 45-point design and its
    # union with a rotated copy (also a design, 90 points) must agree exactly.
    design = np.loadtxt(Path(DATA_DIR) / "tdesign45.txt")
    design90 = np.concatenate([design, design @ Rotation.random(random_state=1).as_matrix()])
    order, smooth = 4, 1e-3
    coef = np.random.default_rng(2).normal(size=15)
    nodes, weights = sphere_quadrature(12)
    degrees = np.arange(0, order + 1, 2)
    power = np.array([basis_free_power(sh_basis(nodes, order)[0] @ coef, nodes, weights, l) for l in degrees])
    shrunk = power / (1 + smooth * (degrees * (degrees + 1.0)) ** 2) ** 2
    for directions in (design, design90):
        signal = sh_basis(directions, order)[0] @ coef
        features, _ = sh_invariants(signal, np.full(len(directions), 1000.0), directions, order, smooth=smooth)
        np.testing.assert_allclose(features, shrunk, rtol=1e-10)


@pytest.mark.parametrize("sh_order_max", [4, 8])
def test_zeppelin_power_matches_closed_form_at_any_orientation(sh_order_max):
    bvals, bvecs, shell_bvals = three_shells()
    fibres = random_fibres(20, seed=1)
    signal = np.stack([zeppelin(bvecs, bvals, n) for n in fibres])
    assert np.ptp(signal, axis=0).max() > 0.5  # orientations differ
    features, _ = sh_invariants(signal, bvals, bvecs, sh_order_max=sh_order_max, smooth=0.0)
    degrees = np.arange(0, sh_order_max + 1, 2)
    expected = np.concatenate([zeppelin_power(b, degrees) for b in shell_bvals])
    bound = np.concatenate([aliasing_bound(b, sh_order_max) for b in shell_bvals])
    # At order 8 the bound is 1e-4 of P_0 at b = 1000: invariance is tight.
    assert np.all(np.abs(features - expected) <= bound)


def test_features_agree_across_gradient_schemes():
    # Same tissue on three direction sets: dipy's 3-shell table (64 at b=1000),
    # a real scanner's 64 (small_64D) and a 200-point repulsion sphere; sampled
    # at the nominal b so that only the directions differ. Default settings.
    gtab = get_3shell_gtab()
    _, bval_file, bvec_file = get_fnames(name="small_64D")
    bvals64, bvecs64 = read_bvals_bvecs(str(bval_file), str(bvec_file))
    schemes = [
        gtab.bvecs[np.abs(gtab.bvals - 1000) < 1],
        bvecs64[bvals64 > 50],
        get_sphere(name="repulsion200").vertices,
    ]
    fibres = random_fibres(20, seed=4)
    for bval in (1000.0, 3000.0):
        features = []
        for directions in schemes:
            signal = np.stack([zeppelin(directions, bval, n) for n in fibres])
            features.append(sh_invariants(signal, np.full(len(directions), bval), directions)[0])
        bound = aliasing_bound(bval, 4)
        for a, b in itertools.combinations(features, 2):
            assert np.all(np.abs(a - b) <= bound)


def test_isotropic_signal_closed_form_on_a_volume():
    bvals, bvecs, shell_bvals = three_shells()
    diffusivity = np.linspace(0.5e-3, 3e-3, 24).reshape(2, 3, 4)
    signal = np.exp(-diffusivity[..., None] * bvals)
    signal[1, 2, 3] = np.nan
    features, names = sh_invariants(signal.astype(np.float32), bvals, bvecs)  # default smooth
    assert features.shape == (2, 3, 4, 9) and features.dtype == np.float32
    assert len(names) == 9
    features = features.astype(np.float64)
    assert np.isnan(features[1, 2, 3]).all()
    valid = ~np.isnan(signal[..., 0])
    for k, b in enumerate(shell_bvals):
        # Constant s on the sphere: c_00 = s sqrt(4π), so P_0 = 4π s², and no power above l = 0.
        expected = 4 * np.pi * np.exp(-2 * b * diffusivity)
        np.testing.assert_allclose(features[..., 3 * k][valid], expected[valid], rtol=1e-5)
        assert np.abs(features[..., 3 * k + 1 : 3 * k + 3][valid]).max() < 1e-6


def test_rejects_shells_with_too_few_directions():
    _, bval_file, bvec_file = get_fnames(name="small_101D")
    bvals, bvecs = read_bvals_bvecs(str(bval_file), str(bvec_file))
    with pytest.raises(ValueError, match="do not determine the 15 SH coefficients"):
        sh_invariants(np.ones(bvals.size), bvals, bvecs)
