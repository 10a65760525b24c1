"""Kernel-density scores against the healthy reference set Y (higher = more novel).

Each density is the mean of one Gaussian kernel per reference sample,
evaluated in log space (log-sum-exp over Y): exact up to a relative error below
exp(-20), see :func:`anomri.scores.search.exact_logsumexp`. The ``-density``
scores are -exp of the ``-logdensity`` ones and saturate at the float32 range
(densities of 100-dimensional Gaussians easily exceed it); rank by
``-logdensity`` when that matters. Density and log-density of one kind share
one computation per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from anomri.scores.context import ScoreContext
from anomri.scores.indexes import GaussianKernelIndex
from anomri.scores.reference import ReferenceSet
from anomri.scores.registry import register_score


def _latent_kernels(ref: ReferenceSet) -> GaussianKernelIndex:
    return GaussianKernelIndex(ref.mu, 0.5 * ref.logvar)


def _output_kernels(ref: ReferenceSet) -> GaussianKernelIndex:
    return GaussianKernelIndex(ref.recon_mean, ref.recon_log_sigma)


#: Kernels of each density: q(z|y) in latent space, p(x|mu(y)) in feature space.
_KERNELS: dict[str, Callable[[ReferenceSet], GaussianKernelIndex]] = {
    "latent-kernels": _latent_kernels,
    "output-kernels": _output_kernels,
}


def _log_mean_kernel(ctx: ScoreContext, space: str, kernels: str, queries: Callable[[], torch.Tensor]) -> torch.Tensor:
    """log (1/|Y|) sum_y kernel_y(query), float64, computed once per batch for each ``space``."""

    def compute() -> torch.Tensor:
        reference = ctx.reference_set
        return reference.index(kernels, _KERNELS[kernels]).log_sum(queries()) - math.log(len(reference))

    return ctx.shared(f"{space}-log-density", compute)


def _negative_density(log_density: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    finite = torch.finfo(dtype).max
    return (-torch.exp(log_density)).clamp(min=-finite).to(dtype)


def _latent_log_density(ctx: ScoreContext) -> torch.Tensor:
    return _log_mean_kernel(ctx, "latent", "latent-kernels", lambda: ctx.mu)


def _output_log_density(ctx: ScoreContext) -> torch.Tensor:
    return _log_mean_kernel(ctx, "output", "output-kernels", lambda: ctx.reconstruction[0])


def _input_log_density(ctx: ScoreContext) -> torch.Tensor:
    return _log_mean_kernel(ctx, "input", "output-kernels", lambda: ctx.x)


@register_score("latent-density", "-q_Y(mu(x)), q_Y(z) = (1/|Y|) sum_y q(z|y)", needs_reference=True)
def latent_density(ctx: ScoreContext) -> torch.Tensor:
    """Negative latent density of the reference set's aggregate posterior.

    s(x) = -q_Y(mu(x)), q_Y(z) = (1/|Y|) sum_{y in Y} N(z; mu(y), diag sigma^2(y)).
    Higher = more novel.
    """
    return _negative_density(_latent_log_density(ctx), ctx.x.dtype)


@register_score("latent-logdensity", "-log q_Y(mu(x)), q_Y(z) = (1/|Y|) sum_y q(z|y)", needs_reference=True)
def latent_log_density(ctx: ScoreContext) -> torch.Tensor:
    """Negative latent log-density.

    s(x) = -log q_Y(mu(x)) = log|Y| - log sum_{y in Y} N(mu(x); mu(y), diag sigma^2(y)),
    computed by log-sum-exp. Higher = more novel.
    """
    return (-_latent_log_density(ctx)).to(ctx.x.dtype)


@register_score("output-density", "-p_Y(m(mu(x))), p_Y(x) = (1/|Y|) sum_y p(x|mu(y))", needs_reference=True)
def output_density(ctx: ScoreContext) -> torch.Tensor:
    """Negative output-space density at the reconstruction.

    s(x) = -p_Y(m(mu(x))), p_Y(v) = (1/|Y|) sum_{y in Y} N(v; m(mu(y)), diag s^2(mu(y))).
    Higher = more novel.
    """
    return _negative_density(_output_log_density(ctx), ctx.x.dtype)


@register_score("output-logdensity", "-log p_Y(m(mu(x))), p_Y(x) = (1/|Y|) sum_y p(x|mu(y))", needs_reference=True)
def output_log_density(ctx: ScoreContext) -> torch.Tensor:
    """Negative output-space log-density at the reconstruction.

    s(x) = -log p_Y(m(mu(x))), computed by log-sum-exp. Higher = more novel.
    """
    return (-_output_log_density(ctx)).to(ctx.x.dtype)


@register_score("input-density", "-p_Y(x), p_Y(x) = (1/|Y|) sum_y p(x|mu(y))", needs_reference=True)
def input_density(ctx: ScoreContext) -> torch.Tensor:
    """Negative density of the input under the reference set's decoder mixture.

    s(x) = -p_Y(x), p_Y(x) = (1/|Y|) sum_{y in Y} N(x; m(mu(y)), diag s^2(mu(y))).
    Higher = more novel.
    """
    return _negative_density(_input_log_density(ctx), ctx.x.dtype)


@register_score("input-logdensity", "-log p_Y(x), p_Y(x) = (1/|Y|) sum_y p(x|mu(y))", needs_reference=True)
def input_log_density(ctx: ScoreContext) -> torch.Tensor:
    """Negative log-density of the input under the reference set's decoder mixture.

    s(x) = -log p_Y(x), computed by log-sum-exp. Higher = more novel.
    """
    return (-_input_log_density(ctx)).to(ctx.x.dtype)
