"""Every registered score against a closed form, on a VAE with known affine encoder and decoder.

With q(z|x) = N(A x + a, diag v) and p(x|z) = N(B z + b, diag s^2), v and s
constant, each score has a closed form or a closed-form expectation:
Monte Carlo scores are checked against their expectation within a central
limit tolerance built from their closed-form variance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from anomri.maps.novelty import NoveltyModel
from anomri.models.vae import GaussianVAE
from anomri.scores import get_scores
from anomri.scores.indexes import bhattacharyya_diagonal
from anomri.scores.reference import ReferenceSet

N_SAMPLES = 64  # Monte Carlo samples per voxel


class AffineVAE(GaussianVAE):
    """q(z|x) = N(A x + a, diag exp(logvar)), p(x|z) = N(B z + b, diag exp(log_sigma)^2), all fixed."""

    def __init__(self, a_mat: np.ndarray, a_vec: np.ndarray, logvar: np.ndarray,
                 b_mat: np.ndarray, b_vec: np.ndarray, log_sigma: np.ndarray) -> None:
        super().__init__(b_mat.shape[0], latent_size=b_mat.shape[1], hidden_channels=(4,))
        self.params = {name: torch.tensor(value, dtype=torch.float32) for name, value in
                       dict(A=a_mat, a=a_vec, logvar=logvar, B=b_mat, b=b_vec, log_sigma=log_sigma).items()}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        mu = x @ p["A"].T + p["a"]
        return mu, p["logvar"].expand_as(mu)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        mean = z @ p["B"].T + p["b"]
        return mean, p["log_sigma"].expand_as(mean)


def make_affine(n_features: int, latent: int, seed: int) -> tuple[AffineVAE, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    p = dict(
        A=rng.normal(size=(latent, n_features)) / math.sqrt(n_features),
        a=rng.normal(size=latent) * 0.3,
        logvar=rng.uniform(-2.0, -0.5, size=latent),
        B=rng.normal(size=(n_features, latent)),
        b=rng.normal(size=n_features) * 0.3,
        log_sigma=rng.uniform(-1.0, -0.3, size=n_features),
    )
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}  # the model's float32 values
    model = AffineVAE(p["A"], p["a"], p["logvar"], p["B"], p["b"], p["log_sigma"]).eval()
    return model, p


def scores_of(model: GaussianVAE, x: np.ndarray, ids: list[str],
              reference: ReferenceSet | None = None) -> dict[str, np.ndarray]:
    novelty = NoveltyModel(model, ids, n_samples=N_SAMPLES, seed=0, reference=reference, batch_size=len(x))
    return {k: v.astype(np.float64) for k, v in novelty.score_samples(x.astype(np.float32), progress=False).items()}


def quadratic_moments(c: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ||c + w||^2, w ~ N(0, cov): ||c||^2 + tr C and 2 tr C^2 + 4 c^T C c (rows of c)."""
    mean = (c * c).sum(1) + np.trace(cov)
    var = 2.0 * np.trace(cov @ cov) + 4.0 * np.einsum("nd,de,ne->n", c, cov, c)
    return mean, var


def assert_clt(estimates: np.ndarray, mean: np.ndarray, var: np.ndarray, n_samples: int) -> None:
    """Monte Carlo means of n_samples draws agree with their expectation (standardised errors look N(0, 1))."""
    z = (estimates - mean) / np.sqrt(var / n_samples)
    assert np.abs(z).max() < 6.0
    assert abs(z.mean()) < 5.0 / math.sqrt(len(z))
    assert 0.7 < z.std() < 1.3


