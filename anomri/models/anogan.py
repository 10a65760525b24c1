"""AnoGAN (Schlegl et al. 2017): a DCGAN of normal images and a latent search at test time.

Training is a DCGAN on normal images (or patches), with two standard
stabilisers that matter on small training sets: a resize-convolution
generator (no checkerboard) and one-sided label smoothing. At test time each
image x gets the latent z whose generated image G(z) is closest to it:

    L(z) = (1 - lambda) ||x - G(z)||_1 + lambda ||f_D(x) - f_D(G(z))||_1

minimised over gamma Adam steps from a random start, f_D an intermediate
discriminator layer (the output of its convolution stack), lambda = 0.1. The
anomaly score is A(x) = (1 - lambda) R(x) + lambda D(x), the two terms at
z_gamma, and the pixel map |x - G(z_gamma)|.

The search runs **batched over all test images at once**: with both networks
in eval mode (batch-norm statistics frozen) images do not interact, and Adam
updates each coordinate of z from its own gradient only, so every image
follows exactly the trajectory it would follow alone. The gain is the
accelerator's: one 128 px image leaves a GPU nearly idle, while on a CPU it
already keeps a core busy, so there batching saves at most a few-fold (and a
whole test set in one batch can be slower than moderate chunks, for memory
traffic); ``anogan_search_batch_size`` sets the chunk, by default 16 images
on a CPU and 512 on a GPU (``benchmarks/bench_anogan.py``, ``benchmarks/README.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import trange

from monai.networks.blocks import Convolution
from monai.networks.layers import Reshape

from anomri.models.conv_vae import check_image_shape

logger = logging.getLogger(__name__)

__all__ = ["DCGAN", "DCGANDiscriminator", "LatentSearchResult", "dcgan_generator", "latent_search"]


#: DCGAN's leaky ReLU slope (MONAI's default is 0.01).
LEAKY_RELU = ("LEAKYRELU", {"negative_slope": 0.2})
#: Target of real images for the discriminator (one-sided label smoothing).
REAL_LABEL = 0.9


def _down(in_channels: int, out_channels: int, norm: str | None) -> Convolution:
    # DCGAN's 4x4 kernels with stride 2, which tile the input evenly.
    return Convolution(2, in_channels, out_channels, strides=2, kernel_size=4, padding=1, act=LEAKY_RELU, norm=norm)


def dcgan_generator(latent_size: int, out_shape: Sequence[int], channels: Sequence[int]) -> nn.Sequential:
    """DCGAN generator: linear projection to the smallest feature map, then blocks of nearest-neighbour
    upsampling and 3x3 convolution with batch norm and ReLU, doubling the size up to ``out_shape``, and tanh.

    Resize-convolution instead of DCGAN's transposed convolutions: these print a checkerboard on
    every early sample (Odena et al. 2016), which lets the discriminator win within a few hundred
    steps on a small training set before the generator has learnt anything.
    """
    start = check_image_shape(out_shape, len(channels))
    layers: list[nn.Module] = [nn.Linear(latent_size, channels[-1] * start * start),
                               Reshape(channels[-1], start, start), nn.BatchNorm2d(channels[-1]), nn.ReLU()]
    widths = [*reversed(channels[:-1]), channels[0]]
    for c_in, c_out in zip([channels[-1], *widths[:-1]], widths):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                   Convolution(2, c_in, c_out, kernel_size=3, act="RELU", norm="BATCH")]
    layers.append(Convolution(2, widths[-1], out_shape[0], kernel_size=3, conv_only=True))
    return nn.Sequential(*layers, nn.Tanh())


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: 4x4 stride-2 convolutions with leaky ReLU (batch norm after the first), then a
    linear logit. ``features`` is the output of the last convolution, AnoGAN's f_D."""

    def __init__(self, in_shape: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        side = check_image_shape(in_shape, len(channels))
        self.features = nn.Sequential(*[
            _down(c_in, c_out, None if i == 0 else "BATCH")
            for i, (c_in, c_out) in enumerate(zip([in_shape[0], *channels[:-1]], channels))
        ])
        self.logit = nn.Linear(channels[-1] * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(self.features(x).flatten(1)).squeeze(-1)


class DCGAN(nn.Module):
    """Generator and discriminator of a DCGAN on images scaled to [-1, 1].

    Parameters
    ----------
    in_shape : (C, H, W)
        Image shape; square, side divisible by ``2 ** len(channels)``.
    latent_size : int
        Dimension of z ~ N(0, I).
    channels : sequence of int
        Discriminator widths, one stride-2 level each; the generator mirrors them.
    """

    kind = "anogan"

    def __init__(self, in_shape: Sequence[int], latent_size: int = 64, channels: Sequence[int] = (32, 64, 128, 256)
                 ) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.latent_size = int(latent_size)
        self.channels = tuple(int(c) for c in channels)
        self.generator = dcgan_generator(self.latent_size, self.in_shape, self.channels)
        self.discriminator = DCGANDiscriminator(self.in_shape, self.channels)

    @staticmethod
    def scale(images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to the generator's range [-1, 1]."""
        return 2.0 * images - 1.0

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """G(z), (N, C, H, W) in [-1, 1]."""
        return self.generator(z)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f_D(x): the discriminator's last convolutional feature map, flattened to (N, F)."""
        return self.discriminator.features(x).flatten(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Discriminator logit, (N,): high = judged real."""
        return self.discriminator(x)

    def discriminator_loss(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of telling real images from G(z) (G not updated).

        Real images are labelled 0.9, not 1 (one-sided label smoothing, Salimans et al. 2016), so an
        over-confident discriminator cannot starve the generator of gradient.
        """
        real_logits = self.logits(real)
        fake_logits = self.logits(self.generate(z).detach())
        return (F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, REAL_LABEL))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    def generator_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Non-saturating generator loss -log D(G(z))."""
        fake_logits = self.logits(self.generate(z))
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))

    def hparams(self) -> dict:
        """Constructor arguments, for rebuilding the model from a checkpoint."""
        return {"in_shape": list(self.in_shape), "latent_size": self.latent_size, "channels": list(self.channels)}


@dataclass
class LatentSearchResult:
    """Outcome of :func:`latent_search`; per image unless stated.

    Attributes
    ----------
    z : Tensor (N, L)
        z_gamma.
    residual : Tensor (N,)
        R(x) = ||x - G(z_gamma)||_1.
    discrimination : Tensor (N,)
        D(x) = ||f_D(x) - f_D(G(z_gamma))||_1.
    score : Tensor (N,)
        A(x) = (1 - lambda) R(x) + lambda D(x).
    generated : Tensor (N, C, H, W)
        G(z_gamma).
    """

    z: torch.Tensor
    residual: torch.Tensor
    discrimination: torch.Tensor
    score: torch.Tensor
    generated: torch.Tensor

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel map |x - G(z_gamma)| summed over channels, (N, H, W), for the searched images ``x``."""
        return (x - self.generated).abs().sum(1)


def _search_losses(gan: DCGAN, x: torch.Tensor, x_features: torch.Tensor, z: torch.Tensor, weight: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, R, D, G(z)) per image, with A = (1 - weight) R + weight D."""
    generated = gan.generate(z)
    residual = (x - generated).abs().flatten(1).sum(-1)
    discrimination = (x_features - gan.features(generated)).abs().sum(-1)
    return torch.lerp(residual, discrimination, weight), residual, discrimination, generated


def latent_search(
    gan: DCGAN,
    x: torch.Tensor,
    steps: int = 300,
    weight: float = 0.1,
    learning_rate: float = 0.02,
    z0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> LatentSearchResult:
    """Find z_gamma for every image of ``x`` at once.

    Each step differentiates the summed loss with respect to z only
    (``torch.autograd.grad``), so no gradient of the networks' weights is
    computed or stored: about a third less work per step than
    ``loss.backward()``, which would also fill the weights' ``.grad``. The
    features of ``x`` and the final scores are computed under
    ``torch.inference_mode``.

    Parameters
    ----------
    gan : DCGAN
        Trained model; put in eval mode here, its weights untouched.
    x : Tensor (N, C, H, W)
        Images scaled to [-1, 1] (:meth:`DCGAN.scale`).
    steps : int
        gamma, the number of Adam steps.
    weight : float
        lambda, the weight of the discrimination loss.
    learning_rate : float
        Adam step size on z.
    z0 : Tensor (N, L), optional
        Starting latents; drawn from N(0, I) with ``generator`` when omitted.
    generator : torch.Generator, optional
        Seeds the starting latents.
    progress : bool
        Show a progress bar.
    """
    gan.eval()
    if z0 is None:
        z0 = torch.randn((len(x), gan.latent_size), generator=generator, device=x.device, dtype=x.dtype)
    z = z0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=learning_rate)
    with torch.inference_mode():
        x_features = gan.features(x)
    # An inference tensor cannot be saved for backward; a plain copy, made once, can.
    x_features = x_features.clone()
    with torch.enable_grad():
        for _ in trange(steps, desc="latent search", unit="step", disable=not progress):
            loss = _search_losses(gan, x, x_features, z, weight)[0]
            # The sum, not the mean: each image's gradient is then exactly its own loss's gradient.
            (z.grad,) = torch.autograd.grad(loss.sum(), z)
            optimizer.step()
    with torch.inference_mode():
        score, residual, discrimination, generated = _search_losses(gan, x, x_features, z.detach(), weight)
    return LatentSearchResult(z.detach(), residual, discrimination, score, generated)
