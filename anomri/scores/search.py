"""Exact searches of the healthy reference set: minimum and log-sum-exp of f(x, y) over y.

The reference-set scores need, for every test sample x, either the minimum over
the reference set Y of some f(x, y) (nearest-neighbour scores, f a squared
distance or a Bhattacharyya distance) or log sum_y exp(-f(x, y)) (densities, f a
negative log kernel). Brute force costs |X| |Y| evaluations of f. Both searches
here return the brute-force value (up to float64 rounding) with far fewer.

**Tree filter, exact refine.** A KD-tree indexes an embedding psi(y) of the
reference points, and each query has an embedding phi(x), a factor rho(x) > 0
and an offset c(x) such that for *every* y::

    rho(x) ||phi(x) - psi(y)||^2 + c(x) <= f(x, y)                  (lower bound)

f at the k tree-nearest points bounds min_y f from above by u(x); any y that can
beat u(x) lies in the tree ball of squared radius (u(x) - c(x)) / rho(x), so f on
the ball's members, in float64, gives the exact minimum. For a log-sum-exp the
ball of squared radius (u(x) + band - c(x)) / rho(x) holds every y with
f <= min f + band; the terms left out sum to at most |Y| exp(-band) times the
largest one, so ``band = log|Y| + 20`` keeps the relative error below
exp(-20) = 2e-9, under float32 resolution. Balls are listed by capped
k-nearest-neighbour queries, so memory never depends on how large a ball is.

**GEMM screen, exact refine.** When a ball holds a sizeable fraction of Y (the
embedding cannot separate noisy high-dimensional points), f written as
``<Phi(x), Psi(y)> + a(x) + b(y)`` is evaluated in float32 matrix products,
chunk by chunk. With a rounding-error bound e(x) on those values, every y with
f <= min f + band has float32 value <= (running float32 minimum) + band + 2 e(x);
those survivors are recomputed in float64. Where f has no such form
(Bhattacharyya) the rare huge balls are evaluated against every y.

Peak memory is bounded by the block sizes below, never by |X| |Y|.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

__all__ = [
    "PairFunction",
    "LowerBoundTree",
    "InnerProductForm",
    "SearchQueries",
    "exact_min",
    "exact_logsumexp",
    "kernel_sum_band",
]

#: f(x_i, y_j) in float64 for paired index tensors (i, j): the exact evaluator.
PairFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Relative slack of the bound comparisons: ties decided by float64 rounding
#: cost at most this relative error in the result.
_SLACK = 1e-9
#: Elements (pairs x features) evaluated at once by the exact refine.
_PAIR_ELEMENTS = 1 << 22
#: Tree neighbours (query x k) listed at once.
_BALL_MEMBERS = 1 << 20
#: Neighbours first asked for when listing a ball, and queries sharing one distance bound.
_FIRST_K = 128
_BLOCK_QUERIES = 64
#: Entries of one float32 screening block (|X chunk| x |Y chunk|), and queries screened together.
_SCREEN_ELEMENTS = 1 << 23
_SCREEN_QUERIES = 2048
#: A query whose ball holds more than |Y| / _DENSE_FRACTION points is screened
#: instead: around there one GEMM pass over Y costs less than the tree search
#: and the exact evaluation of that many points (measured on a 2-core CPU).
_DENSE_FRACTION = 256
#: The same without a GEMM form, when the alternative is evaluating f on all of Y.
_BRUTE_FRACTION = 4
#: Every _SAMPLE_STRIDE-th reference point forms the small tree that estimates ball sizes.
_SAMPLE_STRIDE = 64
#: Reference rows converted to float64 at once while building (bounds the build's memory).
BUILD_ROWS = 1 << 16


def kernel_sum_band(n_reference: int) -> float:
    """Width in nats of the kernels kept by :func:`exact_logsumexp` (relative error <= exp(-20))."""
    return math.log(max(n_reference, 1)) + 20.0


class LowerBoundTree:
    """KD-tree over a lower-bounding embedding of reference points.

    The embedding of a point a (scaled by ``scale``, centred) is its projection on
    the leading principal axes P of the reference points, the norm of the
    residual R = a - P P^T a, and an optional extra coordinate::

        psi(y) = [P^T a(y), ||R a(y)||, extra(y)],   phi(x) = [P^T a(x), ||R a(x)||, 0]

    so that, by the reverse triangle inequality on the residuals,
    ``||phi(x) - psi(y)||^2 <= ||scale * (x - y)||^2 + extra(y)^2``. The tree has
    few coordinates even for high-dimensional points on a low-dimensional
    manifold (decoder outputs), which keeps the search fast.

    Parameters
    ----------
    points : Tensor
        Reference points, shape (M, D).
    scale : Tensor, optional
        Per-feature scale applied before the embedding, shape (D,).
    extra : Tensor, optional
        Non-negative extra coordinate per reference point, shape (M,).
    max_components : int
        Most principal axes kept.
    residual_variance : float
        Fewer axes are kept when they leave at most this fraction of the variance.
    leafsize : int
        Leaf size of the ``scipy.spatial.cKDTree``.
    """

    def __init__(
        self,
        points: torch.Tensor,
        scale: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        max_components: int = 16,
        residual_variance: float = 1e-4,
        leafsize: int = 16,
    ) -> None:
        self.scale = None if scale is None else scale.detach().double().cpu()
        blocks = range(0, len(points), BUILD_ROWS)
        self.center = sum(self._scaled(points[s : s + BUILD_ROWS]).sum(0) for s in blocks) / len(points)
        centred = (self._scaled(points[s : s + BUILD_ROWS]) - self.center for s in blocks)
        scatter = sum(c.T @ c for c in centred)
        eigvals, eigvecs = torch.linalg.eigh(scatter)
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
        left = 1.0 - eigvals.cumsum(0) / eigvals.sum().clamp_min(1e-300)
        n_axes = int((left > residual_variance).sum()) + 1
        self.basis = eigvecs[:, : min(n_axes, max_components, points.shape[1])].contiguous()
        embedding = np.concatenate([self._embed_scaled(self._scaled(points[s : s + BUILD_ROWS]) - self.center)
                                    for s in blocks])
        if extra is not None:
            embedding = np.concatenate([embedding, extra.detach().double().cpu().numpy()[:, None]], axis=1)
        self.has_extra = extra is not None
        self.n = len(embedding)
        self.tree = cKDTree(embedding, leafsize=leafsize)
        self.sample_tree = cKDTree(embedding[::_SAMPLE_STRIDE], leafsize=leafsize)

    def _scaled(self, points: torch.Tensor) -> torch.Tensor:
        points = points.detach().double().cpu()
        return points if self.scale is None else points * self.scale

    def _embed_scaled(self, centred: torch.Tensor) -> np.ndarray:
        projection = centred @ self.basis
        residual = torch.linalg.vector_norm(centred - projection @ self.basis.T, dim=1, keepdim=True)
        return torch.cat([projection, residual], dim=1).numpy()

    def embed(self, queries: torch.Tensor) -> np.ndarray:
        """phi(x) for query points of shape (N, D) (extra coordinate 0)."""
        embedding = self._embed_scaled(self._scaled(queries) - self.center)
        if self.has_extra:
            embedding = np.concatenate([embedding, np.zeros((len(embedding), 1))], axis=1)
        return embedding

    @property
    def dims(self) -> int:
        """Number of tree coordinates."""
        return self.tree.m


class InnerProductForm:
    """f(x, y) = <Phi(x), Psi(y)> + a(x) + b(y), for screening in float32 matrix products.

    Parameters
    ----------
    psi : Tensor
        Psi(Y), shape (M, K), kept in float32 (the error bound allows for the rounding).
    b : Tensor
        b(Y), shape (M,).
    """

    def __init__(self, psi: torch.Tensor, b: torch.Tensor) -> None:
        self.psi = psi.float().contiguous()
        self.b = b.float()
        self.psi_norm_max = max(float(torch.linalg.vector_norm(self.psi[s : s + BUILD_ROWS].double(), dim=1).max())
                                for s in range(0, len(self.psi), BUILD_ROWS))
        self.b_abs_max = float(b.double().abs().max())

    def error_bound(self, phi: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Bound on |float32 f - f| per query.

        Higham's gamma_K bound on a float32 dot product, with K raised by 8 for the
        rounding of Phi, Psi, a, b to float32 and the two additions, then doubled.
        """
        k = self.psi.shape[1] + 8
        unit = 2.0**-24
        gamma = 2.0 * k * unit / (1.0 - k * unit)
        phi_norm = torch.linalg.vector_norm(phi.double(), dim=1)
        return gamma * (phi_norm * self.psi_norm_max + a.double().abs() + self.b_abs_max)

    def screen(self, phi: torch.Tensor, a: torch.Tensor, band: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, reference) index pairs holding every y with f <= min_y f + band, per query.

        Parameters
        ----------
        phi, a : Tensor
            Phi(x) (Q, K) and a(x) (Q,) of the queries, float64.
        band : float
            0 for a minimum; the kept width for a log-sum-exp.
        """
        margin = (band + 2.0 * self.error_bound(phi, a)).float()
        phi32, a32 = phi.float(), a.float()
        running = torch.full((len(phi),), math.inf, device=phi.device)
        rows = max(1, _SCREEN_ELEMENTS // max(len(phi), 1))
        kept_q, kept_r = [], []
        for start in range(0, len(self.psi), rows):
            values = torch.addmm(self.b[start : start + rows], phi32, self.psi[start : start + rows].T)
            values += a32[:, None]
            running = torch.minimum(running, values.min(1).values)
            q, r = torch.nonzero(values <= (running + margin)[:, None], as_tuple=True)
            kept_q.append(q)
            kept_r.append(r + start)
        return torch.cat(kept_q), torch.cat(kept_r)


@dataclass
class SearchQueries:
    """Everything a search needs about one batch of queries.

    Attributes
    ----------
    embedding : ndarray
        phi(x), shape (N, tree.dims).
    rho, offset : ndarray
        Per-query factor and offset of the lower bound, shape (N,).
    pair_value : PairFunction
        Exact f(x_i, y_j) in float64.
    gemm : callable, optional
        Returns (InnerProductForm, Phi(X) (N, K) float64, a(X) (N,) float64), the
        screening form for queries whose ball is too large; called only then.
        Without it those queries are evaluated against every y (exact, slower).
    device : torch.device
        Where ``pair_value`` wants its index tensors.
    """

    embedding: np.ndarray
    rho: np.ndarray
    offset: np.ndarray
    pair_value: PairFunction
    gemm: Callable[[], tuple[InnerProductForm, torch.Tensor, torch.Tensor]] | None
    device: torch.device

    def __len__(self) -> int:
        return len(self.embedding)

    @cached_property
    def rank(self) -> np.ndarray:
        """Position of each query in the leaf order of a KD-tree on the queries.

        Searching neighbouring queries one after another keeps the reference
        tree's nodes in cache: it halves the search time on a CPU.
        """
        rank = np.empty(len(self), dtype=np.int64)
        rank[cKDTree(self.embedding, leafsize=8).indices] = np.arange(len(self))
        return rank


def _evaluate(queries: SearchQueries, q: np.ndarray | torch.Tensor, r: np.ndarray | torch.Tensor,
              width: int) -> torch.Tensor:
    """Exact f on paired indices, in blocks of at most ``_PAIR_ELEMENTS`` elements."""
    q = torch.as_tensor(q, dtype=torch.long, device=queries.device)
    r = torch.as_tensor(r, dtype=torch.long, device=queries.device)
    block = max(1, _PAIR_ELEMENTS // max(width, 1))
    if len(q) <= block:
        return queries.pair_value(q, r)
    return torch.cat([queries.pair_value(q[s : s + block], r[s : s + block]) for s in range(0, len(q), block)])


def _workers() -> int:
    return max(1, torch.get_num_threads())


def _nearest_upper_bound(tree: LowerBoundTree, queries: SearchQueries, k: int,
                         width: int) -> tuple[torch.Tensor, np.ndarray]:
    """min of exact f over the k tree-nearest points, and the k-th tree distance squared."""
    k = min(k, tree.n)
    order = np.argsort(queries.rank)
    dist, idx = np.empty((len(queries), k)), np.empty((len(queries), k), dtype=np.int64)
    found = tree.tree.query(queries.embedding[order], k=k, workers=_workers())
    dist[order], idx[order] = (a.reshape(len(queries), k) for a in found)
    values = _evaluate(queries, np.repeat(np.arange(len(queries)), k), idx.ravel(), width).view(len(queries), k)
    return values.min(1).values, dist[:, -1] ** 2


def _refine(
    tree: LowerBoundTree,
    queries: SearchQueries,
    todo: np.ndarray,
    radius: np.ndarray,
    band: float,
    width: int,
    reduce: Callable[[np.ndarray, torch.Tensor], None],
) -> None:
    """Exact f over every y in the balls of the ``todo`` queries, passed to ``reduce(query ids, values)``.

    ``radius`` holds every query's ball radius (inclusive). Balls are listed by
    capped k-nearest-neighbour queries: small blocks of neighbouring queries share
    a distance bound, and a query whose k-th neighbour still lies in its ball is
    asked again with 4k, so memory stays bounded by block size times k. Queries
    whose ball holds more than |Y| / _DENSE_FRACTION points (estimated on a
    subsample first, then confirmed by the capped queries) go to the GEMM
    screen; without a GEMM form, those holding more than |Y| / _BRUTE_FRACTION
    points are evaluated against every y.
    """
    cap = max(tree.n // (_DENSE_FRACTION if queries.gemm is not None else _BRUTE_FRACTION), 1)
    # Ball sizes estimated on a subsample send the clearly large balls straight to the screen.
    estimate = _SAMPLE_STRIDE * tree.sample_tree.query_ball_point(
        queries.embedding[todo], radius[todo], workers=_workers(), return_length=True)
    large = estimate > cap
    if large.any():
        logger.debug("%d of %d queries screened densely", int(large.sum()), len(todo))
        _refine_dense(queries, todo[large], band, width, tree.n, reduce)
    todo = todo[~large]
    # Neighbouring queries have similar radii, so small blocks in locality order share a tight bound.
    pending = todo[np.argsort(queries.rank[todo])]
    k = min(_FIRST_K, cap)
    while pending.size:
        saturated = []
        per_block = max(1, min(_BALL_MEMBERS // k, _BLOCK_QUERIES))
        for start in range(0, len(pending), per_block):
            block = pending[start : start + per_block]
            r = radius[block]
            bound = float(r.max()) * (1 + _SLACK) + 1e-300
            dist, idx = tree.tree.query(queries.embedding[block], k=k, distance_upper_bound=bound, workers=_workers())
            dist, idx = dist.reshape(len(block), k), idx.reshape(len(block), k)
            inside = dist <= r[:, None]
            full = inside[:, -1] & (k < tree.n)  # the ball may hold more than k points
            rows, cols = np.nonzero(inside[~full])
            query_ids = block[~full][rows]
            reduce(query_ids, _evaluate(queries, query_ids, idx[~full][rows, cols], width))
            saturated.append(block[full])
        pending = np.concatenate(saturated)
        if pending.size and k >= min(cap, tree.n):
            _refine_dense(queries, pending, band, width, tree.n, reduce)
            return
        k = min(4 * k, cap, tree.n)


def _refine_dense(
    queries: SearchQueries,
    todo: np.ndarray,
    band: float,
    width: int,
    n_reference: int,
    reduce: Callable[[np.ndarray, torch.Tensor], None],
) -> None:
    """Exact f for the ``todo`` queries against the candidates of a GEMM screen, or all of Y."""
    if queries.gemm is None:
        per_block = max(1, _PAIR_ELEMENTS // max(width * n_reference, 1))
        for start in range(0, len(todo), per_block):
            ids = todo[start : start + per_block]
            q = np.repeat(ids, n_reference)
            r = np.tile(np.arange(n_reference), len(ids))
            reduce(q, _evaluate(queries, q, r, width))
        return
    form, phi, a = queries.gemm()
    for start in range(0, len(todo), _SCREEN_QUERIES):
        ids = todo[start : start + _SCREEN_QUERIES]
        rows = torch.as_tensor(ids, device=phi.device)
        local_q, refs = form.screen(phi[rows], a[rows], band)
        query_ids = ids[local_q.cpu().numpy()]
        reduce(query_ids, _evaluate(queries, query_ids, refs, width))


def exact_min(tree: LowerBoundTree, queries: SearchQueries, width: int, k: int = 4) -> torch.Tensor:
    """min over the reference set of f(x, y) for every query, exact.

    Parameters
    ----------
    tree : LowerBoundTree
    queries : SearchQueries
        Must satisfy the lower bound of :class:`LowerBoundTree` for f.
    width : int
        Features read per pair by ``pair_value`` (sets the evaluation block size).
    k : int
        Tree neighbours whose exact f gives the first upper bound.

    Returns
    -------
    Tensor
        float64, shape (N,), on ``queries.device``.
    """
    best, kth = _nearest_upper_bound(tree, queries, k, width)
    best_np = best.cpu().numpy()
    radius_sq = np.maximum(best_np - queries.offset, 0.0) / queries.rho
    todo = np.flatnonzero(kth < radius_sq * (1.0 - _SLACK))
    if todo.size:

        def keep_min(q: np.ndarray, values: torch.Tensor) -> None:
            best.scatter_reduce_(0, torch.as_tensor(q, device=best.device), values, reduce="amin")

        _refine(tree, queries, todo, np.sqrt(radius_sq) * (1.0 + _SLACK), 0.0, width, keep_min)
    return best


def exact_logsumexp(tree: LowerBoundTree, queries: SearchQueries, width: int, k: int = 4) -> torch.Tensor:
    """log sum_y exp(-f(x, y)) over the reference set for every query.

    Kernels more than :func:`kernel_sum_band` nats below the largest are left
    out; their total is below exp(-20) of the sum (see the module docstring).

    Returns
    -------
    Tensor
        float64, shape (N,), on ``queries.device``.
    """
    band = kernel_sum_band(tree.n)
    upper, _ = _nearest_upper_bound(tree, queries, k, width)
    radius_sq = np.maximum(upper.cpu().numpy() + band - queries.offset, 0.0) / queries.rho
    smallest = torch.full_like(upper, math.inf)
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []

    def collect(q: np.ndarray, values: torch.Tensor) -> None:
        q = torch.as_tensor(q, device=values.device)
        smallest.scatter_reduce_(0, q, values, reduce="amin")
        pieces.append((q, values))

    _refine(tree, queries, np.arange(len(queries)), np.sqrt(radius_sq) * (1.0 + _SLACK), band, width, collect)
    # Shift by the smallest f of each query so every exponent is <= 0.
    total = torch.zeros_like(upper)
    for q, values in pieces:
        total.index_add_(0, q, torch.exp(smallest[q] - values))
    return torch.log(total) - smallest
