"""Nearest-neighbour scores against the healthy reference set Y (higher = more novel).

Every minimum is exact (equal to brute force up to float64 rounding): see
:mod:`anomri.scores.search` for the tree filter / exact refine algorithm and
:mod:`anomri.scores.indexes` for the lower bounds. The indexes are built once
per reference set and shared by the scores comparing the same points.
"""

from __future__ import annotations

import torch

from anomri.scores.context import ScoreContext
from anomri.scores.indexes import BhattacharyyaIndex, EuclideanIndex
from anomri.scores.reference import ReferenceSet
from anomri.scores.registry import register_score


def _latent_euclidean(ref: ReferenceSet) -> EuclideanIndex:
    return EuclideanIndex(ref.mu)


def _reconstruction_euclidean(ref: ReferenceSet) -> EuclideanIndex:
    return EuclideanIndex(ref.recon_mean)


def _data_euclidean(ref: ReferenceSet) -> EuclideanIndex:
    return EuclideanIndex(ref.x)


def _latent_bhattacharyya(ref: ReferenceSet) -> BhattacharyyaIndex:
    return BhattacharyyaIndex(ref.mu, ref.logvar)


def _output_bhattacharyya(ref: ReferenceSet) -> BhattacharyyaIndex:
    return BhattacharyyaIndex(ref.recon_mean, 2.0 * ref.recon_log_sigma)


@register_score("latent-nn-euclid", "min_y ||mu(x) - mu(y)||^2", needs_reference=True)
def latent_nn_euclidean(ctx: ScoreContext) -> torch.Tensor:
    """Latent-space nearest-neighbour distance.

    s(x) = min_{y in Y} || mu(x) - mu(y) ||^2, the squared Euclidean distance
    between posterior means. Higher = more novel.
    """
    index = ctx.reference_set.index("latent-euclid", _latent_euclidean)
    return index.min_sqdist(ctx.mu).to(ctx.x.dtype)


@register_score("latent-nn-bhatt", "min_y D_B(q(z|x), q(z|y))", needs_reference=True)
def latent_nn_bhattacharyya(ctx: ScoreContext) -> torch.Tensor:
    """Latent-space nearest neighbour in Bhattacharyya distance.

    s(x) = min_{y in Y} D_B(q(z|x), q(z|y)), with, for diagonal Gaussians,
    D_B = sum_k [ (mu_k(x) - mu_k(y))^2 / (4 (sigma_k^2(x) + sigma_k^2(y)))
    + 1/2 log((sigma_k^2(x) + sigma_k^2(y)) / (2 sigma_k(x) sigma_k(y))) ].
    Higher = more novel.
    """
    index = ctx.reference_set.index("latent-bhatt", _latent_bhattacharyya)
    return index.min_distance(ctx.mu, ctx.logvar).to(ctx.x.dtype)


@register_score("output-nn-euclid", "min_y ||m(mu(x)) - m(mu(y))||^2", needs_reference=True)
def output_nn_euclidean(ctx: ScoreContext) -> torch.Tensor:
    """Output-space nearest-neighbour distance between reconstructions.

    s(x) = min_{y in Y} || m(mu(x)) - m(mu(y)) ||^2. Higher = more novel.
    """
    index = ctx.reference_set.index("recon-euclid", _reconstruction_euclidean)
    return index.min_sqdist(ctx.reconstruction[0]).to(ctx.x.dtype)


@register_score("output-nn-bhatt", "min_y D_B(p(x|mu(x)), p(x|mu(y)))", needs_reference=True)
def output_nn_bhattacharyya(ctx: ScoreContext) -> torch.Tensor:
    """Output-space nearest neighbour in Bhattacharyya distance.

    s(x) = min_{y in Y} D_B(N(m(mu(x)), diag s^2(mu(x))), N(m(mu(y)), diag s^2(mu(y)))),
    the closed form of ``latent-nn-bhatt`` applied to the decoder's Gaussians.
    Higher = more novel.
    """
    index = ctx.reference_set.index("output-bhatt", _output_bhattacharyya)
    mean, log_sigma = ctx.reconstruction
    return index.min_distance(mean, 2.0 * log_sigma).to(ctx.x.dtype)


@register_score("input-to-recon-nn", "min_y ||x - m(mu(y))||^2", needs_reference=True)
def input_to_reconstruction_nn(ctx: ScoreContext) -> torch.Tensor:
    """Distance from the input to the nearest reconstruction of a reference sample.

    s(x) = min_{y in Y} || x - m(mu(y)) ||^2. Higher = more novel.
    """
    index = ctx.reference_set.index("recon-euclid", _reconstruction_euclidean)
    return index.min_sqdist(ctx.x).to(ctx.x.dtype)


@register_score("recon-to-data-nn", "min_y ||m(mu(x)) - y||^2", needs_reference=True)
def reconstruction_to_data_nn(ctx: ScoreContext) -> torch.Tensor:
    """Distance from the reconstruction to the nearest reference sample.

    s(x) = min_{y in Y} || m(mu(x)) - y ||^2. Higher = more novel.
    """
    index = ctx.reference_set.index("data-euclid", _data_euclidean)
    return index.min_sqdist(ctx.reconstruction[0]).to(ctx.x.dtype)


@register_score("input-nn-euclid", "min_y ||x - y||^2", needs_reference=True)
def input_nn_euclidean(ctx: ScoreContext) -> torch.Tensor:
    """Input-space nearest-neighbour distance, the VAE-free baseline.

    s(x) = min_{y in Y} || x - y ||^2 in the standardised feature space.
    Higher = more novel.
    """
    index = ctx.reference_set.index("data-euclid", _data_euclidean)
    return index.min_sqdist(ctx.x).to(ctx.x.dtype)
