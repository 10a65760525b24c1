"""Variational autoencoder for per-voxel q-space feature vectors.

The encoder is q(z|x) = N(mu(x), diag sigma^2(x)) and the decoder is a *Gaussian*
p(x|z) = N(m(z), diag s^2(z)). MONAI's ``VarFullyConnectedNet`` supplies the
layers; its decoder only predicts a mean, so it is built with twice the output
channels and the second half is read as log s, the variance head of the
original ND-VAE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import VarFullyConnectedNet
from torch import nn
from torch.nn import functional as F

from anomri.models.gaussian import gaussian_nll, kl_to_standard_normal

__all__ = ["GaussianVAE"]

#: Latent rows decoded at once: the hidden activations of a chunk stay in a CPU core's cache.
DECODE_ROWS = 4096


class GaussianVAE(nn.Module):
    """VAE with Gaussian encoder and Gaussian decoder for feature vectors.

    Inputs are standardised with the training set's per-feature mean and standard
    deviation, kept as buffers so a checkpoint carries them; every score is
    computed in that standardised space.

    Parameters
    ----------
    in_channels : int
        Number of features per voxel.
    latent_size : int
        Dimension of z.
    hidden_channels : sequence of int
        Widths of the encoder's hidden layers; the decoder mirrors them.
    dropout : float, optional
        Dropout ratio of the hidden layers.
    act : str
        MONAI activation name. A smooth one keeps latent optimisation well behaved.
    min_log_sigma : float
        Smooth lower bound of the decoder's log s, so the likelihood cannot
        diverge on voxels the decoder reproduces exactly.
    """

    kind = "vae"

    def __init__(
        self,
        in_channels: int,
        latent_size: int = 8,
        hidden_channels: Sequence[int] = (128, 64),
        dropout: float | None = None,
        act: str = "ELU",
        min_log_sigma: float = -5.0,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.latent_size = int(latent_size)
        self.min_log_sigma = float(min_log_sigma)
        self.net = VarFullyConnectedNet(
            in_channels=self.in_channels,
            out_channels=2 * self.in_channels,
            latent_size=self.latent_size,
            encode_channels=list(hidden_channels),
            decode_channels=list(reversed(hidden_channels)),
            dropout=dropout,
            act=act,
        )
        self.register_buffer("feature_mean", torch.zeros(self.in_channels))
        self.register_buffer("feature_std", torch.ones(self.in_channels))

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training features' mean and standard deviation (std floored at 1e-6)."""
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=self.feature_mean.dtype))
        self.feature_std.copy_(torch.as_tensor(std, dtype=self.feature_std.dtype).clamp_min(1e-6))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw features to the model's standardised space."""
        return (x - self.feature_mean) / self.feature_std

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mu, logvar) of q(z|x) for standardised ``x`` of shape (N, D)."""
        return self.net.encode_forward(x)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (m, log s) of p(x|z) for ``z`` of shape (..., L)."""
        lead = z.shape[:-1]
        rows = z.reshape(-1, self.latent_size)
        # Chunks keep the hidden activations in cache: 45 Monte Carlo samples of 4096 voxels decoded at once took
        # twice as long on a CPU core (memory-bound). Each row's output does not depend on the chunking.
        out = torch.cat([self.net.decode_forward(chunk, use_sigmoid=False) for chunk in rows.split(DECODE_ROWS)])
        mean, raw = out.reshape(*lead, 2 * self.in_channels).chunk(2, dim=-1)
        log_sigma = self.min_log_sigma + F.softplus(raw - self.min_log_sigma)
        return mean, log_sigma

    def loss(
        self, x: torch.Tensor, kl_weight: float = 1.0, n_samples: int = 1, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negative ELBO with KL weight: mean over the batch of E_q[-log p(x|z)] + lambda KL.

        Returns the total loss and its reconstruction and KL parts (batch means).
        """
        mu, logvar = self.encode(x)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn((n_samples, *mu.shape), device=mu.device, dtype=mu.dtype, generator=generator)
        z = mu + eps * std
        mean, log_sigma = self.decode(z)
        rec = gaussian_nll(x, mean, log_sigma).mean(0).mean()
        kl = kl_to_standard_normal(mu, logvar).mean()
        return rec + kl_weight * kl, rec, kl

    def hparams(self) -> dict:
        """Constructor arguments, for rebuilding the model from a checkpoint."""
        return {
            "in_channels": self.in_channels,
            "latent_size": self.latent_size,
            "hidden_channels": [m[0].out_features for m in self.net.encode],
            "min_log_sigma": self.min_log_sigma,
        }
