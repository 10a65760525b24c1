"""Per-voxel q-space feature representations of a b0-normalised scan.

Each representation returns a ``FeatureSet``: the feature volume, feature names
and a *scheme* description stored in the sidecar, which decides whether two
scans' features may be compared (raw signals need identical acquisitions);
:func:`pool_samples` gathers the compatible features of several scans, and
:func:`pool_training_voxels` the VAE's training pool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dipy.core.gradients import GradientTable

from anomri.dmri.invariants import sh_invariants
from anomri.dmri.preprocess import NormalizedDWI
from anomri.errors import InputError
from anomri.io.atomic import atomic_path
from anomri.io.derivatives import ScanDerivatives
from anomri.io.voxels import load_masked, read_feature_description
from anomri.settings import default

logger = logging.getLogger(__name__)

REPRESENTATIONS = ("raw", "sh-invariant")

#: Relative b-value and angular (|cos|) tolerances for "the same acquisition".
BVAL_RTOL = 0.05
BVEC_MIN_ABS_COS = 0.995


@dataclass
class FeatureSet:
    """Features of one scan.

    Attributes
    ----------
    data : ndarray, (X, Y, Z, F) float32
    names : list of str
    representation : str
    scheme : dict
        What the features depend on in the acquisition (see :func:`check_compatible`).
    context : dict, optional
        Spatial-context settings when neighbourhood features were appended
        (:func:`anomri.dmri.context.add_context`); None for per-voxel features.
    harmonisation : dict, optional
        The per-subject harmonisation and its divisors
        (:func:`anomri.dmri.harmonisation.harmonise`); None when not harmonised.
    """

    data: np.ndarray
    names: list[str]
    representation: str
    scheme: dict = field(default_factory=dict)
    context: dict | None = None
    harmonisation: dict | None = None

    def description(self) -> dict:
        """The JSON-ready part of the sidecar."""
        # Optional parts are left out when unused, so older sidecars read the same.
        context = {"Context": self.context} if self.context is not None else {}
        harmonisation = {"Harmonisation": self.harmonisation} if self.harmonisation is not None else {}
        return {"Representation": self.representation, "FeatureNames": self.names, "Scheme": self.scheme,
                **context, **harmonisation}


def raw_signal_features(norm: NormalizedDWI, gtab: GradientTable) -> FeatureSet:
    """S/S0 of every diffusion-weighted volume, in acquisition order.

    Comparable only between scans with the same b-values and directions.
    """
    dw = ~gtab.b0s_mask
    bvals = np.round(gtab.bvals[dw]).astype(int)
    names = [f"b{b}_vol{i}" for b, i in zip(bvals, np.flatnonzero(dw), strict=True)]
    scheme = {"bvals": bvals.tolist(), "bvecs": np.round(gtab.bvecs[dw], 6).tolist()}
    return FeatureSet(norm.signal[..., dw], names, "raw", scheme)


def sh_invariant_features(norm: NormalizedDWI, gtab: GradientTable) -> FeatureSet:
    """Rotation-invariant spherical-harmonic power per shell and even order.

    Each shell is fit on its own directions, so scans with different
    directions or direction counts but the same shells are comparable.
    """
    features, names = sh_invariants(norm.signal, gtab.bvals, gtab.bvecs, b0_threshold=gtab.b0_threshold)
    features[~norm.mask] = 0.0
    return FeatureSet(features.astype(np.float32), names, "sh-invariant", {"shells": sorted({n.split("_")[0] for n in names})})


def compute_features(norm: NormalizedDWI, gtab: GradientTable, representation: str = "raw") -> FeatureSet:
    """Dispatch to the named representation."""
    if representation == "raw":
        return raw_signal_features(norm, gtab)
    if representation == "sh-invariant":
        return sh_invariant_features(norm, gtab)
    raise ValueError(f"unknown feature representation {representation!r}; choose one of {REPRESENTATIONS}")


def check_compatible(expected: dict, actual: dict, path: str | Path) -> None:
    """Raise :class:`InputError` naming ``path`` if two feature descriptions cannot be compared.

    ``expected`` and ``actual`` are :meth:`FeatureSet.description` dictionaries.
    Raw signals must come from the same b-values (within 5 %) and directions
    (up to sign, which diffusion cannot tell apart); the spatial context
    settings and the harmonisation method must match too.
    """
    if expected["Representation"] != actual["Representation"]:
        raise InputError(path, f"features are '{actual['Representation']}', expected '{expected['Representation']}'")
    if expected.get("Context") != actual.get("Context"):
        raise InputError(path, f"spatial context {actual.get('Context')} differs from the training features' "
                               f"{expected.get('Context')}")
    methods = [(d.get("Harmonisation") or {}).get("Method", "none") for d in (expected, actual)]
    if methods[0] != methods[1]:
        raise InputError(path, f"features harmonised by '{methods[1]}', the training features by '{methods[0]}'")
    if expected["Representation"] != "raw":
        if expected["FeatureNames"] != actual["FeatureNames"]:
            raise InputError(path, "feature names differ from the training features (different shells?)")
        return
    b_exp, b_act = np.asarray(expected["Scheme"]["bvals"]), np.asarray(actual["Scheme"]["bvals"])
    if b_exp.shape != b_act.shape:
        raise InputError(
            path,
            f"gradient scheme differs: {b_act.size} diffusion-weighted volumes, expected {b_exp.size}; "
            "raw-signal features need identical schemes (use an invariant representation)",
        )
    g_exp, g_act = np.asarray(expected["Scheme"]["bvecs"]), np.asarray(actual["Scheme"]["bvecs"])
    cos = np.abs((g_exp * g_act).sum(1))
    if not np.allclose(b_act, b_exp, rtol=BVAL_RTOL) or (cos < BVEC_MIN_ABS_COS).any():
        raise InputError(
            path,
            "gradient scheme differs from the training scans' (b-values or directions); "
            "raw-signal features need identical schemes (use an invariant representation)",
        )


def pool_samples(
    feature_paths: list[str | Path], mask_paths: list[str | Path], max_per_scan: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pool in-mask feature vectors of several scans, at most ``max_per_scan`` from each.

    Sub-sampling is uniform within a scan and seeded, so every scan is
    represented equally however large it is.

    Returns
    -------
    samples : ndarray, (N, D) float32
    scan_index : ndarray, (N,) int
        Which scan (position in ``feature_paths``) each sample came from.
    description : dict
        The shared feature description; every scan must be compatible with
        the first one.
    """
    rng = np.random.default_rng(seed)
    description = read_feature_description(feature_paths[0])
    parts, index = [], []
    for k, (features, mask) in enumerate(zip(feature_paths, mask_paths, strict=True)):
        check_compatible(description, read_feature_description(features), features)
        values, _, _ = load_masked(features, mask)
        if max_per_scan is not None and len(values) > max_per_scan:
            values = values[np.sort(rng.choice(len(values), max_per_scan, replace=False))]
        parts.append(values)
        index.append(np.full(len(values), k))
    return np.concatenate(parts).astype(np.float32), np.concatenate(index), description


