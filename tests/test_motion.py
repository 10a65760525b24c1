"""Inter-volume motion correction: known head rotations are recovered and the b-vectors rotated with them."""

from __future__ import annotations

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from scipy import ndimage
from scipy.spatial.transform import Rotation

from anomri.demo.acquisition import VolumeMotion
from anomri.dmri.motion import correct_motion

#: A 2 mm grid, LAS like dcm2niix output, so that world and voxel axes differ by a flip.
AFFINE = np.array([[-2.0, 0, 0, 40], [0, 2.0, 0, -46], [0, 0, 2.0, -30], [0, 0, 0, 1]])
SHAPE = (40, 46, 30)


def _phantom() -> np.ndarray:
    """A head-like image: a bright ellipsoid with darker, asymmetric inner structure (no symmetry to alias)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij"), -1)
    c = (np.array(SHAPE) - 1) / 2
    r = (ijk - c) / np.array([15.0, 18.0, 11.0])
    head = (np.linalg.norm(r, axis=-1) < 1).astype(float)
    inner = np.exp(-np.sum(((ijk - c - [4, -5, 2]) / [4.0, 6.0, 3.0]) ** 2, -1))
    blob = np.exp(-np.sum(((ijk - c - [-6, 6, -3]) / [2.5, 2.5, 2.5]) ** 2, -1))
    return ndimage.gaussian_filter(100 * head - 60 * inner + 80 * blob, 1.0)


def test_motion_correction_recovers_rotations_and_rotates_bvecs() -> None:
    centre = AFFINE[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + AFFINE[:3, 3]
    n_volumes = 5
    motion = VolumeMotion.draw(np.random.default_rng(4), n_volumes, 3.0, 2.0, centre)
    angles = np.degrees(Rotation.from_matrix(motion.rotations).magnitude())
    assert angles[1:].min() > 0.3  # every moved volume really moved
    # b0, b0, three diffusion-weighted volumes with the same (scanner-fixed) contrast as the phantom.
    bvals = np.array([0.0, 0.0, 1000.0, 1000.0, 1000.0])
    bvecs = np.array([[0, 0, 0], [0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    still = np.repeat(_phantom()[..., None], n_volumes, axis=-1).astype(np.float32)
    moved = motion.apply(still, AFFINE)
    gtab = gradient_table(bvals, bvecs=bvecs)

    corrected, rotated, transforms = correct_motion(moved, gtab, AFFINE, progress=False)

    # The transforms are the volumes' motions (about the world origin): same rotation, and the
    # same displacement of the brain centre.
    for v in range(1, n_volumes):
        error = Rotation.from_matrix(transforms[v, :3, :3] @ motion.rotations[v].T).magnitude()
        assert np.degrees(error) < 0.15, (v, np.degrees(error))
        moved_centre = transforms[v, :3, :3] @ centre + transforms[v, :3, 3]
        truth = motion.rotations[v] @ (centre - motion.centre) + motion.centre + motion.translations[v]
        np.testing.assert_allclose(moved_centre, truth, atol=0.15)
    # b-vectors: the inverse head rotation, expressed in the (flipped) voxel axes of the FSL file.
    flip = np.diag([-1.0, 1.0, 1.0])
    for v in range(2, n_volumes):
        expected = flip @ motion.rotations[v].T @ flip @ bvecs[v]
        np.testing.assert_allclose(rotated.bvecs[v], expected, atol=5e-3)
    np.testing.assert_array_equal(rotated.bvals, bvals)
    # The corrected volumes line up with the motion-free image far better than the moved ones.
    inside = still[..., 0] > 20
    before = np.abs(moved[..., 1:] - still[..., 1:])[inside].mean()
    after = np.abs(corrected[..., 1:] - still[..., 1:])[inside].mean()
    assert after < 0.25 * before


@pytest.mark.parametrize("n_volumes", [3])
def test_no_motion_is_left_alone(n_volumes: int) -> None:
    data = np.repeat(_phantom()[..., None], n_volumes, axis=-1).astype(np.float32)
    gtab = gradient_table(np.array([0.0, 1000.0, 1000.0]), bvecs=np.array([[0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]))
    corrected, rotated, transforms = correct_motion(data, gtab, AFFINE, progress=False)
    assert np.degrees(Rotation.from_matrix(transforms[:, :3, :3]).magnitude()).max() < 0.05
    np.testing.assert_allclose(np.linalg.norm(transforms[:, :3, 3], axis=1), 0.0, atol=0.05)
    np.testing.assert_allclose(rotated.bvecs, gtab.bvecs, atol=1e-3)
