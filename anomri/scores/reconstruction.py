"""Reconstruction scores: how badly the VAE reproduces x (higher = more novel)."""

from __future__ import annotations

import torch

from anomri.models.gaussian import gaussian_nll
from anomri.scores.context import ScoreContext
from anomri.scores.registry import register_score


def _squared_error(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return ((x - mean) ** 2).sum(-1)


@register_score("det-rec-err", "||x - m(mu(x))||^2")
def deterministic_reconstruction_error(ctx: ScoreContext) -> torch.Tensor:
    """Deterministic reconstruction error.

    s(x) = || x - E[p(x | E[q(z|x)])] ||^2 = || x - m(mu(x)) ||^2.
    Higher = more novel.
    """
    return _squared_error(ctx.x, ctx.reconstruction[0])


@register_score("det-rec-lik", "-log p(x | mu(x))")
def deterministic_reconstruction_likelihood(ctx: ScoreContext) -> torch.Tensor:
    """Deterministic reconstruction negative log-likelihood.

    s(x) = -log N(x; m(mu(x)), diag s^2(mu(x))), constants included.
    The sign is flipped with respect to a likelihood so that higher = more novel.
    """
    mean, log_sigma = ctx.reconstruction
    return gaussian_nll(ctx.x, mean, log_sigma)


@register_score("enc-stoch-rec-err", "mean_i ||x - m(z_i)||^2, z_i ~ q(z|x)")
def encoder_stochastic_reconstruction_error(ctx: ScoreContext) -> torch.Tensor:
    """Encoder-stochastic reconstruction error.

    s(x) = (1/S) sum_i || x - m(z_i) ||^2 with z_i ~ q(z|x), S Monte Carlo samples.
    Higher = more novel.
    """
    return _squared_error(ctx.x, ctx.sample_decodings[0]).mean(0)


@register_score("enc-stoch-rec-err-min", "min_i ||x - m(z_i)||^2, z_i ~ q(z|x)")
def encoder_stochastic_reconstruction_error_min(ctx: ScoreContext) -> torch.Tensor:
    """Smallest encoder-stochastic reconstruction error.

    s(x) = min_i || x - m(z_i) ||^2 with z_i ~ q(z|x), i = 1..S (the same samples
    as ``enc-stoch-rec-err``). Higher = more novel.
    """
    return _squared_error(ctx.x, ctx.sample_decodings[0]).min(0).values
