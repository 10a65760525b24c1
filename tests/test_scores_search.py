"""The exact searches in corner cases the score-family tests do not reach: more features than
reference points, heteroscedastic Bhattacharyya strata, and the bounded-memory screen.
Every result is compared with a float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomri.scores import indexes, screen, search
from anomri.scores.indexes import BhattacharyyaIndex, EuclideanIndex, GaussianKernelIndex, bhattacharyya_diagonal
from anomri.scores.search import LowerBoundTree


def low_rank_points(n: int, dims: int, rank: int, seed: int) -> torch.Tensor:
    """Points near a rank-``rank`` subspace of R^dims, like images of one kind."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(0).normal(size=(rank, dims))
    points = rng.normal(size=(n, rank)) @ basis + 0.05 * rng.normal(size=(n, dims))
    return torch.from_numpy(points).float()


def brute_min_sqdist(queries: torch.Tensor, points: torch.Tensor) -> np.ndarray:
    return torch.cdist(queries.double(), points.double()).pow(2).min(1).values.numpy()


def brute_log_sum(queries: torch.Tensor, means: torch.Tensor, log_sigma: torch.Tensor) -> np.ndarray:
    q, m, ls = queries.double()[:, None], means.double()[None], log_sigma.double()[None]
    log_kernel = -(0.5 * ((q - m) / ls.exp()) ** 2 + ls + 0.5 * np.log(2 * np.pi)).sum(-1)
    return torch.logsumexp(log_kernel, dim=1).numpy()


def test_tree_with_more_features_than_points() -> None:
    """D > M: the axes come from the M x M Gram matrix, are orthonormal, and the bound holds."""
    points = low_rank_points(40, 300, rank=5, seed=1)
    queries = torch.cat([low_rank_points(30, 300, rank=5, seed=2), 2.0 * torch.randn(10, 300)])
    tree = LowerBoundTree(points)
    eye = torch.eye(tree.basis.shape[1], dtype=torch.float64)
    torch.testing.assert_close(tree.basis.T @ tree.basis, eye, rtol=0, atol=1e-12)
    phi, psi = torch.from_numpy(tree.embed(queries)), torch.from_numpy(tree.embed(points))
    bound = torch.cdist(phi, psi).pow(2).numpy()
    true = torch.cdist(queries.double(), points.double()).pow(2).numpy()
    assert np.all(bound <= true * (1 + 1e-9) + 1e-9)
    np.testing.assert_allclose(EuclideanIndex(points).min_sqdist(queries).numpy(),
                               brute_min_sqdist(queries, points), rtol=1e-11)


def test_kernel_sum_with_more_features_than_points() -> None:
    means = low_rank_points(50, 120, rank=4, seed=3)
    log_sigma = torch.full_like(means, -0.5) + 0.1 * torch.rand(means.shape, generator=torch.Generator().manual_seed(0))
    queries = low_rank_points(20, 120, rank=4, seed=4)
    fast = GaussianKernelIndex(means, log_sigma).log_sum(queries).numpy()
    np.testing.assert_allclose(fast, brute_log_sum(queries, means, log_sigma), rtol=1e-9)


def test_bhattacharyya_strata_on_heteroscedastic_gaussians(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variances spanning e^16, as a decoder's are: many strata, still the brute-force minimum."""
    monkeypatch.setattr(indexes, "_STRATUM_POINTS", 64)
    monkeypatch.setattr(indexes, "_STRATUM_FRACTION", 0.0)
    rng = np.random.default_rng(5)
    means = torch.from_numpy(rng.normal(size=(4000, 6))).float()
    logvar = torch.from_numpy(rng.normal(-3.0, 1.0, size=(4000, 6))).float()
    logvar[::50] += 12.0  # a few very wide Gaussians, which defeat a single bound over all of Y
    index = BhattacharyyaIndex(means, logvar)
    assert len(index.strata) >= 16
    q_means = torch.from_numpy(rng.normal(scale=1.5, size=(300, 6))).float()
    q_logvar = torch.from_numpy(rng.normal(-3.0, 3.0, size=(300, 6))).float()
    fast = index.min_distance(q_means, q_logvar).numpy()
    brute = bhattacharyya_diagonal(q_means.double()[:, None], q_logvar.double()[:, None], means.double()[None],
                                   logvar.double()[None]).min(1).values.numpy()
    np.testing.assert_allclose(fast, brute, rtol=1e-11)


@pytest.mark.parametrize("screen_elements", [256, 4096])
def test_streaming_screen_is_exact(monkeypatch: pytest.MonkeyPatch, screen_elements: int) -> None:
    """Screen blocks far smaller than the candidates force the piecewise hand-over of the minimum's
    candidates, and tiny exact blocks the streaming log-sum-exp; results stay exact."""
    monkeypatch.setattr(search, "_DENSE_FRACTION", 10**9)  # every ball goes to the GEMM screen / exact blocks
    monkeypatch.setattr(screen, "SCREEN_ELEMENTS", screen_elements)
    monkeypatch.setattr(screen, "EXACT_ROWS", screen_elements // 64)
    points = low_rank_points(3000, 8, rank=3, seed=6)
    queries = torch.cat([low_rank_points(100, 8, rank=3, seed=7), 3.0 * torch.randn(20, 8)])
    np.testing.assert_allclose(EuclideanIndex(points).min_sqdist(queries).numpy(),
                               brute_min_sqdist(queries, points), rtol=1e-11)
    log_sigma = torch.full_like(points, 0.3)  # wide kernels: most of Y lies within the band
    fast = GaussianKernelIndex(points, log_sigma).log_sum(queries).numpy()
    np.testing.assert_allclose(fast, brute_log_sum(queries, points, log_sigma), rtol=1e-9)
