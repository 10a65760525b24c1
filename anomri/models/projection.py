"""Iterative energy-based projection onto the normal-data manifold (Dehaene et al. 2020).

An anomalous image x_0 is moved, pixel by pixel, towards an image the model
explains well while staying close to x_0:

    E(x) = L_r(x) + lambda * ||x - x_0||_1
    x_{t+1} = x_t - alpha * (grad_x E(x_t) ⊙ (x_t - f(x_t))^2)

L_r is the model's reconstruction loss and f its reconstruction. The weight
(x_t - f(x_t))^2 concentrates the update on the pixels the model cannot
explain, so normal pixels barely move and |x_T - x_0| is a sharp anomaly map.
The gradient is recomputed at every step with the model in eval mode.
Any model with ``reconstruct_with_loss(x) -> (f(x), L_r(x))`` works: the
conv VAE (its deterministic negative ELBO) or a plain autoencoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import trange

logger = logging.getLogger(__name__)

__all__ = ["Reconstructor", "ProjectionResult", "energy", "project", "projection_map"]


class Reconstructor(Protocol):
    """What the projection needs from a model (inputs in its standardised space, (N, C, H, W))."""

    def eval(self) -> Reconstructor: ...

    def reconstruct_with_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x), same shape as x, and L_r(x), shape (N,)."""


@dataclass
class ProjectionResult:
    """Outcome of :func:`project`.

    Attributes
    ----------
    projected : Tensor (N, C, H, W)
        x_T.
    energies : Tensor (T + 1, N)
        E(x_t) after each step t = 0 .. T; an image that stopped keeps its last value.
    steps_taken : Tensor (N,)
        Accepted updates of each image.
    """

    projected: torch.Tensor
    energies: torch.Tensor
    steps_taken: torch.Tensor


def energy(model: Reconstructor, x: torch.Tensor, x0: torch.Tensor, l1_weight: float) -> torch.Tensor:
    """E(x) = L_r(x) + lambda ||x - x_0||_1 per image, shape (N,)."""
    return model.reconstruct_with_loss(x)[1] + l1_weight * (x - x0).abs().flatten(1).sum(-1)


def project(
    model: Reconstructor,
    x0: torch.Tensor,
    steps: int = 100,
    step_size: float = 1e-3,
    l1_weight: float = 1.0,
    tolerance: float = 1e-4,
    progress: bool = False,
) -> ProjectionResult:
    """Project images ``x0`` (standardised, (N, C, H, W)) onto the model's normal manifold.

    Each step is the update of Dehaene et al. with a safeguard they do not
    have: a step that would raise an image's energy (or make it non-finite)
    is rejected and that image's step size halved. A fixed step size that
    suits one model or data set can diverge on another (the gradient of a
    Gaussian likelihood scales with 1/sigma^2); with the safeguard E never
    increases, and images whose step size collapses (by 2^-20) stop.

    Parameters
    ----------
    model : Reconstructor
        Put in eval mode here; its parameters are not changed.
    x0 : Tensor
        Starting images, also the anchor of the L1 term.
    steps : int
        Maximum number of updates (accepted or rejected).
    step_size : float
        alpha, each image's initial step size.
    l1_weight : float
        lambda, the pull towards x_0.
    tolerance : float
        An image stops once an accepted step lowers its energy by less than
        ``tolerance * |E|`` (relative); the others go on.
    progress : bool
        Show a progress bar.
    """
    model.eval()
    x0 = x0.detach()
    x = x0.clone()
    n = len(x0)
    active = torch.ones(n, dtype=torch.bool, device=x0.device)
    steps_taken = torch.zeros(n, dtype=torch.long, device=x0.device)
    alpha = torch.full((n,), float(step_size), device=x0.device, dtype=x0.dtype)
    with torch.enable_grad():
        e, grad, weight = _energy_and_grad(model, x, x0, l1_weight)
    history = [e.clone()]
    for _ in trange(steps, desc="projection", unit="step", disable=not progress):
        idx = active.nonzero().squeeze(1)
        trial = x[idx] - alpha[idx].view(-1, *[1] * (x.dim() - 1)) * grad[idx] * weight[idx]
        with torch.enable_grad():
            e_new, grad_new, weight_new = _energy_and_grad(model, trial, x0[idx], l1_weight)
        accepted = torch.isfinite(e_new) & (e_new <= e[idx])
        converged = accepted & ((e[idx] - e_new) <= tolerance * e[idx].abs())
        good = idx[accepted]
        x[good], e[good], grad[good], weight[good] = trial[accepted], e_new[accepted], grad_new[accepted], \
            weight_new[accepted]
        steps_taken[good] += 1
        alpha[idx[~accepted]] *= 0.5
        active[idx[converged]] = False
        active &= alpha > step_size * 2.0**-20
        history.append(e.clone())
        if not active.any():
            break
    logger.debug("projection: %d of %d images stopped early", int((~active).sum()), n)
    return ProjectionResult(x.detach(), torch.stack(history), steps_taken)


