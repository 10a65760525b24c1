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
chunk by chunk. With a rounding-error bound e(x) on those values, every y
attaining min f has float32 value <= (running float32 minimum) + 2 e(x); those
survivors are recomputed in float64. A log-sum-exp band holds so many points
that the dense queries of a log-sum-exp get every f in float64 matrix products
instead, summed by a streaming log-sum-exp. Where f has no such form
(Bhattacharyya) the rare huge balls are evaluated against every y; there the
search is split over subsets of Y with tighter bounds (:func:`lower_min`).

The GEMM screen is :class:`~anomri.scores.screen.InnerProductForm`. Peak memory is bounded by the block
sizes below and there, never by |X| |Y|.
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

from anomri.scores import screen
from anomri.scores.screen import BUILD_ROWS, InnerProductForm

logger = logging.getLogger(__name__)

__all__ = [
    "PairFunction",
    "LowerBoundTree",
    "SearchQueries",
    "exact_min",
    "lower_min",
    "candidate_upper_bound",
    "on_subsets",
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
#: Queries screened together (see :data:`anomri.scores.screen.SCREEN_ELEMENTS`).
_SCREEN_QUERIES = 2048
#: Queries sharing the exact float64 blocks of a log-sum-exp (:data:`anomri.scores.screen.EXACT_ROWS` rows each):
#: blocks that no query's ball reaches are skipped, so both are small enough for the bounding boxes to be tight.
_EXACT_QUERIES = 512
#: A query whose ball holds more than |Y| / _DENSE_FRACTION points is screened
#: instead: around there one GEMM pass over Y costs less than the tree search
#: and the exact evaluation of that many points (measured on a 2-core CPU).
_DENSE_FRACTION = 256
#: The same without a GEMM form, when the alternative is evaluating f on all of Y.
_BRUTE_FRACTION = 4
#: Every _SAMPLE_STRIDE-th reference point forms the small tree that estimates ball sizes.
_SAMPLE_STRIDE = 64


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
        self.basis = self._principal_axes(points, max_components, residual_variance)
        embedding = np.concatenate([self._embed_scaled(self._scaled(points[s : s + BUILD_ROWS]) - self.center)
                                    for s in blocks])
        if extra is not None:
            embedding = np.concatenate([embedding, extra.detach().double().cpu().numpy()[:, None]], axis=1)
        self.has_extra = extra is not None
        self.n = len(embedding)
        self.tree = cKDTree(embedding, leafsize=leafsize)
        self.sample_tree = cKDTree(embedding[::_SAMPLE_STRIDE], leafsize=leafsize)

    def _principal_axes(self, points: torch.Tensor, max_components: int, residual_variance: float) -> torch.Tensor:
        """Orthonormal leading principal axes of the scaled, centred points, (D, n_axes) float64.

        The smaller of the two eigenproblems with the same nonzero spectrum is
        solved: the D x D scatter C^T C when D <= M, else the M x M Gram matrix
        C C^T, whose eigenvectors u give the axes C^T u (images: D pixels, M
        reference images). The axes are orthonormalised by QR, since the bound
        needs P^T P = I exactly, not up to the eigensolver's error.
        """
        blocks = range(0, len(points), BUILD_ROWS)
        centred = (self._scaled(points[s : s + BUILD_ROWS]) - self.center for s in blocks)
        if points.shape[1] <= len(points):
            eigvals, eigvecs = torch.linalg.eigh(sum(c.T @ c for c in centred))
        else:
            # At most M x D values, fewer than the D x D scatter would hold.
            stacked = torch.cat(list(centred))
            eigvals, eigvecs = torch.linalg.eigh(stacked @ stacked.T)
            eigvecs = stacked.T @ eigvecs
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
        left = 1.0 - eigvals.cumsum(0) / eigvals.sum().clamp_min(1e-300)
        # Axes without variance add nothing to the bound (and have no direction in the Gram case).
        n_axes = min(int((left > residual_variance).sum()) + 1, max_components, int((eigvals > 0).sum()))
        return torch.linalg.qr(eigvecs[:, :n_axes]).Q.contiguous()

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

    def block_boxes(self, order: np.ndarray | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Bounding boxes of the embedded points taken ``rows`` at a time in ``order`` (default: as given).

        Returns the lower and upper corners, each (blocks, dims).
        """
        data = self.tree.data if order is None else self.tree.data[order]
        starts = np.arange(0, self.n, rows)
        return np.minimum.reduceat(data, starts), np.maximum.reduceat(data, starts)


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
    """min of exact f over the k tree-nearest points (an upper bound on min_y f), and the k-th tree distance squared."""
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

    ``values`` is either paired with the query ids, or, from the dense path of a
    log-sum-exp (``band`` > 0), a (len(ids), R) block of distinct queries against
    R reference points.

    ``radius`` holds every query's ball radius (inclusive). Balls are listed by
    capped k-nearest-neighbour queries: small blocks of neighbouring queries share
    a distance bound, and a query whose k-th neighbour still lies in its ball is
    asked again with 4k, so memory stays bounded by block size times k. Queries
    whose ball holds more than |Y| / _DENSE_FRACTION points (estimated on a
    subsample first, then confirmed by the capped queries) go to the GEMM
    screen (a minimum) or exact GEMM blocks (a log-sum-exp); without a GEMM
    form, those holding more than |Y| / _BRUTE_FRACTION points are evaluated
    against every y.
    """
    cap = max(tree.n // (_DENSE_FRACTION if queries.gemm is not None else _BRUTE_FRACTION), 1)
    # Ball sizes estimated on a subsample send the clearly large balls straight to the screen.
    estimate = _SAMPLE_STRIDE * tree.sample_tree.query_ball_point(
        queries.embedding[todo], radius[todo], workers=_workers(), return_length=True)
    large = estimate > cap
    if large.any():
        logger.debug("%d of %d queries screened densely", int(large.sum()), len(todo))
        _refine_dense(tree, queries, todo[large], radius, band, width, reduce)
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
            _refine_dense(tree, queries, pending, radius, band, width, reduce)
            return
        k = min(4 * k, cap, tree.n)


def _refine_dense(
    tree: LowerBoundTree,
    queries: SearchQueries,
    todo: np.ndarray,
    radius: np.ndarray,
    band: float,
    width: int,
    reduce: Callable[[np.ndarray, torch.Tensor], None],
) -> None:
    """Exact f for the ``todo`` queries against the candidates of a GEMM screen, exact blocks, or all of Y."""
    n_reference = tree.n
    if queries.gemm is None:
        per_block = max(1, _PAIR_ELEMENTS // max(width * n_reference, 1))
        for start in range(0, len(todo), per_block):
            ids = todo[start : start + per_block]
            q = np.repeat(ids, n_reference)
            r = np.tile(np.arange(n_reference), len(ids))
            reduce(q, _evaluate(queries, q, r, width))
        return
    form, phi, a = queries.gemm()
    if band > 0.0:
        # A log-sum-exp: its band holds a large share of Y (a sixth of it on the demo), so f in float64
        # products costs less than listing the candidates and evaluating them pair by pair. Blocks of
        # neighbouring queries skip the reference blocks whose bounding box no query's ball reaches.
        lower, upper = tree.block_boxes(form.order, screen.EXACT_ROWS)
        todo = todo[np.argsort(queries.rank[todo])]
        for start in range(0, len(todo), _EXACT_QUERIES):
            ids = todo[start : start + _EXACT_QUERIES]
            point = queries.embedding[ids][:, None]
            gap = np.maximum(lower[None] - point, 0.0) + np.maximum(point - upper[None], 0.0)
            reached = np.flatnonzero(((gap * gap).sum(-1) <= radius[ids, None] ** 2).any(0))
            rows = torch.as_tensor(ids, device=phi.device)
            for block in form.exact_blocks(phi[rows], a[rows], reached):
                reduce(ids, block)
        return
    for start in range(0, len(todo), _SCREEN_QUERIES):
        ids = todo[start : start + _SCREEN_QUERIES]
        rows = torch.as_tensor(ids, device=phi.device)

        def consume(local_q: torch.Tensor, refs: torch.Tensor, ids: np.ndarray = ids) -> None:
            query_ids = ids[local_q.cpu().numpy()]
            reduce(query_ids, _evaluate(queries, query_ids, refs, width))

        form.screen(phi[rows], a[rows], consume)


def on_subsets(pair_value: PairFunction, rows: torch.Tensor, reference_rows: torch.Tensor) -> PairFunction:
    """``pair_value`` for indices into ``rows`` of the queries and ``reference_rows`` of Y."""
    return lambda i, j: pair_value(rows[i], reference_rows[j])


def candidate_upper_bound(tree: LowerBoundTree, points: torch.Tensor, pair_value: PairFunction, width: int,
                          k: int = 4) -> torch.Tensor:
    """min of exact f over the k points of ``tree`` nearest each query point: an upper bound on min_y f.

    Only the tree's neighbours are used, not its lower bound, so any tree over
    the reference points serves: e.g. one on the means alone, where the tree of
    the bound has coordinates (variances, normalisers) that make its
    nearest-neighbour queries slow or its neighbours poor candidates.

    Parameters
    ----------
    tree : LowerBoundTree
        Over the reference points, rows in the order ``pair_value`` indexes.
    points : Tensor
        Query points (N, D) in the space of the tree's points.
    pair_value : PairFunction
        Exact f on paired (query, reference) indices.
    width : int
        Features read per pair by ``pair_value``.
    """
    device = points.device
    queries = SearchQueries(tree.embed(points), np.ones(len(points)), np.zeros(len(points)), pair_value, None, device)
    return _nearest_upper_bound(tree, queries, k, width)[0]


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
    # Where the k tree-nearest points already fill the ball, no other point can beat them.
    _lower(tree, queries, best, width, covered=lambda radius_sq: kth >= radius_sq * (1.0 - _SLACK))
    return best


def lower_min(tree: LowerBoundTree, queries: SearchQueries, best: torch.Tensor, width: int) -> None:
    """Lower ``best`` in place to min(best, min over the tree's points of f(x, y)), exactly.

    ``best`` (float64, (N,), on ``queries.device``) holds an upper bound per
    query, e.g. f at some point of another set; only points that can beat it
    are evaluated, so a set whose lower bound ``offset`` is already above it
    costs nothing. Chaining this over disjoint sets gives the exact minimum
    over their union.
    """
    _lower(tree, queries, best, width, covered=lambda radius_sq: radius_sq <= 0.0)


def _lower(tree: LowerBoundTree, queries: SearchQueries, best: torch.Tensor, width: int,
           covered: Callable[[np.ndarray], np.ndarray]) -> None:
    """Refine ``best`` over the balls of the queries that ``covered(radius_sq)`` does not rule out."""
    radius_sq = np.maximum(best.cpu().numpy() - queries.offset, 0.0) / queries.rho
    todo = np.flatnonzero(~covered(radius_sq))
    if todo.size:

        def keep_min(q: np.ndarray, values: torch.Tensor) -> None:
            best.scatter_reduce_(0, torch.as_tensor(q, device=best.device), values, reduce="amin")

        _refine(tree, queries, todo, np.sqrt(radius_sq) * (1.0 + _SLACK), 0.0, width, keep_min)


def exact_logsumexp(tree: LowerBoundTree, queries: SearchQueries, width: int, upper: torch.Tensor,
                    band: float) -> torch.Tensor:
    """log sum_y exp(-f(x, y)) over the reference set for every query.

    Terms exp(-f) with f > upper + band are left out; with ``band`` from
    :func:`kernel_sum_band` their total is below exp(-20) of the sum (see the
    module docstring). A query with no term within the band gets -inf.

    Parameters
    ----------
    tree, queries, width
        As for :func:`exact_min`.
    upper : Tensor
        f at some reference point per query (float64, (N,)), e.g. from
        :func:`candidate_upper_bound`: it sets the balls' radii.
    band : float
        :func:`kernel_sum_band` of the whole reference set, also when ``tree``
        holds part of it (the sums of the parts then add up to the whole's).

    Returns
    -------
    Tensor
        float64, shape (N,), on ``queries.device``.
    """
    radius_sq = np.maximum(upper.cpu().numpy() + band - queries.offset, 0.0) / queries.rho
    # Streaming log-sum-exp: total = sum exp(shift - f) with shift the smallest f so far, so every
    # exponent is <= 0; when shift drops, the total is rescaled. ``upper`` is a finite start.
    shift, total = upper.clone(), torch.zeros_like(upper)

    def accumulate(q: np.ndarray, values: torch.Tensor) -> None:
        q = torch.as_tensor(q, device=values.device)
        if values.ndim == 2:  # a dense block of distinct queries, overwritten here to save its copies
            lower = torch.minimum(shift[q], values.min(1).values)
            terms = values.neg_().add_(lower[:, None]).exp_().sum(1)
            total[q] = total[q] * torch.exp(lower - shift[q]) + terms
            shift[q] = lower
            return
        lower = shift.clone().scatter_reduce_(0, q, values, reduce="amin")
        total.mul_(torch.exp(lower - shift))
        shift.copy_(lower)
        total.index_add_(0, q, torch.exp(shift[q] - values))

    _refine(tree, queries, np.arange(len(queries)), np.sqrt(radius_sq) * (1.0 + _SLACK), band, width, accumulate)
    return torch.log(total) - shift
