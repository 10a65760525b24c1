"""Search indexes over reference points, one per kind of comparison.

Each index holds a :class:`~anomri.scores.search.LowerBoundTree` whose lower
bound fits its f(x, y), and answers exactly (see :mod:`anomri.scores.search`):

* :class:`EuclideanIndex` -- min_y ||q - y||^2;
* :class:`BhattacharyyaIndex` -- min_y D_B(N(q_mean, q_var), N(y_mean, y_var)), diagonal Gaussians;
* :class:`GaussianKernelIndex` -- log sum_y N(q; m_y, diag s_y^2).

The reference scores keep one index per reference set via
:meth:`~anomri.scores.reference.ReferenceSet.index`.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch

from anomri.models.vae import LOG_2PI
from anomri.scores.search import (
    BUILD_ROWS,
    InnerProductForm,
    LowerBoundTree,
    SearchQueries,
    exact_logsumexp,
    exact_min,
)

__all__ = ["EuclideanIndex", "BhattacharyyaIndex", "GaussianKernelIndex", "bhattacharyya_diagonal", "log_cosh"]


def log_cosh(t: torch.Tensor) -> torch.Tensor:
    """log cosh(t) without overflow: |t| + log1p(exp(-2|t|)) - log 2."""
    t = t.abs()
    return t + torch.log1p(torch.exp(-2.0 * t)) - math.log(2.0)


def bhattacharyya_diagonal(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Bhattacharyya distance between diagonal Gaussians, summed over the last axis.

    D_B = 1/8 (m1 - m2)^T S^-1 (m1 - m2) + 1/2 log(det S / sqrt(det S1 det S2)), S = (S1 + S2) / 2,
    which for diagonal covariances is, per dimension k,
    (m1_k - m2_k)^2 / (4 (v1_k + v2_k)) + 1/2 log cosh((log v1_k - log v2_k) / 2).
    Both terms are >= 0.
    """
    mahalanobis = 0.25 * (mean1 - mean2) ** 2 / (torch.exp(logvar1) + torch.exp(logvar2))
    return (mahalanobis + 0.5 * log_cosh(0.5 * (logvar1 - logvar2))).sum(-1)


