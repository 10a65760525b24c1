"""Monte Carlo reconstruction scores, each as a mean and a min over S samples (higher = more novel).

The samples are the context's seeded, cached draws, so a mean score and its
``-min`` variant see the same S samples.
"""

from __future__ import annotations

import torch

from anomri.scores.context import ScoreContext
from anomri.scores.reconstruction import _squared_error
from anomri.scores.registry import register_score


@register_score("enc-stoch-rec-lik", "mean_i -log p(x|z_i), z_i ~ q(z|x)")
def encoder_stochastic_reconstruction_likelihood(ctx: ScoreContext) -> torch.Tensor:
    """Encoder-stochastic reconstruction negative log-likelihood.

    s(x) = (1/S) sum_i -log p(x|z_i), z_i ~ q(z|x). Higher = more novel.
    """
    return ctx.sample_nll.mean(0)


@register_score("enc-stoch-rec-lik-min", "min_i -log p(x|z_i), z_i ~ q(z|x)")
def encoder_stochastic_reconstruction_likelihood_min(ctx: ScoreContext) -> torch.Tensor:
    """Best encoder-stochastic reconstruction negative log-likelihood.

    s(x) = min_i -log p(x|z_i), z_i ~ q(z|x), i = 1..S. Higher = more novel.
    """
    return ctx.sample_nll.min(0).values


def _decoder_errors(ctx: ScoreContext) -> torch.Tensor:
    return ctx.shared("decoder-squared-errors", lambda: _squared_error(ctx.x, ctx.decoder_samples))


def _full_errors(ctx: ScoreContext) -> torch.Tensor:
    return ctx.shared("full-squared-errors", lambda: _squared_error(ctx.x, ctx.full_samples))


@register_score("dec-stoch-rec-err", "mean_i ||x - x_i||^2, x_i ~ p(x|mu(x))")
def decoder_stochastic_reconstruction_error(ctx: ScoreContext) -> torch.Tensor:
    """Decoder-stochastic reconstruction error.

    s(x) = (1/S) sum_i ||x - x_i||^2, x_i ~ p(x|mu(x)). Its expectation is
    ||x - m(mu(x))||^2 + sum_d s_d^2(mu(x)). Higher = more novel.
    """
    return _decoder_errors(ctx).mean(0)


@register_score("dec-stoch-rec-err-min", "min_i ||x - x_i||^2, x_i ~ p(x|mu(x))")
def decoder_stochastic_reconstruction_error_min(ctx: ScoreContext) -> torch.Tensor:
    """Smallest decoder-stochastic reconstruction error.

    s(x) = min_i ||x - x_i||^2, x_i ~ p(x|mu(x)), i = 1..S. Higher = more novel.
    """
    return _decoder_errors(ctx).min(0).values


@register_score("full-stoch-rec-err", "mean_i ||x - x_i||^2, z_i ~ q(z|x), x_i ~ p(x|z_i)")
def fully_stochastic_reconstruction_error(ctx: ScoreContext) -> torch.Tensor:
    """Fully stochastic reconstruction error.

    s(x) = (1/S) sum_i ||x - x_i||^2, z_i ~ q(z|x), x_i ~ p(x|z_i). Higher = more novel.
    """
    return _full_errors(ctx).mean(0)


@register_score("full-stoch-rec-err-min", "min_i ||x - x_i||^2, z_i ~ q(z|x), x_i ~ p(x|z_i)")
def fully_stochastic_reconstruction_error_min(ctx: ScoreContext) -> torch.Tensor:
    """Smallest fully stochastic reconstruction error.

    s(x) = min_i ||x - x_i||^2, z_i ~ q(z|x), x_i ~ p(x|z_i), i = 1..S. Higher = more novel.
    """
    return _full_errors(ctx).min(0).values
