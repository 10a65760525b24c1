"""Real lesion masks land where the template says, through each subject's warp."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from anomri.demo.anatomy import FourierField, RigidMotion, SubjectWarp, brain_grid, build_population, mni_tissues
from anomri.demo.lesions import LesionAtlas, mask_lesion_maps, packaged_masks
from anomri.errors import InputError

#: Two cubic lesions of 8 mm side in MNI space (mm), on a 2 mm LAS grid like the shipped masks.
CENTRES = np.array([[20.0, -10.0, 16.0], [-24.0, 20.0, 30.0]])
SIDE_MM = 8.0
MASK_AFFINE = np.array([[-2.0, 0, 0, 89.5], [0, 2.0, 0, -125.5], [0, 0, 2.0, -71.5], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> LesionAtlas:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in (91, 109, 91)], indexing="ij"), -1)
    xyz = ijk @ MASK_AFFINE[:3, :3].T + MASK_AFFINE[:3, 3]
    mask = np.zeros((91, 109, 91), np.uint8)
    for c in CENTRES:
        mask[np.all(np.abs(xyz - c) < SIDE_MM / 2, axis=-1)] = 1
    path = tmp_path_factory.mktemp("atlas") / "two_cubes.nii.gz"
    nib.save(nib.Nifti1Image(mask, MASK_AFFINE), path)
    return LesionAtlas.load(path)


@pytest.fixture(scope="module")
def population():
    wm, gm, csf, affine = mni_tissues()
    grid = brain_grid((wm + gm + csf) > 0, affine, 2.0)
    return build_population(grid, np.random.default_rng(0))


def _warp(population, nonlinear: bool) -> SubjectWarp:
    motion = RigidMotion(Rotation.from_euler("xyz", [4.0, -3.0, 5.0], degrees=True).as_matrix(),
                         np.array([2.0, -1.5, 1.0]), population.centre)
    displacement = FourierField.draw(np.random.default_rng(7), 3, 25.0) if nonlinear else None
    return SubjectWarp(motion, np.array([1.06, 0.95, 1.02]), displacement, 2.5 if nonlinear else 0.0)


def test_atlas_components(atlas: LesionAtlas) -> None:
    assert atlas.n_components == 2
    labels = atlas.component_at(CENTRES)
    assert sorted(labels) == [1, 2]
    # Every voxel belongs to its nearest lesion.
    assert list(atlas.component_at(CENTRES + [[3.0, 0, 0], [0, -3.0, 0]])) == list(labels)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_lesions_land_where_the_warp_takes_them(atlas: LesionAtlas, population, nonlinear: bool) -> None:
    warp = _warp(population, nonlinear)
    grid = population.grid
    inside = np.ones(grid.shape, bool)
    maps = mask_lesion_maps(atlas, warp, population, inside, np.array([0.3, 0.9]), t2_shine_through=True)
    labels = atlas.component_at(CENTRES)
    centres = grid.centres()
    mask_xyz = np.stack(np.meshgrid(*[np.arange(n) for n in atlas.fraction.shape], indexing="ij"), -1) \
        @ MASK_AFFINE[:3, :3].T + MASK_AFFINE[:3, 3]
    for label in labels:
        # The lesion's centroid in the template, from the mask voxels themselves.
        cube = (atlas.component == label) & (atlas.fraction > 0)
        centre = mask_xyz[cube].mean(0)
        mine = (maps.owner == label - 1) & (maps.fraction > 0)
        weights = maps.fraction * mine
        centroid = (centres * weights[..., None]).sum((0, 1, 2)) / weights.sum()
        # Where the subject's warp puts the template centroid (by its own inverse).
        expected = warp.from_template(centre, population)
        np.testing.assert_allclose(centroid, expected, atol=0.25)
        # Volume follows the warp's Jacobian (central differences of subject -> template at the lesion).
        step = 0.5
        jacobian = np.stack([(warp.to_template(expected + step * e, population)
                              - warp.to_template(expected - step * e, population)) / (2 * step) for e in np.eye(3)], 1)
        volume = weights.sum() * np.prod(grid.zooms)
        template_volume = cube.sum() * abs(np.linalg.det(MASK_AFFINE[:3, :3]))
        assert volume == pytest.approx(template_volume / abs(np.linalg.det(jacobian)), rel=0.06)
    # Severities reach the right lesions: the first label's lesion is the milder.
    assert maps.effects[0].intra_factor > maps.effects[1].intra_factor
    # Nothing far from the two lesions.
    far = ndimage.distance_transform_edt(maps.fraction == 0, sampling=grid.zooms)
    assert maps.fraction[far == 0].size and (maps.fraction > 0).sum() < 2 * (SIDE_MM / 2 + 4) ** 3


def test_from_template_inverts_to_template(population) -> None:
    warp = _warp(population, nonlinear=True)
    points = np.random.default_rng(1).uniform(-40, 40, (50, 3))
    np.testing.assert_allclose(warp.to_template(warp.from_template(points, population), population), points,
                               atol=1e-6)


def test_packaged_masks_are_real_lesion_fractions() -> None:
    paths = packaged_masks()
    assert [p.name for p in paths] == [f"patient{i:02d}_2mm.nii.gz" for i in (1, 5, 8, 10, 11)]
    assert (paths[0].parent / "README.md").read_text().count("CC-BY") >= 1
    atlas = LesionAtlas.load(paths[0])
    assert atlas.fraction.max() <= 1.0 and 0.0 < atlas.fraction.mean() < 0.01
    assert atlas.n_components > 20  # many separate lesions, as real MS masks have


def test_empty_or_bad_mask_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), path)
    with pytest.raises(InputError, match="no lesion voxel"):
        LesionAtlas.load(path)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="unreadable"):
        LesionAtlas.load(bad)
