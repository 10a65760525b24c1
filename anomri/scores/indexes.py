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
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from anomri.models.gaussian import LOG_2PI
from anomri.scores.screen import BUILD_ROWS, InnerProductForm
from anomri.scores.search import (
    LowerBoundTree,
    PairFunction,
    SearchQueries,
    exact_logsumexp,
    exact_min,
    candidate_upper_bound,
    kernel_sum_band,
    lower_min,
    on_subsets,
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


#: A Bhattacharyya stratum is split in two while it holds at least twice
#: max(_STRATUM_POINTS, _STRATUM_FRACTION |Y|) points and the log-variances of some
#: dimension span more than _STRATUM_WIDTH nats. Smaller strata bound D_B more
#: tightly but each costs a tree search per batch.
_STRATUM_POINTS = 512
_STRATUM_FRACTION = 1 / 128
_STRATUM_WIDTH = 2.0


@dataclass
class _Stratum:
    """Reference Gaussians with similar variances, and the lower bound of D_B against them.

    With V_k = max_y v_yk and [l_k, h_k] the range of log v_yk over the stratum,
    for every y in it::

        D_B >= sum_k (m1_k - m2_k)^2 / (4 (v1_k + V_k)) + o(x)
            >= rho(x) ||w (m1 - m2)||^2 + o(x),

    o(x) = sum_k 1/2 log cosh(d_k / 2) with d_k how far log v1_k lies outside
    [l_k, h_k] (log cosh grows with |t|), w_k = 1 / (2 sqrt(v~_k + V_k)) with v~
    the stratum's median variance, rho(x) = min_k (v~_k + V_k) / (v1_k + V_k).
    The tree holds w m_y, so it searches exactly this bound.
    """

    rows: torch.Tensor
    logvar_low: torch.Tensor
    logvar_high: torch.Tensor
    spread: torch.Tensor
    tree: LowerBoundTree

    @classmethod
    def build(cls, means: torch.Tensor, logvar: torch.Tensor, rows: torch.Tensor) -> _Stratum:
        # Column statistics of the float32 log-variances are exact; exp is monotone.
        stratum_logvar = logvar[rows]
        high = stratum_logvar.max(0).values.double().cpu()
        spread = stratum_logvar.median(0).values.double().cpu().exp() + high.exp()
        tree = LowerBoundTree(means[rows], scale=0.5 / spread.sqrt())
        return cls(rows, stratum_logvar.min(0).values.double().cpu(), high, spread, tree)

    def bound(self, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rho(x) and o(x) for query log-variances (N, K) float64 on the CPU."""
        rho = (self.spread / (logvar.exp() + self.logvar_high.exp())).min(1).values
        outside = (self.logvar_low - logvar).clamp_min(0.0) + (logvar - self.logvar_high).clamp_min(0.0)
        return rho, 0.5 * log_cosh(0.5 * outside).sum(1)


def _split_by_variance(logvar: torch.Tensor, rows: torch.Tensor, min_points: int) -> list[torch.Tensor]:
    """Rows split at the median of their widest log-variance dimension, recursively (a KD partition)."""
    values = logvar[rows]
    spans = values.max(0).values - values.min(0).values
    widest = int(spans.argmax())
    if len(rows) < 2 * min_points or float(spans[widest]) <= _STRATUM_WIDTH:
        return [rows]
    order = torch.argsort(values[:, widest], stable=True)
    half = len(rows) // 2
    return (_split_by_variance(logvar, rows[order[:half]], min_points)
            + _split_by_variance(logvar, rows[order[half:]], min_points))


class BhattacharyyaIndex:
    """Exact min_y D_B between a query Gaussian and reference Gaussians N(means_y, diag exp(logvar_y)).

    A single bound over all of Y would have to use the largest reference
    variance of each dimension, and decoders give a few points variances
    e^10 times the typical one: the bound then prunes nothing. So Y is split
    into strata of similar variances (a KD partition of the log-variances),
    each with its own tight bound and tree (:class:`_Stratum`). f at the k
    nearest means of a tree over all of Y gives each query a first upper bound;
    then every stratum lowers it with :func:`~anomri.scores.search.lower_min`,
    which evaluates the exact closed form only where the stratum's bound is
    below the best value so far. Most strata are skipped for most queries on
    their log-variance term o(x) alone.
    """

    def __init__(self, means: torch.Tensor, logvar: torch.Tensor) -> None:
        self.means, self.logvar = means, logvar
        rows = torch.arange(len(means), device=means.device)
        min_points = max(_STRATUM_POINTS, int(len(means) * _STRATUM_FRACTION))
        self.strata = [_Stratum.build(means, logvar, part) for part in _split_by_variance(logvar, rows, min_points)]
        typical = logvar.median(0).values.double().cpu().exp()
        self.tree = LowerBoundTree(means, scale=0.5 / typical.sqrt())

    def min_distance(self, means: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """min_y D_B(N(means, exp(logvar)), N(means_y, exp(logvar_y))) for queries (N, K), float64 (N,)."""
        m, lv = means.double(), logvar.double()
        lv_cpu = lv.cpu()
        width = 4 * m.shape[1]

        def pair_value(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            return bhattacharyya_diagonal(m[i], lv[i], self.means[j].double(), self.logvar[j].double())

        best = candidate_upper_bound(self.tree, means, pair_value, width)
        for stratum in self.strata:
            rho, offset = stratum.bound(lv_cpu)
            active = torch.nonzero(offset < best.cpu()).squeeze(1)
            if not active.numel():
                continue
            rows = active.to(m.device)
            search = SearchQueries(stratum.tree.embed(means[rows]), rho[active].numpy(), offset[active].numpy(),
                                   on_subsets(pair_value, rows, stratum.rows), gemm=None, device=m.device)
            partial = best[rows]
            lower_min(stratum.tree, search, partial, width)
            best[rows] = partial
        return best


class _KernelStratum:
    """Reference kernels of similar widths, rows ``rows`` of Y, and the lower bound of f_y on them.

    With f_y(q) = -log N(q; m_y, s_y^2) = 1/2 sum_k (q_k - m_yk)^2 / s_yk^2 + C_y,
    C_y = sum_k log s_yk + K/2 log 2 pi, and S_k the stratum's largest s_yk:
    f_y(q) >= 1/2 ||(q - m_y) / S||^2 + C_y. The tree holds m_y / S plus the extra
    coordinate sqrt(2 (C_y - min C)), so f_y(q) >= 1/2 ||phi(q) - psi(y)||^2 + min C,
    min C taken over the stratum.
    """

    def __init__(self, means: torch.Tensor, log_sigma: torch.Tensor, log_norm: torch.Tensor,
                 rows: torch.Tensor) -> None:
        # The full tensors, not copies of the stratum's rows: the strata together would double them.
        self.rows, self._means, self._log_sigma, self._log_norm = rows, means, log_sigma, log_norm
        stratum_log_norm = log_norm[rows]
        self.log_norm_min = float(stratum_log_norm.min())
        self.tree = LowerBoundTree(
            means[rows],
            scale=torch.exp(-log_sigma[rows].max(0).values.double()),
            extra=torch.sqrt(2.0 * (stratum_log_norm - self.log_norm_min)),
        )

    @cached_property
    def form(self) -> _KernelForm:
        """f_y(q) as an inner product, in leaf order (:class:`_KernelForm`)."""
        order = torch.as_tensor(self.tree.tree.indices, device=self.rows.device)
        return _KernelForm(self._means, self._log_sigma, self._log_norm, self.rows[order], self.tree.tree.indices)


class _KernelForm(InnerProductForm):
    """f_y(q) = <[q^2, q], [p_y / 2, -p_y m_y]> + 1/2 sum_k p_yk m_yk^2 + C_y, with p = s^-2.

    Psi is expanded in float64 block by block from the float32 means and
    log-sigmas rather than stored: stored, it would take 2 K x 8 bytes per
    reference kernel (720 MB for 500k kernels of 90 features), the largest
    part of the peak memory. Each block gets the same float64 values a stored
    Psi would hold.

    Parameters
    ----------
    means, log_sigma : Tensor
        The reference kernels, (M, K) (all of Y, not copied).
    log_norm : Tensor
        C_y, (M,) float64.
    rows : Tensor
        The rows of Y the form covers, in stored order.
    order : ndarray
        Their positions in the stratum (what :meth:`screen` reports).
    """

    def __init__(self, means: torch.Tensor, log_sigma: torch.Tensor, log_norm: torch.Tensor, rows: torch.Tensor,
                 order: np.ndarray) -> None:
        self.order, self._means, self._log_sigma, self._rows = order, means, log_sigma, rows
        blocks = range(0, len(rows), BUILD_ROWS)
        b = torch.cat([self._offsets(rows[s : s + BUILD_ROWS]) for s in blocks]) + log_norm[rows].to(means.device)
        self._set_offsets(b, 2 * means.shape[1])

    def _kernels(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m_y and p_y = s_y^-2 of Y's rows ``rows``, float64."""
        return self._means[rows].double(), torch.exp(-2.0 * self._log_sigma[rows].double())

    def _offsets(self, rows: torch.Tensor) -> torch.Tensor:
        """1/2 sum_k p_yk m_yk^2 of Y's rows ``rows``."""
        m, p = self._kernels(rows)
        return 0.5 * (p * m * m).sum(1)

    def psi_rows(self, start: int, stop: int) -> torch.Tensor:
        """[p_y / 2, -p_y m_y] of the stored rows [start, stop), float64."""
        m, p = self._kernels(self._rows[start:stop])
        return torch.cat([0.5 * p, -p * m], dim=1)


class GaussianKernelIndex:
    """log sum_y N(q; means_y, diag exp(log_sigma_y)^2) over reference kernels, exact to float precision.

    As for :class:`BhattacharyyaIndex`, one bound over all of Y would use the
    widest kernel of each dimension, so Y is split into strata of similar
    widths (:class:`_KernelStratum`), each with its own tree. f at the k nearest
    means of a tree over all of Y bounds min_y f from above by u; every stratum
    then sums, by :func:`~anomri.scores.search.exact_logsumexp`, its kernels
    with f <= u + ``kernel_sum_band(|Y|)``, and the strata's sums are added in
    log space. The kernels left out sum to at most |Y| exp(-band) exp(-min f),
    a relative error below exp(-20).
    """

    def __init__(self, means: torch.Tensor, log_sigma: torch.Tensor) -> None:
        self.means, self.log_sigma = means, log_sigma
        blocks = range(0, len(log_sigma), BUILD_ROWS)
        log_det = torch.cat([log_sigma[s : s + BUILD_ROWS].double().sum(1) for s in blocks])
        self.log_norm = log_det + 0.5 * LOG_2PI * means.shape[1]
        rows = torch.arange(len(means), device=means.device)
        min_points = max(_STRATUM_POINTS, int(len(means) * _STRATUM_FRACTION))
        self.strata = [_KernelStratum(means, log_sigma, self.log_norm, part)
                       for part in _split_by_variance(2.0 * log_sigma, rows, min_points)]
        # Queries lie off the strata trees' extra coordinate, where nearest-neighbour queries degrade to
        # near-linear scans: the first upper bound comes from a tree on the means alone.
        self.candidates = LowerBoundTree(means, scale=torch.exp(-log_sigma.median(0).values.double()))

    def log_sum(self, queries: torch.Tensor) -> torch.Tensor:
        """log sum_y N(q; m_y, s_y^2) for queries (N, K), float64 (N,)."""
        q = queries.double()
        width = 3 * q.shape[1]
        log_norm = self.log_norm.to(q.device)

        def pair_value(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            # gaussian_nll with its normalising constant taken from the per-kernel log_norm.
            residual = q[i] - self.means[j].double()
            precision = torch.exp(-2.0 * self.log_sigma[j].double())
            return 0.5 * (residual * residual * precision).sum(-1) + log_norm[j]

        upper = candidate_upper_bound(self.candidates, queries, pair_value, width)
        band = kernel_sum_band(len(self.means))
        features, zeros = torch.cat([q * q, q], dim=1), torch.zeros_like(upper)
        total = torch.full_like(upper, -math.inf)
        for stratum in self.strata:
            # Queries whose band ends below the stratum's smallest normaliser have no kernel there.
            rows = torch.nonzero(upper + band > stratum.log_norm_min).squeeze(1)
            if not rows.numel():
                continue
            search = SearchQueries(
                embedding=stratum.tree.embed(queries[rows]),
                rho=np.full(len(rows), 0.5),
                offset=np.full(len(rows), stratum.log_norm_min),
                pair_value=on_subsets(pair_value, rows, stratum.rows),
                gemm=lambda stratum=stratum, rows=rows: (stratum.form, features[rows], zeros[: len(rows)]),
                device=q.device,
            )
            part = exact_logsumexp(stratum.tree, search, width, upper[rows], band)
            total[rows] = torch.logaddexp(total[rows], part)
        return total