class EuclideanIndex:
    """Exact min_y ||q - y||^2 over fixed reference points ``points`` (M, D)."""

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points
        self.tree = LowerBoundTree(points)
        blocks = range(0, len(points), BUILD_ROWS)
        self.sqnorm = torch.cat([(points[s : s + BUILD_ROWS].double() ** 2).sum(1) for s in blocks])

    @cached_property
    def form(self) -> InnerProductForm:
        """||q - y||^2 = <-2 q, y> + ||q||^2 + ||y||^2 (the points themselves serve as Psi)."""
        return InnerProductForm(self.points, self.sqnorm)

    def min_sqdist(self, queries: torch.Tensor) -> torch.Tensor:
        """min_y ||q - y||^2 for queries (N, D), float64 (N,)."""
        q = queries.double()

        def pair_value(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            return ((q[i] - self.points[j].double()) ** 2).sum(-1)

        search = SearchQueries(
            embedding=self.tree.embed(queries),
            rho=np.ones(len(q)),
            offset=np.zeros(len(q)),
            pair_value=pair_value,
            gemm=lambda: (self.form, -2.0 * q, (q * q).sum(1)),
            device=q.device,
        )
        return exact_min(self.tree, search, width=2 * q.shape[1], k=2)


class BhattacharyyaIndex:
    """Exact min_y D_B between a query Gaussian and reference Gaussians N(means_y, diag exp(logvar_y)).

    Lower bound: with V_k = max_y v_yk, D_B >= sum_k (m1_k - m2_k)^2 / (4 (v1_k + V_k)) + o(x),
    where o(x) = sum_k 1/2 log cosh(d_k / 2) >= 0 and d_k is how far log v1_k lies
    outside the range of the reference log-variances. The tree holds the means
    scaled by w_k = 1 / (2 sqrt(v~_k + V_k)), v~ the median reference variance,
    so the bound is rho(x) ||w (m1 - m2)||^2 + o(x) with
    rho(x) = min_k (v~_k + V_k) / (v1_k + V_k), close to 1 for typical queries.
    """

    def __init__(self, means: torch.Tensor, logvar: torch.Tensor) -> None:
        self.means, self.logvar = means, logvar
        # Column statistics of the float32 log-variances are exact; exp is monotone.
        self.logvar_low = logvar.min(0).values.double().cpu()
        self.logvar_high = logvar.max(0).values.double().cpu()
        self.variance_max = self.logvar_high.exp()
        self.spread = logvar.median(0).values.double().cpu().exp() + self.variance_max
        self.tree = LowerBoundTree(means, scale=0.5 / self.spread.sqrt())

    def min_distance(self, means: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """min_y D_B(N(means, exp(logvar)), N(means_y, exp(logvar_y))) for queries (N, K), float64 (N,)."""
        m, lv = means.double(), logvar.double()
        lv_cpu = lv.cpu()
        rho = (self.spread / (lv_cpu.exp() + self.variance_max)).min(1).values
        outside = (self.logvar_low - lv_cpu).clamp_min(0.0) + (lv_cpu - self.logvar_high).clamp_min(0.0)
        offset = 0.5 * log_cosh(0.5 * outside).sum(1)

        def pair_value(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            return bhattacharyya_diagonal(m[i], lv[i], self.means[j].double(), self.logvar[j].double())

        search = SearchQueries(
            embedding=self.tree.embed(means),
            rho=rho.numpy(),
            offset=offset.numpy(),
            pair_value=pair_value,
            gemm=None,
            device=m.device,
        )
        return exact_min(self.tree, search, width=4 * m.shape[1], k=4)


class GaussianKernelIndex:
    """log sum_y N(q; means_y, diag exp(log_sigma_y)^2) over reference kernels, exact to float precision.

    With f_y(q) = -log N(q; m_y, s_y^2) = 1/2 sum_k (q_k - m_yk)^2 / s_yk^2 + C_y,
    C_y = sum_k log s_yk + K/2 log 2 pi, and S_k = max_y s_yk:
    f_y(q) >= 1/2 ||(q - m_y) / S||^2 + C_y. The tree holds m_y / S plus the extra
    coordinate sqrt(2 (C_y - min C)), so f_y(q) >= 1/2 ||phi(q) - psi(y)||^2 + min C.
    """

    def __init__(self, means: torch.Tensor, log_sigma: torch.Tensor) -> None:
        self.means, self.log_sigma = means, log_sigma
        blocks = range(0, len(log_sigma), BUILD_ROWS)
        log_det = torch.cat([log_sigma[s : s + BUILD_ROWS].double().sum(1) for s in blocks])
        self.log_norm = log_det + 0.5 * LOG_2PI * means.shape[1]
        self.log_norm_min = float(self.log_norm.min())
        self.tree = LowerBoundTree(
            means,
            scale=torch.exp(-log_sigma.max(0).values.double()),
            extra=torch.sqrt(2.0 * (self.log_norm - self.log_norm_min)),
        )

    @cached_property
    def form(self) -> InnerProductForm:
        """f_y(q) = <[q^2, q], [p_y / 2, -p_y m_y]> + 1/2 sum_k p_yk m_yk^2 + C_y, with p = s^-2."""
        psi, b = [], []
        for start in range(0, len(self.means), BUILD_ROWS):
            rows = slice(start, start + BUILD_ROWS)
            m = self.means[rows].double()
            p = torch.exp(-2.0 * self.log_sigma[rows].double())
            psi.append(torch.cat([0.5 * p, -p * m], dim=1).float())
            b.append(0.5 * (p * m * m).sum(1) + self.log_norm[rows])
        return InnerProductForm(torch.cat(psi), torch.cat(b))

    def log_sum(self, queries: torch.Tensor) -> torch.Tensor:
        """log sum_y N(q; m_y, s_y^2) for queries (N, K), float64 (N,)."""
        q = queries.double()

        def pair_value(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            # gaussian_nll with its normalising constant taken from the per-kernel log_norm.
            residual = q[i] - self.means[j].double()
            precision = torch.exp(-2.0 * self.log_sigma[j].double())
            return 0.5 * (residual * residual * precision).sum(-1) + self.log_norm[j]

        search = SearchQueries(
            embedding=self.tree.embed(queries),
            rho=np.full(len(q), 0.5),
            offset=np.full(len(q), self.log_norm_min),
            pair_value=pair_value,
            gemm=lambda: (self.form, torch.cat([q * q, q], dim=1), torch.zeros(len(q), dtype=q.dtype, device=q.device)),
            device=q.device,
        )
        return exact_logsumexp(self.tree, search, width=3 * q.shape[1], k=4)
