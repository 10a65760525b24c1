"""Scoring one preprocessed scan with a trained model: its novelty maps, from the files on disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomri.dmri.features import check_compatible
from anomri.io.derivatives import ScanDerivatives
from anomri.io.voxels import read_feature_description
from anomri.maps.novelty import NoveltyModel
from anomri.maps.writing import write_novelty_maps
from anomri.models.checkpoint import load_vae
from anomri.models.training import resolve_device
from anomri.scores.reference import ReferenceSet
from anomri.settings import default

__all__ = ["score_scan"]


def score_scan(model: str | Path, derivatives_dir: str | Path, prefix: str, scores: str | Sequence[str] = "all", *,
               reference: str | Path | None = None, n_samples: int = default("scoring.n_samples"),
               seed: int = default("scoring.seed"), batch_size: int = default("scoring.batch_size"),
               device: str = default("scoring.device")) -> None:
    """Write the novelty map of every score of scan ``prefix``, with its sidecar.

    Parameters
    ----------
    model : str or Path
        The VAE checkpoint; the scan's features must be comparable with its
        training features (:func:`~anomri.dmri.features.check_compatible`).
    derivatives_dir : str or Path
        Derivatives tree holding the scan's features and brain mask; the maps are written there.
    prefix : str
        ``sub-<label>[_ses-<label>]...`` of the scan.
    scores : "all" or sequence of str
        Registered score ids.
    reference : str or Path, optional
        The reference set (.pt) of ``model``, needed by reference-based scores.
    n_samples, seed, batch_size : int
        Monte Carlo samples, their seed, and voxels per batch (:class:`~anomri.maps.novelty.NoveltyModel`).
    device : str
        ``auto``, ``cpu`` or ``cuda``.

    Raises
    ------
    InputError
        The scan's features differ from the model's training features.
    """
    torch_device = resolve_device(device)
    vae, metadata = load_vae(model, torch_device)
    scan = ScanDerivatives(derivatives_dir, prefix)
    check_compatible(metadata["features"], read_feature_description(scan.features), scan.features)
    reference_set = ReferenceSet.load(reference, torch_device) if reference else None
    novelty = NoveltyModel(vae, scores, n_samples=n_samples, seed=seed, reference=reference_set,
                           batch_size=batch_size, device=torch_device)
    write_novelty_maps(novelty, scan, model)
