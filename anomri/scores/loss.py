"""Scores built from the VAE training loss (higher = more novel)."""

from __future__ import annotations

import torch

from anomri.models.gaussian import gaussian_nll, kl_to_standard_normal
from anomri.scores.context import ScoreContext
from anomri.scores.registry import register_score


@register_score("neg-elbo", "mean_i -log p(x|z_i) + KL(q(z|x) || N(0, I)), z_i ~ q(z|x)")
def negative_elbo(ctx: ScoreContext) -> torch.Tensor:
    """Monte Carlo estimate of the negative evidence lower bound.

    s(x) = (1/S) sum_i -log p(x|z_i) + KL(q(z|x) || N(0, I)), z_i ~ q(z|x).
    -ELBO upper-bounds -log p(x), so higher = more novel.
    """
    mean, log_sigma = ctx.sample_decodings
    return gaussian_nll(ctx.x, mean, log_sigma).mean(0) + kl_to_standard_normal(ctx.mu, ctx.logvar)


@register_score("sampled-elbo", "min_i -log p(x|z_i) + KL(q(z|x) || N(0, I)), z_i ~ q(z|x)")
def sampled_elbo(ctx: ScoreContext) -> torch.Tensor:
    """Negative ELBO with the best of the Monte Carlo samples (the min variant of ``neg-elbo``).

    s(x) = min_i -log p(x|z_i) + KL(q(z|x) || N(0, I)), z_i ~ q(z|x), i = 1..S
    (the same samples as ``neg-elbo``). Higher = more novel.
    """
    return ctx.sample_nll.min(0).values + kl_to_standard_normal(ctx.mu, ctx.logvar)
