"""Voxelwise novelty maps, in dipy's ``reconst`` Model/Fit style.

``NoveltyModel`` holds what does not depend on the data (the trained VAE, the
chosen scores, Monte Carlo settings, the reference set); ``NoveltyModel.fit``
takes a feature volume and a mask and returns a ``NoveltyFit`` holding one map
per score::

    model = NoveltyModel(vae, scores="all", n_samples=45, seed=0)
    fit = model.fit(features, mask=brain_mask)
    fit.maps["det-rec-lik"]          # (X, Y, Z) float32, 0 outside the mask
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from anomri.models.vae import GaussianVAE
from anomri.scores.context import ScoreContext
from anomri.scores.registry import NoveltyScore, get_scores
from anomri.settings import default

logger = logging.getLogger(__name__)


class NoveltyModel:
    """A trained VAE plus the novelty scores to compute with it.

    Parameters
    ----------
    vae : GaussianVAE
        Trained model; put in eval mode here.
    scores : "all" or sequence of str
        Registered score ids.
    n_samples : int
        Monte Carlo samples for stochastic scores (the paper used 45).
    seed : int
        Seed of the Monte Carlo samples. Batch ``k`` uses ``seed + k``, so
        maps depend only on the seed, the batch size and the data.
    reference : object, optional
        Cached outputs of the healthy reference set, required by scores with
        ``needs_reference``.
    batch_size : int
        Voxels per batch; bounds memory.
    device : str or torch.device, optional
        Defaults to the VAE's device.
    """

    def __init__(
        self,
        vae: GaussianVAE,
        scores: str | Sequence[str] = "all",
        n_samples: int = default("scoring.n_samples"),
        seed: int = default("scoring.seed"),
        reference: object | None = None,
        batch_size: int = default("scoring.batch_size"),
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device
        self.vae = vae.to(self.device).eval()
        self.scores: list[NoveltyScore] = get_scores(scores)
        missing = [s.id for s in self.scores if s.needs_reference and reference is None]
        if missing:
            raise ValueError(f"scores {missing} need a healthy reference set")
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        self.reference = reference
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def score_samples(self, samples: np.ndarray, progress: bool = True) -> dict[str, np.ndarray]:
        """Score raw feature vectors of shape (N, D); return {score id: (N,) float32}."""
        samples = np.asarray(samples, dtype=np.float32)
        out = {s.id: np.empty(len(samples), np.float32) for s in self.scores}
        starts = range(0, len(samples), self.batch_size)
        for k, start in enumerate(tqdm(starts, desc="scoring", unit="batch", disable=not progress)):
            stop = start + self.batch_size
            x = self.vae.standardize(torch.from_numpy(samples[start:stop]).to(self.device))
            generator = torch.Generator(device=self.device).manual_seed(self.seed + k)
            ctx = ScoreContext(self.vae, x, self.n_samples, generator, self.reference)
            for score in self.scores:
                # Some scores optimise over z and need gradients inside no_grad.
                out[score.id][start:stop] = score.func(ctx).float().cpu().numpy()
        return out

    def fit(self, data: np.ndarray, mask: np.ndarray | None = None) -> NoveltyFit:
        """Compute every score at every voxel of ``data`` (..., D) inside ``mask``."""
        data = np.asarray(data)
        spatial = data.shape[:-1]
        mask = np.ones(spatial, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != spatial:
            raise ValueError(f"mask shape {mask.shape} does not match data shape {spatial}")
        values = self.score_samples(data[mask])
        maps = {}
        for score_id, v in values.items():
            volume = np.zeros(spatial, np.float32)
            volume[mask] = v
            maps[score_id] = volume
        return NoveltyFit(self, maps, mask)


class NoveltyFit:
    """Novelty maps of one volume.

    Attributes
    ----------
    model : NoveltyModel
    maps : dict of str to ndarray
        One float32 map per score id, 0 outside ``mask``; higher = more novel.
    mask : ndarray of bool
    """

    def __init__(self, model: NoveltyModel, maps: dict[str, np.ndarray], mask: np.ndarray) -> None:
        self.model = model
        self.maps = maps
        self.mask = mask

    def __getitem__(self, score_id: str) -> np.ndarray:
        return self.maps[score_id]
