"""Convolutional VAE with a Gaussian decoder for 2-D images, and its flattened view for the score registry.

The image counterpart of the voxel :class:`~anomri.models.vae.GaussianVAE`:
q(z|x) = N(mu(x), diag sigma^2(x)) from a MONAI ``Regressor`` (strided
convolutions + a linear layer), p(x|z) = N(m(z), diag s^2(z)) per pixel from a
MONAI ``Generator`` (linear layer + transposed convolutions) whose last layer
has 2C channels: the mean and log s of each pixel.

:class:`FlatImageVAE` presents the model over *flattened* images, shape (N, C*H*W),
with the ``encode``/``decode``/``standardize`` of ``GaussianVAE``, so every
registry score (which sums over the last axis) gives an image-level score
unchanged (:class:`anomri.scores.pixelwise.PixelwiseContext` gives the per-pixel
terms of the reconstruction scores as anomaly maps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import Generator, Regressor
from torch import nn
from torch.nn import functional as F

from anomri.models.gaussian import gaussian_nll, kl_to_standard_normal

__all__ = [
    "ChannelStandardizer", "ConvEncoderModel", "ConvVAE", "FlatImageVAE",
    "conv_encoder", "conv_decoder", "check_image_shape",
]

def check_image_shape(in_shape: Sequence[int], n_levels: int) -> int:
    """Side of the smallest feature map; the image must be square and divisible by 2**n_levels."""
    _, height, width = in_shape
    if height != width or height % 2**n_levels:
        raise ValueError(f"images must be square with a side divisible by {2**n_levels}; got {height}x{width}")
    return height // 2**n_levels


def conv_encoder(in_shape: Sequence[int], out_features: int, channels: Sequence[int], act: str = "LEAKYRELU",
                 norm: str | None = "BATCH") -> Regressor:
    """Strided 3x3 convolutions halving the size at each of ``channels``, then a linear layer."""
    return Regressor(in_shape, (out_features,), channels, strides=[2] * len(channels), kernel_size=3,
                     num_res_units=0, act=act, norm=norm)


def conv_decoder(latent_size: int, out_shape: Sequence[int], channels: Sequence[int], act: str = "LEAKYRELU",
                 norm: str | None = "BATCH") -> Generator:
    """Mirror of :func:`conv_encoder`: a linear layer, then transposed convolutions doubling the size.

    ``channels`` are the encoder's; the decoder starts from ``channels[-1]`` at
    the smallest size and ends with a stride-1 convolution to ``out_shape[0]``
    channels, which smooths the checkerboard of the last strided layer.
    """
    start = check_image_shape(out_shape, len(channels))
    up = [*reversed(channels[:-1]), channels[0]]
    return Generator((latent_size,), (channels[-1], start, start), [*up, out_shape[0]], [2] * len(up) + [1],
                     kernel_size=3, num_res_units=0, act=act, norm=norm)


class ChannelStandardizer(nn.Module):
    """Per-channel mean and standard deviation of the training images, kept as buffers for checkpoints."""

    def __init__(self, n_channels: int) -> None:
        super().__init__()
        self.register_buffer("channel_mean", torch.zeros(n_channels, 1, 1))
        self.register_buffer("channel_std", torch.ones(n_channels, 1, 1))

    def fit(self, images: torch.Tensor) -> None:
        """Set the statistics from raw images (N, C, H, W) (std floored at 1e-6)."""
        self.channel_mean.copy_(images.mean(dim=(0, 2, 3)).reshape(-1, 1, 1))
        self.channel_std.copy_(images.std(dim=(0, 2, 3)).clamp_min(1e-6).reshape(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images (N, C, H, W) to standardised space."""
        return (images - self.channel_mean) / self.channel_std


