"""Latent-space scores (higher = more novel)."""

from __future__ import annotations

import torch

from anomri.models.gaussian import kl_to_standard_normal
from anomri.scores.context import ScoreContext
from anomri.scores.registry import register_score


@register_score("vae-reg", "KL(q(z|x) || N(0, I))")
def vae_regulariser(ctx: ScoreContext) -> torch.Tensor:
    """VAE regulariser: how far the posterior strays from the prior.

    s(x) = KL(q(z|x) || N(0, I)) = 0.5 sum_k (mu_k^2 + sigma_k^2 - log sigma_k^2 - 1).
    Higher = more novel.
    """
    return kl_to_standard_normal(ctx.mu, ctx.logvar)