def training_quota(max_voxels_per_scan: int | None, n_scans: int, max_training_voxels: int) -> int:
    """Voxels drawn from each of ``n_scans`` scans into the training pool.

    ``max_voxels_per_scan`` (None: every in-mask voxel), unless the pool
    could then exceed ``max_training_voxels``: each scan's quota becomes an
    equal share of it, ``max_training_voxels // n_scans``, so the pool stays
    stratified and training time stops growing with the cohort.

    Raises
    ------
    InputError
        ``max_training_voxels`` is less than one voxel per scan.
    """
    if max_voxels_per_scan is not None and max_voxels_per_scan * n_scans <= max_training_voxels:
        return max_voxels_per_scan
    quota = max_training_voxels // n_scans
    if quota < 1:
        raise InputError("--max-training-voxels", f"{max_training_voxels} is less than one voxel for each of "
                                                  f"the {n_scans} scans")
    return quota


def pool_training_voxels(
    derivatives_dir: str | Path,
    scans: Sequence[str],
    out: str | Path,
    *,
    augmented: Sequence[str | Path] = (),
    max_voxels_per_scan: int | None = default("training.max_voxels_per_scan"),
    max_training_voxels: int = default("training.max_training_voxels"),
    seed: int = default("training.seed"),
) -> None:
    """Pool the healthy training voxels of ``scans`` and of their noisier copies into ``out`` (.npz).

    Parameters
    ----------
    derivatives_dir : str or Path
        Derivatives tree of the preprocessed scans.
    scans : sequence of str
        Prefixes (``sub-<label>[_ses-<label>]``) of the training controls.
    out : str or Path
        The pool: ``samples`` (N, D) float32, ``scan_index`` (N,), ``scans``
        (the name of each pooled scan) and ``description`` (the features'
        sidecar, JSON).
    augmented : sequence of str or Path
        Derivatives trees of noisier copies of the same scans; each copy is
        pooled as a scan of its own, named ``<prefix> (<tree name>)``.
    max_voxels_per_scan, max_training_voxels : int
        Voxels drawn from each scan, and from all together (:func:`training_quota`).
    seed : int
        Seed of the sub-sampling.
    """
    # Every scan, then every noisier copy of every scan (one derivatives tree per noise level).
    trees = [derivatives_dir, *augmented]
    pooled = [ScanDerivatives(tree, p) for tree in trees for p in scans]
    quota = training_quota(max_voxels_per_scan, len(pooled), max_training_voxels)
    if quota != max_voxels_per_scan:
        logger.info("at most %d voxels per scan: %d scans share max_training_voxels = %d",
                    quota, len(pooled), max_training_voxels)
    samples, index, description = pool_samples([s.features for s in pooled], [s.mask for s in pooled], quota, seed)
    names = [p if tree == derivatives_dir else f"{p} ({Path(tree).name})" for tree in trees for p in scans]
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, samples=samples, scan_index=index, scans=np.array(names), description=json.dumps(description))
    logger.info("pooled %d voxels of %d features from %d scans", *samples.shape, len(pooled))