class ConvEncoderModel(nn.Module):
    """What the image VAEs share: input standardisation and the Gaussian encoder q(z|x).

    Parameters
    ----------
    in_shape : (C, H, W)
        Image shape; square, side divisible by ``2 ** len(channels)``.
    latent_size : int
        Dimension of z.
    channels : sequence of int
        Encoder widths, one stride-2 level each; decoders mirror them.
    """

    def __init__(self, in_shape: Sequence[int], latent_size: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.latent_size = int(latent_size)
        self.channels = tuple(int(c) for c in channels)
        self.standardizer = ChannelStandardizer(self.in_shape[0])
        self.encoder = conv_encoder(self.in_shape, 2 * self.latent_size, self.channels)

    def standardize(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images (N, C, H, W) in [0, 1] to the model's standardised space."""
        return self.standardizer(images)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each (N, L), for standardised images (N, C, H, W)."""
        return self.encoder(x).chunk(2, dim=-1)

    def hparams(self) -> dict:
        """Constructor arguments, for rebuilding the model from a checkpoint."""
        return {"in_shape": list(self.in_shape), "latent_size": self.latent_size, "channels": list(self.channels)}


class ConvVAE(ConvEncoderModel):
    """Convolutional VAE with Gaussian encoder and per-pixel Gaussian decoder.

    Parameters
    ----------
    in_shape, latent_size, channels
        As :class:`ConvEncoderModel`.
    min_log_sigma : float
        Smooth lower bound of the decoder's log s (standardised units), so the
        likelihood cannot diverge on pixels reproduced exactly.
    """

    kind = "conv-vae"

    def __init__(self, in_shape: Sequence[int], latent_size: int = 128, channels: Sequence[int] = (32, 64, 128, 256),
                 min_log_sigma: float = -3.0) -> None:
        super().__init__(in_shape, latent_size, channels)
        self.min_log_sigma = float(min_log_sigma)
        self.decoder = conv_decoder(self.latent_size, (2 * self.in_shape[0], *self.in_shape[1:]), self.channels)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, log s) of p(x|z), each (N, C, H, W), for ``z`` of shape (N, L)."""
        mean, raw = self.decoder(z).chunk(2, dim=1)
        return mean, self.min_log_sigma + F.softplus(raw - self.min_log_sigma)

    def loss(self, x: torch.Tensor, kl_weight: float = 1.0, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negative ELBO with one latent sample: batch mean of -log p(x|z) + kl_weight KL.

        Returns the total and its reconstruction and KL parts.
        """
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        mean, log_sigma = self.decode(mu + eps * torch.exp(0.5 * logvar))
        rec = gaussian_nll(x.flatten(1), mean.flatten(1), log_sigma.flatten(1)).mean()
        kl = kl_to_standard_normal(mu, logvar).mean()
        return rec + kl_weight * kl, rec, kl

    def reconstruct_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, log s) of p(x | z = mu(x)), each (N, C, H, W): the decoder's Gaussian at the posterior mean."""
        return self.decode(self.encode(x)[0])

    def reconstruct_with_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic reconstruction m(mu(x)) and negative ELBO at z = mu(x), per image.

        L_r(x) = -log p(x | mu(x)) + KL(q(z|x) || N(0, I)), shape (N,): the
        training loss with z at the posterior mean, a smooth function of x,
        and the energy the iterative projection descends.
        """
        mu, logvar = self.encode(x)
        mean, log_sigma = self.decode(mu)
        loss = gaussian_nll(x.flatten(1), mean.flatten(1), log_sigma.flatten(1)) + kl_to_standard_normal(mu, logvar)
        return mean, loss

    def hparams(self) -> dict:
        return super().hparams() | {"min_log_sigma": self.min_log_sigma}


class FlatImageVAE(nn.Module):
    """A :class:`ConvVAE` seen as a ``GaussianVAE`` over flattened images (N, C*H*W).

    ``ScoreContext`` and every registry score apply unchanged: they call
    ``encode``/``decode`` and sum over the last axis, which is now all pixels
    of all channels.
    """

    def __init__(self, vae: ConvVAE) -> None:
        super().__init__()
        self.vae = vae
        self.in_shape = vae.in_shape
        self.latent_size = vae.latent_size
        #: D = C*H*W, the "features" of a flattened image (as ``GaussianVAE.in_channels``).
        self.in_channels = int(torch.Size(vae.in_shape).numel())

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        """Flattened raw images (N, D) to flattened standardised images."""
        return self.vae.standardize(raw.reshape(-1, *self.in_shape)).flatten(1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x) for flattened standardised images (N, D)."""
        return self.vae.encode(x.reshape(-1, *self.in_shape))

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, log s), each (..., D), for ``z`` of shape (..., L)."""
        lead = z.shape[:-1]
        mean, log_sigma = self.vae.decode(z.reshape(-1, self.latent_size))
        return mean.reshape(*lead, -1), log_sigma.reshape(*lead, -1)
