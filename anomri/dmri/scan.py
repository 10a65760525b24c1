"""Preprocess one scan end to end: validate, mask, denoise, normalise, extract features.

Writes the brain mask (voxels with a usable S0), the mean b0 (the anatomical
reference for overlays) and the 4-D features (0 outside the mask) whose
sidecar lists the feature names, the representation and the acquisition
scheme they depend on. Paths follow :mod:`anomri.io.derivatives`; every sidecar
names the source DWI as a BIDS URI (``SpatialReference``, ``Sources``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomri import __version__
from anomri.dmri.augmentation import scale_anisotropy, scale_diffusivity
from anomri.dmri.context import add_context
from anomri.dmri.copies import COPY_KINDS, copy_arguments
from anomri.dmri.features import FeatureSet, compute_features
from anomri.dmri.harmonisation import harmonise
from anomri.dmri.gradients import load_gradient_table
from anomri.dmri.motion import correct_motion, motion_record
from anomri.dmri.noise import add_noise, estimate_sigma, signal_to_noise
from anomri.dmri.preprocess import brain_mask, denoise, normalize_by_b0, remove_gibbs
from anomri.errors import InputError
from anomri.io.atomic import write_json
from anomri.io.derivatives import ScanDerivatives, sidecar_path, source_uri
from anomri.io.nifti import load_mask, load_nifti, read_data, save_volume
from anomri.settings import default

logger = logging.getLogger(__name__)


def preprocess_scan(
    dwi: str | Path,
    bval: str | Path,
    bvec: str | Path,
    outputs: ScanDerivatives,
    mask: str | Path | None = None,
    lesion_mask: str | Path | None = None,
    b0_threshold: float = default("preprocessing.b0_threshold"),
    denoising: str = default("preprocessing.denoise"),
    representation: str = default("preprocessing.features"),
    context: str = default("preprocessing.context"),
    context_radius: int = default("preprocessing.context_radius"),
    harmonisation: str = default("preprocessing.harmonisation"),
    gibbs: bool = default("preprocessing.gibbs_removal"),
    motion_correction: bool = default("preprocessing.motion_correction"),
    noise_factor: float = 1.0,
    noise_seed: int = 0,
    diffusivity_scale: float = 1.0,
    anisotropy_scale: float = 1.0,
    source_dir: str | Path | None = None,
) -> FeatureSet:
    """Validate and preprocess one scan, writing ``outputs``.

    Everything is checked before anything is written, so bad input leaves no
    partial outputs; each output is written atomically. The data are
    denoised, then (``gibbs``) freed of Gibbs ringing, then
    (``motion_correction``) registered volume by volume to the mean b0 with
    the b-vectors rotated accordingly; ``context`` and ``context_radius``
    optionally append in-mask neighbourhood statistics
    (:func:`anomri.dmri.context.add_context`) to the features, after
    ``harmonisation`` has (or has not) scaled each to its brain median
    (:func:`anomri.dmri.harmonisation.harmonise`).

    With ``noise_factor`` > 1 the scan is first made noisier, as if acquired
    with a noise standard deviation ``noise_factor`` times its own (estimated
    by :func:`anomri.dmri.noise.estimate_sigma`): complex Gaussian noise,
    seeded by ``noise_seed``, is added to the magnitude images before
    anything else. Healthy training scans copied this way teach the model
    what healthy tissue looks like at the lower SNR of other subjects.

    With ``diffusivity_scale`` or ``anisotropy_scale`` != 1, every
    diffusivity, or the directional contrast of the apparent diffusivity on
    every shell, is scaled after b0 normalisation
    (:mod:`anomri.dmri.augmentation`): healthy controls copied this way teach
    the model healthy tissue of people who differ from them by a few per cent
    (physics, not pathology).

    ``source_dir`` is the input dataset: the sidecars name its files ``bids:raw:<path>``
    (other files by their file URI).

    Raises
    ------
    InputError
        Any problem with the inputs, naming the file.
    """
    dwi = Path(dwi)
    img = load_nifti(dwi, ndim=4)
    gtab = load_gradient_table(bval, bvec, img.shape[3], b0_threshold)
    data = read_data(img, dwi)
    if lesion_mask is not None:
        load_mask(lesion_mask, img, dwi)
    if mask is not None:
        brain = load_mask(mask, img, dwi)
    else:
        brain = brain_mask(data, gtab)
    if not brain.any():
        raise InputError(mask or dwi, "the brain mask is empty")
    noise = _noise_level(data, gtab, brain, dwi)
    if noise_factor != 1.0:
        if noise["noise"]["sigma"] is None:
            raise InputError(dwi, "cannot add noise: its noise level is unknown (no background for PIESNO and "
                                  "fewer than two b0 volumes)")
        # Every scan and factor draws its own noise from the one seed.
        data, augmentation = _noisier(data, noise["noise"]["sigma"], noise_factor,
                                      [noise_seed, zlib.crc32(outputs.prefix.encode())])
        noise = {"noise": {"sigma": round(noise["noise"]["sigma"] * noise_factor, 4),
                           "snr": round(noise["noise"]["snr"] / noise_factor, 3)}} | augmentation
    data = denoise(data, gtab, denoising, brain)
    if gibbs:
        data = remove_gibbs(data)
    motion = {}
    if motion_correction:
        data, gtab, transforms = correct_motion(data, gtab, img.affine)
        motion = {"motion": motion_record(transforms)}
    norm = normalize_by_b0(data, gtab, brain)
    if not norm.mask.any():
        raise InputError(dwi, "no brain voxel has a usable b0 signal")
    for option, scale, augment in (("diffusivity", diffusivity_scale, scale_diffusivity),
                                   ("anisotropy", anisotropy_scale, lambda n, s: scale_anisotropy(n, gtab, s))):
        if scale != 1.0:
            try:
                norm = augment(norm, scale)
            except ValueError as exc:
                raise InputError(f"--{option}-scale", str(exc)) from exc
            noise |= {f"{option}_augmentation": {"scale": scale}}
    try:
        features = harmonise(compute_features(norm, gtab, representation), norm.mask, harmonisation)
    except ValueError as exc:
        raise InputError(dwi, str(exc)) from exc
    features = add_context(features, norm.mask, context, context_radius)

    reference = source_uri(dwi, source_dir)
    sources = [source_uri(path, source_dir) for path in (dwi, bval, bvec, *([mask] if mask else []))]
    generated_by = {"Name": "anomri", "Version": __version__}
    save_volume(outputs.mask, norm.mask, img, dtype=np.uint8)
    write_json(sidecar_path(outputs.mask), {
        "Description": "Brain mask: the voxels with a usable b0 signal, within the "
                       + ("provided mask." if mask else "median_otsu mask."),
        "Type": "Brain",
        "SpatialReference": reference,
        "Sources": sources,
        "GeneratedBy": generated_by,
    })
    save_volume(outputs.b0, norm.mean_b0, img)
    write_json(sidecar_path(outputs.b0), {
        "Description": "Mean of the b = 0 volumes of the preprocessed scan (the whole field of view).",
        "SkullStripped": False,
        "SpatialReference": reference,
        "Sources": sources,
        "GeneratedBy": generated_by,
    })
    save_volume(outputs.features, features.data, img)
    write_json(
        sidecar_path(outputs.features),
        {
            **features.description(),
            "SpatialReference": reference,
            "Sources": sources,
            "Preprocessing": {"b0_threshold": b0_threshold, "denoising": denoising, "gibbs_removal": gibbs,
                              "motion_correction": motion_correction,
                              "brain_mask": "provided" if mask else "median_otsu"} | motion | noise,
            "GeneratedBy": generated_by,
        },
    )
    logger.info("%s: %d brain voxels, %d features (%s)", dwi.name, int(norm.mask.sum()), len(features.names),
                representation)
    return features


def preprocess_with_copies(dwi: str | Path, bval: str | Path, bvec: str | Path, outputs: ScanDerivatives,
                           copies: Sequence[str] = (), copies_dir: str | Path | None = None, **settings) -> None:
    """Preprocess a scan (:func:`preprocess_scan` with ``settings``), then each of its ``copies``.

    ``copies`` are copy names (:mod:`anomri.dmri.copies`, e.g. ``noise-150``);
    copy ``c`` is preprocessed like the scan, within the scan's brain mask,
    into the derivatives tree ``copies_dir/c``. One job makes a control and its
    copies: the copies' own jobs spent more time starting than preprocessing.

    Raises
    ------
    InputError
        A bad copy name, copies without ``copies_dir`` or of a scan that is
        itself a copy, or any problem :func:`preprocess_scan` finds.
    """
    arguments = {}
    for label in copies:
        try:
            arguments[label] = copy_arguments(label)
        except ValueError as exc:
            raise InputError("--copies", str(exc)) from exc
    if copies and copies_dir is None:
        raise InputError("--copies", "needs --copies-dir, the folder of the copies' derivatives trees")
    made = [k for k in COPY_KINDS.values() if settings.get(k, 1.0) != 1.0]
    if copies and made:
        raise InputError("--copies", f"copies are made of the scan as measured, not of a copy; leave out "
                                     f"--{made[0].replace('_', '-')}")
    preprocess_scan(dwi, bval, bvec, outputs, **settings)
    for label, argument in arguments.items():
        preprocess_scan(dwi, bval, bvec, ScanDerivatives(Path(copies_dir) / label, outputs.prefix),
                        **(settings | {"mask": outputs.mask} | argument))


def _noise_level(data: np.ndarray, gtab, brain: np.ndarray, dwi: Path) -> dict:
    """The scan's noise std and SNR (:mod:`anomri.dmri.noise`), for its sidecar; None where unknown."""
    try:
        sigma = estimate_sigma(data, gtab, brain)
    except ValueError as exc:
        logger.warning("%s: noise level unknown (%s); its lesion probability is not noise-matched", dwi.name, exc)
        return {"noise": {"sigma": None, "snr": None}}
    if sigma <= 0:
        # A noise-free scan (simulated, or zero-filled background): no SNR to match the healthy null to.
        logger.warning("%s: estimated noise level is %g (no noise in the background?); its lesion probability is "
                       "not noise-matched", dwi.name, sigma)
        return {"noise": {"sigma": None, "snr": None}}
    return {"noise": {"sigma": round(sigma, 4), "snr": round(signal_to_noise(data, gtab, brain, sigma), 3)}}


def _noisier(data: np.ndarray, sigma: float, factor: float, seed: list[int]) -> tuple[np.ndarray, dict]:
    """The scan with its noise std ``sigma`` raised ``factor``-fold, and a record of what was added."""
    if factor < 1.0:
        raise InputError("--noise-factor", f"must be >= 1 (noise can only be added); got {factor}")
    added = sigma * float(np.sqrt(factor**2 - 1.0))
    noisy = add_noise(data, added, np.random.default_rng([*seed, round(factor * 1000)]))
    logger.info("noise augmentation: sigma %.3g -> %.3g", sigma, sigma * factor)
    return noisy, {"noise_augmentation": {"factor": factor, "estimated_sigma": round(sigma, 4),
                                          "added_sigma": round(added, 4), "seed": seed[0]}}

