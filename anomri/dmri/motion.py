"""Inter-volume head-motion correction with dipy, b-vectors rotated with the head.

A subject who moves between volumes is measured with gradient directions
fixed to the scanner, so once a volume is registered back to the reference
pose its gradient must be rotated by the inverse of the head's rotation
(Leemans and Jones 2009); otherwise rotation-invariant features of moved
volumes are biased at every tissue boundary.

Every b0 volume is registered rigidly to the first one and they are
averaged into the reference; every diffusion-weighted volume is then
registered rigidly to that reference with dipy's mutual-information
``affine_registration`` (the contrasts differ, so mutual information rather
than a correlation). A sparse, regular sample of the reference (dipy's
``sampling_proportion``) keeps each registration well under a second at
clinical resolution; the sampling grid is fixed, so the result is
deterministic.
"""

from __future__ import annotations

import logging

import numpy as np
from dipy.core.gradients import GradientTable, reorient_bvecs
from scipy import ndimage
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Registration pyramid: iterations, smoothing (voxels) and shrink factors per level, coarse to fine.
LEVEL_ITERS = (50, 20)
SIGMAS = (1.0, 0.0)
FACTORS = (2, 1)
#: Fraction of reference voxels sampled by the mutual information, and the least number of samples.
SAMPLING_PROPORTION = 0.05
MIN_SAMPLES = 20_000


def _register(moving: np.ndarray, static: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rigidly register ``moving`` to ``static`` (same grid): the resampled volume and the 4x4 world transform.

    The transform maps reference (static) world points to where they are in
    the moving volume. The volume is resampled with a cubic spline rather
    than dipy's linear interpolation, which would smooth every moved volume
    (and its noise) by a different amount and bias the features of moved volumes.
    """
    from dipy.align import affine_registration

    proportion = min(1.0, max(SAMPLING_PROPORTION, MIN_SAMPLES / static.size))
    _, transform = affine_registration(
        moving, static, moving_affine=affine, static_affine=affine, pipeline=["rigid"],
        level_iters=list(LEVEL_ITERS), sigmas=list(SIGMAS), factors=list(FACTORS),
        sampling_proportion=None if proportion >= 1.0 else proportion)
    voxel = np.linalg.inv(affine) @ transform @ affine  # static voxel -> moving voxel
    resampled = ndimage.affine_transform(moving, voxel[:3, :3], voxel[:3, 3], order=3, mode="constant", cval=0.0)
    return np.maximum(resampled, 0.0).astype(np.float32), transform


def _voxel_rotation(transform: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The rotation of a world transform expressed in the image's voxel axes (those of FSL b-vectors)."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return directions.T @ transform[:3, :3] @ directions


def correct_motion(data: np.ndarray, gtab: GradientTable, affine: np.ndarray, progress: bool = True
                   ) -> tuple[np.ndarray, GradientTable, np.ndarray]:
    """Register every volume to the mean b0 and rotate the b-vectors accordingly.

    Parameters
    ----------
    data : ndarray, (X, Y, Z, V)
    gtab : GradientTable
        b-vectors in the image's voxel axes (as FSL files hold them).
    affine : ndarray, (4, 4)
        Voxel to world of ``data``.
    progress : bool
        Show a progress bar over the volumes.

    Returns
    -------
    corrected : ndarray, (X, Y, Z, V) float32
    gtab : GradientTable
        The same b-values, b-vectors rotated by the inverse of each volume's head rotation.
    transforms : ndarray, (V, 4, 4)
        World transform of each volume (reference point to its place in the volume).
    """
    data = np.asarray(data, np.float32)
    b0s = np.flatnonzero(gtab.b0s_mask)
    corrected = np.empty_like(data)
    transforms = np.tile(np.eye(4), (data.shape[-1], 1, 1))
    corrected[..., b0s[0]] = data[..., b0s[0]]
    order = list(b0s[1:]) + list(np.flatnonzero(~gtab.b0s_mask))
    bar = tqdm(order, desc="motion correction", unit="volume", disable=not progress)
    reference = None
    for v in bar:
        if reference is None and not gtab.b0s_mask[v]:
            # Every b0 is registered: their mean is the reference of the diffusion-weighted volumes.
            reference = corrected[..., b0s].mean(-1)
        static = data[..., b0s[0]] if gtab.b0s_mask[v] else reference
        corrected[..., v], transforms[v] = _register(data[..., v], static, affine)
    rotations = np.stack([_voxel_rotation(t, affine) for t in transforms[~gtab.b0s_mask]], axis=-1)
    rotated = reorient_bvecs(gtab, rotations)
    moved = motion_record(transforms)
    logger.info("motion correction: largest rotation %.2f deg, largest translation %.2f mm",
                moved["max_rotation_deg"], moved["max_translation_mm"])
    return corrected, rotated, transforms


def motion_record(transforms: np.ndarray) -> dict[str, float]:
    """Largest and mean rotation (degrees) and translation (mm) of the estimated motion, for the sidecar."""
    from scipy.spatial.transform import Rotation

    degrees = np.degrees(Rotation.from_matrix(transforms[:, :3, :3]).magnitude())
    shifts = np.linalg.norm(transforms[:, :3, 3], axis=1)
    summary = {"max_rotation_deg": degrees.max(), "mean_rotation_deg": degrees.mean(),
               "max_translation_mm": shifts.max(), "mean_translation_mm": shifts.mean()}
    return {k: round(float(v), 4) for k, v in summary.items()}