def _energy_and_grad(model: Reconstructor, x: torch.Tensor, x0: torch.Tensor, l1_weight: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E(x), its steepest-descent (minimum-norm) subgradient and the update weight (x - f(x))^2.

    Where x = x_0 the L1 term is not differentiable; autograd would take 0
    there, so the first step would ignore the pull towards x_0 and could
    raise E. The minimum-norm subgradient soft-thresholds the reconstruction
    gradient instead: a pixel leaves x_0 only where the model's gradient
    exceeds lambda, which keeps every small enough step a descent step.
    """
    x = x.detach().requires_grad_(True)
    reconstruction, loss = model.reconstruct_with_loss(x)
    # Images are independent in eval mode, so the gradient of the sum is each image's own gradient.
    (grad,) = torch.autograd.grad(loss.sum(), x)
    diff = x.detach() - x0
    soft = torch.sign(grad) * (grad.abs() - l1_weight).clamp_min(0.0)
    grad = torch.where(diff == 0, soft, grad + l1_weight * torch.sign(diff))
    weight = (x.detach() - reconstruction.detach()) ** 2
    return loss.detach() + l1_weight * diff.abs().flatten(1).sum(-1), grad, weight


@torch.no_grad()
def projection_map(model: Reconstructor, x0: torch.Tensor, projected: torch.Tensor, kind: str = "residual"
                   ) -> torch.Tensor:
    """Pixel anomaly map (N, H, W) after projection, summed over channels.

    ``kind="standardized"``: ((x_0 - m(x_T)) / s(x_T))^2, the input's squared
    error against the decoder's Gaussian at its projected, normal-looking
    version, in units of the standard deviation the decoder predicts there.
    Where the model expects texture it cannot reproduce (a large s), the same
    error counts less than where it expects a smooth surface. Needs a model
    with a Gaussian decoder (``reconstruct_distribution``, as the conv VAE).
    ``kind="residual"``: |x_T - x_0|, what the projection had to change.
    ``kind="reconstruction"``: |x_0 - f(x_T)|, the input's error against the
    reconstruction of its projected version.
    """
    if kind == "standardized":
        if not hasattr(model, "reconstruct_distribution"):
            raise ValueError("projection map 'standardized' needs a model with a Gaussian decoder "
                             "(reconstruct_distribution); use 'residual' or 'reconstruction'")
        mean, log_sigma = model.reconstruct_distribution(projected)
        return ((x0 - mean) * torch.exp(-log_sigma)).square().sum(1)
    if kind == "residual":
        diff = projected - x0
    elif kind == "reconstruction":
        diff = x0 - model.reconstruct_with_loss(projected)[0]
    else:
        raise ValueError(f"projection map must be 'standardized', 'residual' or 'reconstruction'; got {kind!r}")
    return diff.abs().sum(1)
