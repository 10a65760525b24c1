"""Scoring one preprocessed scan with a trained model: its novelty maps, from the files on disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomri.dmri.features import check_compatible
from anomri.errors import InputError
from anomri.io.derivatives import ScanDerivatives
from anomri.io.voxels import read_feature_description
from anomri.maps.novelty import NoveltyModel
from anomri.maps.writing import write_novelty_maps
from anomri.models.checkpoint import load_vae
from anomri.models.training import resolve_device
from anomri.scores.reference import ReferenceSet
from anomri.settings import default

__all__ = ["score_scan"]


def score_scan(model: str | Path | Sequence[str | Path], derivatives_dir: str | Path, prefix: str,
               scores: str | Sequence[str] = "all", *, reference: str | Path | Sequence[str | Path] | None = None,
               fold_maps: Sequence[str | Path] = (), fold_scores: Sequence[str] = (),
               copies: Sequence[str | Path] = (), copy_scores: Sequence[str] = (),
               n_samples: int = default("scoring.n_samples"), seed: int = default("scoring.seed"),
               batch_size: int = default("scoring.batch_size"), device: str = default("scoring.device")) -> None:
    """Write the novelty map of every score of scan ``prefix``, with its sidecar.

    Parameters
    ----------
    model : str, Path or sequence of them
        The VAE checkpoint that gives the scan its maps, optionally followed by
        the other cross-fitting fold models that never trained on it (they
        compute only ``fold_scores``); the scan's features must be comparable
        with their training features (:func:`~anomri.dmri.features.check_compatible`).
    derivatives_dir : str or Path
        Derivatives tree holding the scan's features and brain mask; the maps are written there.
    prefix : str
        ``sub-<label>[_ses-<label>]...`` of the scan.
    scores : "all" or sequence of str
        Registered score ids, computed with the first model.
    reference : str, Path or sequence of them, optional
        The reference set (.pt) of each model, needed by reference-based scores.
    fold_maps, fold_scores : sequence
        One derivative tree per model, where that model's own maps of ``fold_scores`` are written
        (the cross-conformal lesion probability averages the models' p-values, not their scores).
    copies, copy_scores : sequence
        Derivative trees holding copies of the scan (its noisier copies, same prefix): each is scored with the
        first model for ``copy_scores`` and its maps written there, in the same process, which spares a job's
        start-up (loading torch, MONAI and the model) per copy.
    n_samples, seed, batch_size : int
        Monte Carlo samples, their seed, and voxels per batch (:class:`~anomri.maps.novelty.NoveltyModel`).
    device : str
        ``auto``, ``cpu`` or ``cuda``.

    Raises
    ------
    InputError
        The scan's features differ from a model's training features, or the
        models, reference sets and fold trees do not pair up.
    """
    paths = [model] if isinstance(model, (str, Path)) else list(model)
    references = [] if reference is None else [reference] if isinstance(reference, (str, Path)) else list(reference)
    if references and len(references) != len(paths):
        raise InputError("--reference", f"{len(references)} reference sets for {len(paths)} models")
    if (fold_maps or len(paths) > 1) and len(fold_maps) != len(paths):
        raise InputError("--fold-maps", f"{len(fold_maps)} trees for {len(paths)} models: each model after the "
                                        "first writes only its maps of the fold scores, into its own tree")
    torch_device = resolve_device(device)
    scan = ScanDerivatives(derivatives_dir, prefix)
    copy_scans = [ScanDerivatives(tree, prefix) for tree in copies]
    models = []
    for k, path in enumerate(paths):
        vae, metadata = load_vae(path, torch_device)
        # Every input is checked before any scoring, so a bad copy fails at once, not after the scan's maps.
        for target in [scan] + (copy_scans if k == 0 else []):
            check_compatible(metadata["features"], read_feature_description(target.features), target.features)
        reference_set = ReferenceSet.load(references[k], torch_device) if references else None
        models.append(NoveltyModel(vae, scores if k == 0 else fold_scores, n_samples=n_samples, seed=seed,
                                   reference=reference_set, batch_size=batch_size, device=torch_device))
    write_novelty_maps(models, scan, paths, fold_maps, fold_scores)
    if copy_scans:
        copy_model = NoveltyModel(models[0].vae, copy_scores, n_samples=n_samples, seed=seed,
                                  reference=models[0].reference, batch_size=batch_size, device=torch_device)
    for copy in copy_scans:
        write_novelty_maps([copy_model], copy, paths[:1])