def test_deterministic_scores() -> None:
    model, p = make_affine(5, 3, seed=0)
    x = np.random.default_rng(1).normal(size=(300, 5))
    out = scores_of(model, x, ["vae-reg", "det-rec-err", "det-rec-lik"])
    mu = x @ p["A"].T + p["a"]
    cov = np.diag(np.exp(p["logvar"]))
    # KL(N(mu, S) || N(0, I)) with full matrices: (tr S + mu^T mu - L - log det S) / 2.
    kl = 0.5 * (np.trace(cov) + (mu * mu).sum(1) - 3 - np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(out["vae-reg"], kl, rtol=1e-5)
    recon = mu @ p["B"].T + p["b"]
    np.testing.assert_allclose(out["det-rec-err"], ((x - recon) ** 2).sum(1), rtol=1e-5)
    nll = -stats.norm.logpdf(x, loc=recon, scale=np.exp(p["log_sigma"])).sum(1)
    np.testing.assert_allclose(out["det-rec-lik"], nll, rtol=1e-5, atol=1e-5)


def test_monte_carlo_means() -> None:
    model, p = make_affine(5, 3, seed=2)
    x = np.random.default_rng(3).normal(size=(400, 5))
    ids = ["enc-stoch-rec-err", "enc-stoch-rec-lik", "neg-elbo", "dec-stoch-rec-err", "full-stoch-rec-err"]
    out = scores_of(model, x, ids)
    mu = x @ p["A"].T + p["a"]
    residual = x - (mu @ p["B"].T + p["b"])  # x - m(mu(x))
    latent_cov = p["B"] @ np.diag(np.exp(p["logvar"])) @ p["B"].T  # covariance of m(z), z ~ q(z|x)
    noise_cov = np.diag(np.exp(2 * p["log_sigma"]))
    inv_sigma = np.diag(np.exp(-p["log_sigma"]))

    assert_clt(out["enc-stoch-rec-err"], *quadratic_moments(residual, latent_cov), N_SAMPLES)
    assert_clt(out["dec-stoch-rec-err"], *quadratic_moments(residual, noise_cov), N_SAMPLES)
    assert_clt(out["full-stoch-rec-err"], *quadratic_moments(residual, latent_cov + noise_cov), N_SAMPLES)
    # -log p(x|z) = sum log s + D/2 log 2 pi + ||(x - m(z)) / s||^2 / 2
    constant = p["log_sigma"].sum() + 2.5 * math.log(2 * math.pi)
    q_mean, q_var = quadratic_moments(residual @ inv_sigma, inv_sigma @ latent_cov @ inv_sigma)
    assert_clt(out["enc-stoch-rec-lik"], constant + q_mean / 2, q_var / 4, N_SAMPLES)
    kl = 0.5 * ((mu * mu).sum(1) + np.exp(p["logvar"]).sum() - p["logvar"].sum() - 3)
    assert_clt(out["neg-elbo"], constant + q_mean / 2 + kl, q_var / 4, N_SAMPLES)


def expected_min(a: float, centre: float, offset: float, n: int) -> tuple[float, float]:
    """Mean and variance of min over n draws of Q = a (xi - centre)^2 + offset, xi ~ N(0, 1).

    P(Q - offset > a r^2) = 1 - Phi(centre + r) + Phi(centre - r); E[M] = offset + int (P(M > t)) dt
    and E[(M - offset)^2] = int 2 t P(M > t) dt, integrated over t = a r^2.
    """

    def survival(r: float) -> float:
        return (1.0 - stats.norm.cdf(centre + r) + stats.norm.cdf(centre - r)) ** n

    first = integrate.quad(lambda r: survival(r) * 2 * a * r, 0, np.inf, limit=200)[0]
    second = integrate.quad(lambda r: survival(r) * 2 * a * r**2 * 2 * a * r, 0, np.inf, limit=200)[0]
    return offset + first, second - first**2


def test_monte_carlo_minima() -> None:
    """The -min variants (one feature, one latent: each is a scalar quadratic of one Gaussian)."""
    model, p = make_affine(1, 1, seed=4)
    distinct = np.array([[-1.2], [0.1], [0.9]])
    copies = 600
    x = np.repeat(distinct, copies, axis=0)
    ids = ["enc-stoch-rec-err-min", "enc-stoch-rec-lik-min", "sampled-elbo", "dec-stoch-rec-err-min",
           "full-stoch-rec-err-min"]
    out = scores_of(model, x, ids)
    gain, sd_z, s = p["B"][0, 0], math.exp(0.5 * p["logvar"][0]), math.exp(p["log_sigma"][0])
    constant = p["log_sigma"][0] + 0.5 * math.log(2 * math.pi)
    for k, xv in enumerate(distinct[:, 0]):
        mu = p["A"][0, 0] * xv + p["a"][0]
        c = xv - (gain * mu + p["b"][0])
        kl = 0.5 * (mu * mu + sd_z**2 - p["logvar"][0] - 1)
        # x - m(z_i) = c - gain sd_z xi; x - x_i = c - s xi; fully stochastic: c - sqrt(gain^2 sd_z^2 + s^2) xi.
        full_sd = math.sqrt((gain * sd_z) ** 2 + s**2)
        encoder_min = expected_min((gain * sd_z) ** 2, c / (gain * sd_z), 0.0, N_SAMPLES)
        cases = {
            "enc-stoch-rec-err-min": (encoder_min, 0.0, 1.0),
            "enc-stoch-rec-lik-min": (encoder_min, constant, 0.5 / s**2),
            "sampled-elbo": (encoder_min, constant + kl, 0.5 / s**2),
            "dec-stoch-rec-err-min": (expected_min(s**2, c / s, 0.0, N_SAMPLES), 0.0, 1.0),
            "full-stoch-rec-err-min": (expected_min(full_sd**2, c / full_sd, 0.0, N_SAMPLES), 0.0, 1.0),
        }
        for score_id, ((m_mean, m_var), shift, scale) in cases.items():
            values = out[score_id][k * copies : (k + 1) * copies]
            tolerance = 5.0 * scale * math.sqrt(m_var / copies)
            assert abs(values.mean() - (shift + scale * m_mean)) < tolerance, (score_id, xv)


@pytest.fixture(scope="module")
def affine_setup() -> tuple[AffineVAE, dict, np.ndarray, np.ndarray, ReferenceSet]:
    model, p = make_affine(6, 2, seed=5)
    rng = np.random.default_rng(6)
    reference_raw = rng.normal(size=(1500, 6)) * 1.5
    x = np.r_[rng.normal(size=(200, 6)), rng.normal(size=(20, 6)) * 6]
    reference = ReferenceSet.build(model, reference_raw.astype(np.float32))
    return model, p, x, reference.x.double().numpy(), reference


def _min_sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None]) ** 2).sum(-1).min(1)


