"""Lazily computed model outputs shared by all scores of one batch of voxels."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from anomri.models.gaussian import gaussian_nll
from anomri.scores.reference import ReferenceSet

if TYPE_CHECKING:  # the registry imports this module; MONAI would cost every command with --scores seconds
    from anomri.models.vae import GaussianVAE


class ScoreContext:
    """Model outputs for a batch of standardised samples, computed once and shared.

    Parameters
    ----------
    model : GaussianVAE
        Trained model in eval mode.
    x : Tensor
        Standardised samples, shape (N, D), on the model's device.
    n_samples : int
        Number of Monte Carlo samples for stochastic scores.
    generator : torch.Generator
        Seeded generator for the Monte Carlo samples (determinism).
    reference : object, optional
        Cached encoder/decoder outputs of the healthy reference set Y, for the
        scores with ``needs_reference``.
    """

    def __init__(
        self,
        model: GaussianVAE,
        x: torch.Tensor,
        n_samples: int,
        generator: torch.Generator,
        reference: object | None = None,
    ) -> None:
        self.model = model
        self.x = x
        self.n_samples = int(n_samples)
        self.generator = generator
        self.reference = reference
        self._shared: dict[str, torch.Tensor] = {}

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal draws from the context's seeded generator."""
        return torch.randn(shape, generator=self.generator, device=self.x.device, dtype=self.x.dtype)

    @cached_property
    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu(x), logvar(x)) of q(z|x), each (N, L)."""
        return self.model.encode(self.x)

    @property
    def mu(self) -> torch.Tensor:
        return self.posterior[0]

    @property
    def logvar(self) -> torch.Tensor:
        return self.posterior[1]

    @cached_property
    def reconstruction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m(mu(x)), log s(mu(x))): the decoder at the posterior mean, each (N, D)."""
        return self.model.decode(self.mu)

    @cached_property
    def latent_samples(self) -> torch.Tensor:
        """z_i ~ q(z|x), shape (S, N, L)."""
        eps = self.randn(self.n_samples, *self.mu.shape)
        return self.mu + eps * torch.exp(0.5 * self.logvar)

    @cached_property
    def sample_decodings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m(z_i), log s(z_i)) for the latent samples, each (S, N, D)."""
        return self.model.decode(self.latent_samples)

    def stream_randn(self, stream: str, *shape: int) -> torch.Tensor:
        """Standard normal draws from a generator of their own, seeded from the context's seed and ``stream``.

        Unlike :meth:`randn`, these draws do not depend on which other scores
        drew before, so a score's map does not change with the score selection.
        """
        seed = (self.generator.initial_seed() * 1_000_003 + zlib.crc32(stream.encode())) % 2**63
        generator = torch.Generator(device=self.x.device).manual_seed(seed)
        return torch.randn(shape, generator=generator, device=self.x.device, dtype=self.x.dtype)

    @cached_property
    def sample_nll(self) -> torch.Tensor:
        """-log p(x|z_i) for the latent samples z_i ~ q(z|x), shape (S, N)."""
        return gaussian_nll(self.x, *self.sample_decodings)

    @cached_property
    def decoder_samples(self) -> torch.Tensor:
        """x_i ~ p(x|mu(x)), shape (S, N, D)."""
        mean, log_sigma = self.reconstruction
        return mean + self.stream_randn("decoder-samples", self.n_samples, *mean.shape) * torch.exp(log_sigma)

    @cached_property
    def full_samples(self) -> torch.Tensor:
        """x_i ~ p(x|z_i) with z_i ~ q(z|x) (the latent samples), shape (S, N, D)."""
        mean, log_sigma = self.sample_decodings
        return mean + self.stream_randn("full-samples", *mean.shape) * torch.exp(log_sigma)

    @cached_property
    def reference_set(self) -> ReferenceSet:
        """The reference set, checked to be a ``ReferenceSet`` built with this model."""
        if not isinstance(self.reference, ReferenceSet):
            raise ValueError(f"reference scores need a ReferenceSet; got {type(self.reference).__name__}")
        if self.reference.device != self.x.device:
            raise ValueError(f"the reference set is on {self.reference.device} but the samples on {self.x.device}; "
                             "load it with ReferenceSet.load(path, device=...) on the scoring device")
        self.reference.check_model(self.model)
        return self.reference

    def shared(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, evaluated once per context and shared by the scores asking for ``key``."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]
