"""Multiple-hypotheses VAE (Nguyen et al. 2019, "Anomaly detection with multiple-hypotheses predictions").

One encoder q(z|x), one decoder trunk and H heads, each predicting an image
x̂_h(z). Training:

* **Winner-takes-all reconstruction**: per image, only the best hypothesis
  w = argmin_h ||x - x̂_h||^2 is pulled towards x, so the heads specialise on
  different modes of normal data instead of averaging them into a blur.
  Pure WTA can leave a head that never wins untrained for good (a *dead*
  head). We use the relaxed WTA of Rupprecht et al. (2017): the winner gets
  weight 1 - epsilon and every other head epsilon / (H - 1), so no head is
  ever skipped; ``wta_epsilon = 0`` gives pure WTA.
* **Discriminator** D sees real images (label real) and, as fakes, the best
  guess, the other hypotheses and hypotheses decoded from z ~ N(0, I), so all
  heads must produce plausible images, not only the winner.
* **Generator loss** = L_WTA + beta KL(q(z|x) || N(0, I)) - w_adv L_D(fakes).

Anomaly score: the WTA loss min_h ||x - x̂_h(mu(x))||^2 (pure minimum, at
the posterior mean); pixel map: the best hypothesis's squared residual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn import functional as F

from anomri.models.conv_vae import ConvEncoderModel, conv_decoder, conv_encoder
from anomri.models.gaussian import kl_to_standard_normal

__all__ = ["MultiHypothesisVAE", "WTAResult", "winner_takes_all"]


@dataclass
class WTAResult:
    """Winner-takes-all reconstruction of a batch.

    Attributes
    ----------
    loss : Tensor (N,)
        Weighted sum of the heads' squared errors (the training loss).
    best_error : Tensor (N,)
        min_h ||x - x̂_h||^2 (the anomaly score).
    winner : Tensor (N,) of int
        Index of the best hypothesis.
    """

    loss: torch.Tensor
    best_error: torch.Tensor
    winner: torch.Tensor


def winner_takes_all(x: torch.Tensor, hypotheses: torch.Tensor, epsilon: float = 0.0) -> WTAResult:
    """Relaxed WTA loss of hypotheses (N, H, C, S, S) for images x (N, C, S, S).

    loss = sum_h w_h ||x - x̂_h||^2 with w_winner = 1 - epsilon and
    w_other = epsilon / (H - 1). With ``epsilon = 0`` the gradient reaches
    only the winning head.
    """
    errors = ((hypotheses - x.unsqueeze(1)) ** 2).flatten(2).sum(-1)  # (N, H)
    best_error, winner = errors.min(dim=1)
    n_heads = errors.shape[1]
    one_hot = F.one_hot(winner, n_heads).to(errors.dtype)
    other = epsilon / (n_heads - 1) if n_heads > 1 else 0.0
    weights = one_hot * (1.0 - epsilon) + (1.0 - one_hot) * other
    return WTAResult((weights * errors).sum(-1), best_error, winner)


class MultiHypothesisVAE(ConvEncoderModel):
    """Conv VAE with ``n_hypotheses`` decoder heads and a discriminator.

    Parameters
    ----------
    in_shape, latent_size, channels
        As :class:`~anomri.models.conv_vae.ConvEncoderModel`; ``channels`` are
        also the discriminator's widths.
    n_hypotheses : int
        H, the number of heads.
    """

    kind = "mhp-vae"

    def __init__(self, in_shape: Sequence[int], latent_size: int = 128, channels: Sequence[int] = (32, 64, 128, 256),
                 n_hypotheses: int = 4) -> None:
        super().__init__(in_shape, latent_size, channels)
        self.n_hypotheses = int(n_hypotheses)
        n_channels, width = self.in_shape[0], self.channels[0]
        self.trunk = conv_decoder(self.latent_size, (width, *self.in_shape[1:]), self.channels)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LeakyReLU(), Convolution(2, width, n_channels, kernel_size=3, conv_only=True))
            for _ in range(self.n_hypotheses)
        )
        self.discriminator = conv_encoder(self.in_shape, 1, self.channels)

    def hypotheses(self, z: torch.Tensor) -> torch.Tensor:
        """All heads' images for ``z`` (N, L): (N, H, C, S, S)."""
        features = self.trunk(z)
        return torch.stack([head(features) for head in self.heads], dim=1)

    def generator_parameters(self) -> list[nn.Parameter]:
        """Encoder, trunk and head weights: what the generator optimiser updates."""
        return [p for name, p in self.named_parameters() if not name.startswith("discriminator.")]

    def _d_loss(self, x: torch.Tensor, fakes: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss on the real images, mean loss over the groups of fakes), batch means."""
        real_logits = self.discriminator(x).squeeze(-1)
        real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        fake_loss = torch.zeros((), device=x.device)
        for group in fakes:
            logits = self.discriminator(group).squeeze(-1)
            fake_loss = fake_loss + F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)) / len(fakes)
        return real_loss, fake_loss

    def losses(self, x: torch.Tensor, kl_weight: float = 1.0, adversarial_weight: float = 1.0,
               wta_epsilon: float = 0.05, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The training losses of one batch of standardised images.

        The discriminator's fakes are three batches as large as ``x``: each
        image's best hypothesis, one of its other hypotheses drawn at random
        (an unbiased sample of "the other hypotheses" at a third of the cost of
        all of them), and a random head decoded from z ~ N(0, I).

        Returns
        -------
        dict
            ``generator``: L_WTA + beta KL - w_adv L_D(fakes), to be
            differentiated w.r.t. :meth:`generator_parameters` only;
            ``discriminator``: L_D on real and fake images, to be
            differentiated w.r.t. the discriminator only (one forward pass
            serves both players); and the parts ``wta``, ``kl``, ``d_real``,
            ``d_fake`` for logging. Batch means.
        """
        n, device = len(x), x.device
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype)
        hyps = self.hypotheses(mu + eps * torch.exp(0.5 * logvar))
        wta = winner_takes_all(x, hyps, wta_epsilon)
        kl = kl_to_standard_normal(mu, logvar).mean()
        rows = torch.arange(n, device=device)
        fakes = [hyps[rows, wta.winner]]
        if self.n_hypotheses > 1:
            shift = torch.randint(1, self.n_hypotheses, (n,), generator=generator, device=device)
            fakes.append(hyps[rows, (wta.winner + shift) % self.n_hypotheses])
        prior = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype)
        head = torch.randint(0, self.n_hypotheses, (n,), generator=generator, device=device)
        fakes.append(self.hypotheses(prior)[rows, head])
        d_real, d_fake = self._d_loss(x, tuple(fakes))
        wta_loss = wta.loss.mean()
        return {
            "generator": wta_loss + kl_weight * kl - adversarial_weight * d_fake,
            "discriminator": d_real + d_fake,
            "wta": wta_loss, "kl": kl, "d_real": d_real, "d_fake": d_fake,
        }

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly score min_h ||x - x̂_h(mu(x))||^2 (N,) and the best hypothesis's residual map (N, S, S)."""
        hyps = self.hypotheses(self.encode(x)[0])
        wta = winner_takes_all(x, hyps)
        best = hyps[torch.arange(len(x), device=x.device), wta.winner]
        return wta.best_error, ((x - best) ** 2).sum(1)

    def hparams(self) -> dict:
        return super().hparams() | {"n_hypotheses": self.n_hypotheses}