def test_reference_scores_closed_form(affine_setup) -> None:
    model, p, x, y, reference = affine_setup
    ids = [s.id for s in get_scores("all") if s.needs_reference]
    out = scores_of(model, x, ids, reference)
    mu_x, mu_y = x @ p["A"].T + p["a"], y @ p["A"].T + p["a"]
    m_x, m_y = mu_x @ p["B"].T + p["b"], mu_y @ p["B"].T + p["b"]
    var, sd = np.exp(p["logvar"]), np.exp(p["log_sigma"])
    expected = {
        "latent-nn-euclid": _min_sqdist(mu_x, mu_y),
        # Equal covariances: D_B = (1/8) dmu^T S^-1 dmu, the log-determinant term vanishes.
        "latent-nn-bhatt": _min_sqdist(mu_x / np.sqrt(var), mu_y / np.sqrt(var)) / 8,
        "output-nn-euclid": _min_sqdist(m_x, m_y),
        "output-nn-bhatt": _min_sqdist(m_x / sd, m_y / sd) / 8,
        "input-to-recon-nn": _min_sqdist(x, m_y),
        "recon-to-data-nn": _min_sqdist(m_x, y),
        "input-nn-euclid": _min_sqdist(x, y),
    }

    def neg_log_mixture(q: np.ndarray, centres: np.ndarray, cov: np.ndarray) -> np.ndarray:
        log_kernels = np.stack([stats.multivariate_normal(c, cov).logpdf(q) for c in centres], axis=1)
        return -(special.logsumexp(log_kernels, axis=1) - math.log(len(centres)))

    expected["latent-logdensity"] = neg_log_mixture(mu_x, mu_y, np.diag(var))
    expected["output-logdensity"] = neg_log_mixture(m_x, m_y, np.diag(sd**2))
    expected["input-logdensity"] = neg_log_mixture(x, m_y, np.diag(sd**2))
    for space in ("latent", "output", "input"):
        expected[f"{space}-density"] = -np.exp(-expected[f"{space}-logdensity"])
    assert set(expected) == set(ids)
    for score_id in ids:
        # The model rounds its outputs to float32: near-zero distances inherit that absolute error.
        atol = 1e-6 * np.abs(expected[score_id]).max()
        np.testing.assert_allclose(out[score_id], expected[score_id], rtol=1e-5, atol=atol, err_msg=score_id)


def test_generative_scores_closed_form(affine_setup) -> None:
    """With an affine decoder both latent searches are (weighted) least squares."""
    model, p, x, _, _ = affine_setup
    out = scores_of(model, x, ["closest-generated", "max-generated-lik"])
    sd = np.exp(p["log_sigma"])
    residual = np.linalg.lstsq(p["B"], (x - p["b"]).T, rcond=None)
    closest = ((x - p["b"]) ** 2).sum(1) - ((p["B"] @ residual[0]).T * (x - p["b"])).sum(1)
    np.testing.assert_allclose(out["closest-generated"], closest, rtol=1e-4, atol=1e-4)
    z_best = np.linalg.lstsq(p["B"] / sd[:, None], ((x - p["b"]) / sd).T, rcond=None)[0].T
    nll = -stats.norm.logpdf(x, loc=z_best @ p["B"].T + p["b"], scale=sd).sum(1)
    np.testing.assert_allclose(out["max-generated-lik"], nll, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m1, v1, m2, v2",
                         [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -1.1, 2.0), (2.0, 0.05, 1.8, 0.2), (-4.0, 3.0, 1.0, 0.1)])
def test_bhattacharyya_closed_form_matches_integral(m1: float, v1: float, m2: float, v2: float) -> None:
    """D_B = -log int sqrt(p q): the closed form against quadrature, in 1-D and for a 2-D product."""
    coefficient = integrate.quad(
        lambda t: math.sqrt(stats.norm.pdf(t, m1, math.sqrt(v1)) * stats.norm.pdf(t, m2, math.sqrt(v2))),
        -np.inf, np.inf, epsabs=1e-13, epsrel=1e-12)[0]

    def t(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    one_d = bhattacharyya_diagonal(t([m1]), t([math.log(v1)]), t([m2]), t([math.log(v2)])).item()
    assert one_d == pytest.approx(-math.log(coefficient), rel=1e-8, abs=1e-10)
    two_d = bhattacharyya_diagonal(t([m1, m2]), t([math.log(v1), 0.0]), t([m2, m2]), t([math.log(v2), 0.0]))
    assert two_d.item() == pytest.approx(-math.log(coefficient), rel=1e-6, abs=1e-7)  # equal 2nd dims add 0
