"""Per-pixel terms of the registry's reconstruction scores: anomaly maps of image models.

Evaluated on a :class:`PixelwiseContext` that wraps the :class:`~anomri.scores.context.ScoreContext`
of a :class:`~anomri.models.conv_vae.FlatImageVAE`, a score of :data:`PIXELWISE_SCORES` returns
its per-pixel terms, which add up to the image score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from anomri.models.gaussian import gaussian_nll
from anomri.scores.context import ScoreContext

__all__ = ["PIXELWISE_SCORES", "PixelwiseContext"]

#: Registry scores that are a sum over pixels of a per-pixel term (possibly averaged over Monte Carlo
#: samples), so their terms form an anomaly map. Minima over samples and KL terms are not.
PIXELWISE_SCORES = ("det-rec-err", "det-rec-lik", "enc-stoch-rec-err", "enc-stoch-rec-lik", "dec-stoch-rec-err",
                    "full-stoch-rec-err")


class PixelwiseContext:
    """A :class:`ScoreContext` whose per-pixel tensors carry a trailing singleton axis.

    A score of :data:`PIXELWISE_SCORES` sums a per-pixel term over the last
    axis (and averages over Monte Carlo samples); evaluated on this view it
    returns the un-summed terms, shape (N, D), which add up exactly to the
    image score of the wrapped context: the same cached posterior and Monte
    Carlo draws are reused.
    """

    def __init__(self, ctx: ScoreContext) -> None:
        self._ctx = ctx
        self._shared: dict[str, torch.Tensor] = {}
        self.model = ctx.model
        self.n_samples = ctx.n_samples
        self.generator = ctx.generator
        self.reference = ctx.reference
        self.x = ctx.x.unsqueeze(-1)

    def randn(self, *shape: int) -> torch.Tensor:
        return self._ctx.randn(*shape)

    def stream_randn(self, stream: str, *shape: int) -> torch.Tensor:
        return self._ctx.stream_randn(stream, *shape)

    def shared(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Its own cache: the wrapped context's entries are already summed over pixels.
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    @property
    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._ctx.posterior

    @property
    def mu(self) -> torch.Tensor:
        return self._ctx.mu

    @property
    def logvar(self) -> torch.Tensor:
        return self._ctx.logvar

    @property
    def latent_samples(self) -> torch.Tensor:
        return self._ctx.latent_samples

    @property
    def reference_set(self) -> object:
        return self._ctx.reference_set

    @property
    def reconstruction(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.unsqueeze(-1) for t in self._ctx.reconstruction)

    @property
    def sample_decodings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.unsqueeze(-1) for t in self._ctx.sample_decodings)

    @property
    def decoder_samples(self) -> torch.Tensor:
        return self._ctx.decoder_samples.unsqueeze(-1)

    @property
    def full_samples(self) -> torch.Tensor:
        return self._ctx.full_samples.unsqueeze(-1)

    @property
    def sample_nll(self) -> torch.Tensor:
        """Per-pixel -log p(x|z_i), shape (S, N, D)."""
        return gaussian_nll(self.x, *self.sample_decodings)
