"""Closed-form Gaussian log-densities and divergences shared by the models and the scores.

Kept apart from :mod:`anomri.models.vae` so that the score registry, which every
command with ``--scores`` loads, does not import MONAI (seconds per job).
"""

from __future__ import annotations

import math

import torch

__all__ = ["LOG_2PI", "gaussian_nll", "kl_to_standard_normal"]

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Negative log-density of ``x`` under N(mean, diag exp(log_sigma)^2), summed over the last axis.

    -log p(x) = sum_d [ log s_d + 0.5 log(2 pi) + 0.5 ((x_d - m_d) / s_d)^2 ]
    """
    z = (x - mean) * torch.exp(-log_sigma)
    return (log_sigma + 0.5 * LOG_2PI + 0.5 * z * z).sum(-1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) = 0.5 sum_k (mu_k^2 + exp(logvar_k) - logvar_k - 1)."""
    return 0.5 * (mu * mu + torch.exp(logvar) - logvar - 1.0).sum(-1)
