"""The healthy reference set Y and the VAE's outputs on it, computed once per model.

Build it once per trained model, save it, and hand it to ``NoveltyModel``::

    reference = ReferenceSet.build(vae, healthy_samples, batch_size=8192, device="cpu")
    reference.save("reference.pt")
    ...
    reference = ReferenceSet.load("reference.pt", device="cpu")
    NoveltyModel(vae, scores="all", reference=reference)

The search structures of the reference scores (KD-trees, norms) are built
lazily from these tensors, once per ``ReferenceSet`` object, by
:meth:`ReferenceSet.index`.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from anomri.errors import InputError
from anomri.io.atomic import atomic_path
from anomri.io.derivatives import ScanDerivatives
from anomri.settings import default

if TYPE_CHECKING:
    from anomri.models.vae import GaussianVAE

logger = logging.getLogger(__name__)

__all__ = ["ReferenceSet", "build_reference_set"]

T = TypeVar("T")

#: Saved tensors, each with M rows: Y, then q(z|y) = N(mu, diag exp(logvar)),
#: then p(x|mu(y)) = N(recon_mean, diag exp(recon_log_sigma)^2).
_FIELDS = ("x", "mu", "logvar", "recon_mean", "recon_log_sigma")


class ReferenceSet:
    """Standardised healthy samples Y with q(z|y) and p(x|mu(y)).

    Parameters
    ----------
    x : Tensor
        Standardised reference samples Y, shape (M, D).
    mu, logvar : Tensor
        Encoder outputs on Y, shape (M, L).
    recon_mean, recon_log_sigma : Tensor
        Decoder outputs at mu(Y): m(mu(y)) and log s(mu(y)), shape (M, D).
    """

    def __init__(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        recon_mean: torch.Tensor,
        recon_log_sigma: torch.Tensor,
    ) -> None:
        tensors = dict(zip(_FIELDS, (x, mu, logvar, recon_mean, recon_log_sigma), strict=True))
        problems = _shape_problems(tensors)
        if problems:
            raise ValueError("inconsistent reference set: " + "; ".join(problems))
        self.x, self.mu, self.logvar = x, mu, logvar
        self.recon_mean, self.recon_log_sigma = recon_mean, recon_log_sigma
        self._indexes: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.x)

    @property
    def n_features(self) -> int:
        return self.x.shape[1]

    @property
    def latent_size(self) -> int:
        return self.mu.shape[1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        vae: GaussianVAE,
        raw_samples: np.ndarray | torch.Tensor,
        batch_size: int = 8192,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> ReferenceSet:
        """Encode and decode the reference samples with ``vae`` in batches.

        Parameters
        ----------
        vae : GaussianVAE
            The trained model the scores will use (put in eval mode here).
        raw_samples : array or Tensor
            Raw (not standardised) healthy feature vectors, shape (M, D).
        batch_size : int
            Samples per forward pass.
        device : str or torch.device, optional
            Where to compute and keep the tensors; defaults to the VAE's device.
        progress : bool
            Show a progress bar.
        """
        device = torch.device(device) if device is not None else next(vae.parameters()).device
        vae = vae.to(device).eval()
        raw = raw_samples if torch.is_tensor(raw_samples) else torch.from_numpy(np.asarray(raw_samples, np.float32))
        if raw.ndim != 2 or raw.shape[1] != vae.in_channels or len(raw) == 0:
            raise ValueError(f"reference samples must have shape (M > 0, {vae.in_channels}); got {tuple(raw.shape)}")
        widths = (vae.in_channels, vae.latent_size, vae.latent_size, vae.in_channels, vae.in_channels)
        # Filled in place, so building needs no second copy of the outputs.
        out = [torch.empty(len(raw), width, device=device) for width in widths]
        starts = range(0, len(raw), batch_size)
        for start in tqdm(starts, desc="reference set", unit="batch", disable=not progress):
            x = vae.standardize(raw[start : start + batch_size].to(device=device, dtype=torch.float32))
            mu, logvar = vae.encode(x)
            for tensor, value in zip(out, (x, mu, logvar, *vae.decode(mu)), strict=True):
                tensor[start : start + len(x)] = value
        logger.info("reference set: %d samples, %d features, latent size %d", len(raw), raw.shape[1], vae.latent_size)
        return cls(*out)

    def save(self, path: str | Path) -> None:
        """Write the tensors (on the CPU) to ``path`` atomically; the search indexes are not saved."""
        with atomic_path(path) as tmp:
            torch.save({name: getattr(self, name).detach().cpu().contiguous() for name in _FIELDS}, tmp)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ReferenceSet:
        """Read a reference set written by :meth:`save` (``torch.load(weights_only=True)``).

        Raises
        ------
        InputError
            When ``path`` is not a readable, consistent reference set.
        """
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
            tensors = {name: payload[name] for name in _FIELDS}
        except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
            raise InputError(path, f"not a readable anomri reference set ({type(exc).__name__})") from exc
        problems = _shape_problems(tensors)
        if problems:
            raise InputError(path, "inconsistent reference set: " + "; ".join(problems))
        return cls(**tensors)

    def index(self, key: str, build: Callable[[ReferenceSet], T]) -> T:
        """The search structure ``key``, built by ``build(self)`` on first use and kept."""
        if key not in self._indexes:
            logger.debug("building reference index %r", key)
            self._indexes[key] = build(self)
        return self._indexes[key]  # type: ignore[return-value]

    @torch.no_grad()
    def check_model(self, vae: GaussianVAE, n_probe: int = 8) -> None:
        """Raise ``ValueError`` unless this set was built with ``vae`` (re-encodes a few samples).

        A reference set built with another model would silently give wrong
        scores, so the scores call this once per batch (it costs ``n_probe``
        forward passes).
        """
        if vae.latent_size != self.latent_size or vae.in_channels != self.n_features:
            raise ValueError(
                f"reference set has {self.n_features} features and latent size {self.latent_size}; "
                f"the model has {vae.in_channels} and {vae.latent_size}"
            )
        probe = self.x[:n_probe]
        mu, logvar = vae.encode(probe)
        recon_mean, _ = vae.decode(mu)
        pairs = ((mu, self.mu), (logvar, self.logvar), (recon_mean, self.recon_mean))
        close = all(torch.allclose(new.float(), old[:n_probe].float(), rtol=1e-3, atol=1e-3) for new, old in pairs)
        if not close:
            raise ValueError("the reference set was built with a different model; rebuild it with ReferenceSet.build")


def build_reference_set(model: str | Path, derivatives_dir: str | Path, scans: Sequence[str], out: str | Path, *,
                        size: int = default("scoring.reference_size"), seed: int = default("scoring.seed"),
                        device: str = default("scoring.device")) -> None:
    """Build the reference set of a trained model from healthy controls and save it to ``out`` (.pt).

    Parameters
    ----------
    model : str or Path
        The VAE checkpoint.
    derivatives_dir : str or Path
        Derivatives tree of the preprocessed scans.
    scans : sequence of str
        Prefixes of the healthy controls.
    out : str or Path
    size : int
        Reference samples, stratified: every control contributes an equal
        share, ``size // len(scans)`` (at least 1) of its in-mask voxels.
    seed : int
        Seed of the sub-sampling.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    """
    # Imported here: the image engine uses this module and never needs dipy, which the features module loads; the
    # score registry imports this module too, and every command with --scores would otherwise load MONAI.
    from anomri.dmri.features import pool_samples
    from anomri.models.checkpoint import load_vae
    from anomri.models.training import resolve_device

    torch_device = resolve_device(device)
    vae, _ = load_vae(model, torch_device)
    controls = [ScanDerivatives(derivatives_dir, p) for p in scans]
    samples, _, _ = pool_samples([s.features for s in controls], [s.mask for s in controls],
                                 max(1, size // len(controls)), seed)
    ReferenceSet.build(vae, samples, device=torch_device, progress=True).save(out)


def _shape_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """What is wrong with the shapes and values of the reference tensors (empty when consistent)."""
    problems = []
    if not all(torch.is_tensor(t) and t.ndim == 2 for t in tensors.values()):
        return ["every field must be a 2-D tensor"]
    rows = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(rows.values())) != 1 or rows["x"] == 0:
        problems.append(f"row counts differ or are zero: {rows}")
    if not tensors["mu"].shape == tensors["logvar"].shape:
        problems.append("mu and logvar shapes differ")
    if not tensors["x"].shape == tensors["recon_mean"].shape == tensors["recon_log_sigma"].shape:
        problems.append("x, recon_mean and recon_log_sigma shapes differ")
    if not problems and not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        problems.append("non-finite values")
    return problems
