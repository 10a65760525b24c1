"""Lesions of the synthetic patients: real MS lesion geometry, or soft-edged ellipsoids.

* **Real MS masks** (the default): consensus white-matter lesion masks of
  real multiple-sclerosis patients in MNI152 space (Lesjak et al. 2018,
  CC-BY; see ``anomri/demo/data/ms_lesions/README.md``) are pulled back
  through each patient's :class:`~anomri.demo.anatomy.SubjectWarp`, so they
  sit where MS lesions really sit (periventricular, juxtacortical, deep,
  infratentorial, confluent) in every subject's own anatomy. Each connected
  lesion gets its own severity, from barely visible to a "black hole".
* **Blobs** (the earlier cohorts): 3-10 ellipsoids in deep WM, away from the
  brain surface.

Either way a lesion's partial-volume fraction is the mean of its
sub-voxel samples, so small lesions fade into a few partially lesioned voxels
as they do at clinical resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
from scipy.special import expit

from anomri.demo.anatomy import Grid, PopulationAnatomy, SubjectWarp, box_average, brain_grid, mni_tissues
from anomri.demo.tissue import LesionEffect
from anomri.errors import InputError

logger = logging.getLogger(__name__)

# Blob lesions.
N_LESIONS = (3, 10)
LESION_DIAMETER_MM = (3.0, 12.0)
LESION_MAX_ASPECT_LOG = 0.25  # semi-axes vary by up to exp(+-0.25) around the mean radius
LESION_EDGE_MM = 0.5  # logistic width of the tissue-level lesion border
LESION_SUBSAMPLE_MM = 0.75  # sub-voxel sampling step for the partial-volume fraction
LESION_SEED_WM = 0.8  # lesion centres lie where the WM fraction exceeds this
LESION_EDGE_CLEARANCE_MM = 6.0  # extra distance between a lesion and the brain surface
LESION_GAP_MM = 3.0  # minimum gap between two lesions
PLACEMENT_GRID_MM = 2.0

#: Masks shipped with the package (2 mm fractions of five of the real masks; see the README there).
PACKAGED_MASKS = "ms_lesions"


@dataclass(frozen=True)
class BlobLesion:
    """One ellipsoidal lesion, in template world coordinates.

    Attributes
    ----------
    centre : ndarray, (3,)
        mm.
    axes : ndarray, (3, 3)
        Columns are the ellipsoid's principal axes.
    semi_axes : ndarray, (3,)
        mm.
    effect : LesionEffect
    """

    centre: np.ndarray
    axes: np.ndarray
    semi_axes: np.ndarray
    effect: LesionEffect


@lru_cache(maxsize=1)
def _blob_seeds() -> tuple[np.ndarray, np.ndarray]:
    """Deep-WM lesion centre candidates on a fixed 2 mm grid, with their depth in mm.

    A fixed grid makes a patient's lesions independent of the voxel size asked for.
    """
    wm, gm, csf, affine = mni_tissues()
    grid = brain_grid((wm + gm + csf) > 0, affine, PLACEMENT_GRID_MM)
    fractions = [box_average(t, affine, grid) for t in (wm, gm, csf)]
    depth = ndimage.distance_transform_edt(sum(fractions) > 0.5, sampling=PLACEMENT_GRID_MM)
    seeds = (fractions[0] > LESION_SEED_WM) & (depth > LESION_EDGE_CLEARANCE_MM)
    points, depth = grid.centres()[seeds], depth[seeds]
    points.flags.writeable = depth.flags.writeable = False  # shared through the cache
    return points, depth


def draw_blob_lesions(rng: np.random.Generator) -> tuple[BlobLesion, ...]:
    """Draw 3-10 non-overlapping lesions centred in deep WM, away from the brain surface."""
    seed_points, seed_depth = _blob_seeds()
    n = int(rng.integers(N_LESIONS[0], N_LESIONS[1] + 1))
    lesions: list[BlobLesion] = []
    for _ in range(n):
        radius = rng.uniform(*LESION_DIAMETER_MM) / 2
        aspect = rng.uniform(-LESION_MAX_ASPECT_LOG, LESION_MAX_ASPECT_LOG, 3)
        semi_axes = radius * np.exp(aspect - aspect.mean())  # same volume as a sphere of ``radius``
        reach = semi_axes.max()
        ok = seed_depth > reach + LESION_EDGE_CLEARANCE_MM
        for other in lesions:
            gap = np.linalg.norm(seed_points - other.centre, axis=1)
            ok &= gap > reach + other.semi_axes.max() + LESION_GAP_MM
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            logger.warning("no room for another lesion; keeping %d", len(lesions))
            break
        jitter = rng.uniform(-PLACEMENT_GRID_MM / 2, PLACEMENT_GRID_MM / 2, 3)
        quaternion = rng.normal(size=4)  # normalised Gaussian 4-vector: a uniform random rotation
        centre = seed_points[rng.choice(candidates)] + jitter
        lesions.append(BlobLesion(
            centre=centre,
            axes=Rotation.from_quat(quaternion / np.linalg.norm(quaternion)).as_matrix(),
            semi_axes=semi_axes,
            effect=LesionEffect(intra_factor=float(rng.uniform(0.2, 0.5)), free_gain=float(rng.uniform(0.2, 0.4)),
                                d_ex_gain=float(rng.uniform(1.1, 1.3)), t2_gain=float(rng.uniform(1.2, 1.6))),
        ))
    return tuple(lesions)


def _lattice(zooms: np.ndarray, step_mm: float) -> np.ndarray:
    """Offsets (K, 3) of a regular sub-voxel lattice, at most ``step_mm`` apart and at least 2 per axis."""
    axes = []
    for z in zooms:
        k = max(2, int(np.ceil(z / step_mm)))
        axes.append(((np.arange(k) + 0.5) / k - 0.5) * z)
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _blob_partial_volume(lesion: BlobLesion, warp: SubjectWarp, population: PopulationAnatomy
                         ) -> tuple[tuple[slice, ...], np.ndarray]:
    """Fraction of each voxel near ``lesion`` that lies inside it, on the subject grid.

    The lesion border is a logistic over ~``LESION_EDGE_MM`` of tissue (lesions
    fade into normal-appearing WM); the voxel fraction is its mean over a
    sub-voxel lattice, which gives true partial volume at any voxel size. The
    ellipsoid moves with the subject's pose and, under a nonlinear warp, with
    the warp at its centre (it is small against the warp's smoothness).

    Returns
    -------
    box : tuple of slice
        The voxel box around the lesion.
    fraction : ndarray
        Partial-volume fraction in the box.
    """
    grid = population.grid
    centre = warp.from_template(lesion.centre, population)
    axes = warp.motion.rotation @ lesion.axes
    zooms = grid.zooms
    reach = (lesion.semi_axes.max() + 6 * LESION_EDGE_MM) / zooms + 1
    mid = grid.to_voxel(centre)
    lo = np.clip(np.floor(mid - reach).astype(int), 0, grid.shape)
    hi = np.clip(np.ceil(mid + reach).astype(int) + 1, 0, grid.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    points = (ijk * zooms + grid.affine[:3, 3])[:, None, :] + _lattice(zooms, LESION_SUBSAMPLE_MM)[None, :, :]
    local = (points - centre) @ axes  # coordinates along the ellipsoid's axes
    dist = np.linalg.norm(local, axis=-1)
    # Distance to the surface along the ray from the centre: |x| - r_surface(direction).
    unit = local / np.maximum(dist, 1e-9)[..., None]
    surface = 1.0 / np.linalg.norm(unit / lesion.semi_axes, axis=-1)
    inside = expit((surface - dist) / LESION_EDGE_MM)
    return box, inside.mean(-1).reshape(hi - lo)


@dataclass(frozen=True)
class LesionMaps:
    """A patient's lesions on the subject grid.

    Attributes
    ----------
    fraction : ndarray, (X, Y, Z)
        Fraction of each voxel inside any lesion (before restricting to parenchyma).
    owner : ndarray of int, (X, Y, Z)
        Index into ``effects`` of the lesion dominating each voxel (-1 where none).
    effects : tuple of LesionEffect
        One per lesion.
    seeds : ndarray of bool, (X, Y, Z) or None
        Voxels that join the ground truth whatever their fraction (blobs: each
        lesion's most lesioned voxel, so that even a sub-voxel lesion counts).
    """

    fraction: np.ndarray
    owner: np.ndarray
    effects: tuple[LesionEffect, ...]
    seeds: np.ndarray | None = None


def blob_lesion_maps(lesions: tuple[BlobLesion, ...], warp: SubjectWarp, population: PopulationAnatomy,
                     parenchyma: np.ndarray) -> LesionMaps:
    """Union fraction 1 - prod(1 - f_i), owners and ground-truth seeds of ellipsoidal lesions."""
    shape = population.grid.shape
    keep = np.ones(shape)
    best = np.zeros(shape)
    owner = np.full(shape, -1, np.int16)
    seeds = np.zeros(shape, bool)
    for i, lesion in enumerate(lesions):
        box, fraction = _blob_partial_volume(lesion, warp, population)
        keep[box] *= 1.0 - fraction
        wins = fraction > best[box]
        owner[box][wins] = i
        best[box] = np.maximum(best[box], fraction)
        peak = np.unravel_index(np.argmax(fraction * parenchyma[box]), fraction.shape)
        seeds[tuple(s.start + p for s, p in zip(box, peak))] = True
    return LesionMaps(1.0 - keep, owner, tuple(les.effect for les in lesions), seeds)


# --------------------------------------------------------------------------------------
# Real lesion masks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionAtlas:
    """One real patient's lesion mask in MNI space, split into its connected lesions.

    Attributes
    ----------
    name : str
        File name stem, e.g. ``patient01``.
    fraction : ndarray, (I, J, K) float32
        Lesion fraction of every mask voxel in [0, 1] (binary masks are 0/1).
    affine : ndarray, (4, 4)
        Mask voxel to MNI world (mm); any orientation.
    component : ndarray, (I, J, K) int32
        Label 1..n of the connected lesion (26-connectivity of fraction >= 0.5)
        nearest to every voxel, so that partially lesioned voxels next to a
        lesion belong to it.
    n_components : int
    """

    name: str
    fraction: np.ndarray
    affine: np.ndarray
    component: np.ndarray
    n_components: int

    @classmethod
    def load(cls, path: str | Path) -> LesionAtlas:
        """Read a lesion mask: binary (uint8 0/1), a fraction in [0, 1], or a fraction scaled to 0-255 (uint8).

        Raises
        ------
        InputError
            Unreadable, not 3-D, or without any lesion voxel.
        """
        path = Path(path)
        try:
            img = nib.load(path)
            data = np.asarray(img.dataobj, np.float32)
        except Exception as exc:  # nibabel raises many types for a bad file
            raise InputError(path, f"unreadable lesion mask ({' '.join(str(exc).split())})") from exc
        if data.ndim != 3:
            raise InputError(path, f"a lesion mask must be 3-D, got shape {data.shape}")
        if data.max() > 1.0:
            data = data / 255.0  # fractions stored as uint8
        lesion = data >= 0.5
        if not lesion.any():
            raise InputError(path, "the lesion mask holds no lesion voxel")
        labels, n = ndimage.label(lesion, np.ones((3, 3, 3), bool))
        # Every voxel takes the label of its nearest lesion voxel.
        nearest = ndimage.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
        component = labels[tuple(nearest)].astype(np.int32)
        return cls(path.name.split(".")[0], np.clip(data, 0.0, 1.0), img.affine, component, int(n))

    def sample(self, template_xyz: np.ndarray, order: int = 1) -> np.ndarray:
        """Lesion fraction at template points (N, 3) (trilinear; 0 outside the mask's field of view)."""
        ijk = (template_xyz - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T
        return ndimage.map_coordinates(self.fraction, ijk.T, order=order, mode="constant", cval=0.0,
                                       prefilter=False)

    def component_at(self, template_xyz: np.ndarray) -> np.ndarray:
        """Label (1..n) of the lesion nearest to each template point (N, 3)."""
        ijk = (template_xyz - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T
        ijk = np.clip(np.rint(ijk).astype(int), 0, np.array(self.component.shape) - 1)
        return self.component[tuple(ijk.T)]


def packaged_masks() -> list[Path]:
    """The lesion masks shipped with anomri (2 mm fractions of real MS masks), sorted by name."""
    folder = resources.files("anomri.demo") / "data" / PACKAGED_MASKS
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".nii.gz"))


def mask_lesion_maps(atlas: LesionAtlas, warp: SubjectWarp, population: PopulationAnatomy, inside: np.ndarray,
                     severities: np.ndarray, t2_shine_through: bool) -> LesionMaps:
    """A real lesion mask pulled back through a subject's warp, with one severity per connected lesion.

    The fraction of a voxel is the mean of the mask over a sub-voxel lattice
    of the voxel (each lattice point mapped to the template), computed only
    where the voxel-centre sample shows a lesion within reach.

    Parameters
    ----------
    atlas : LesionAtlas
    warp : SubjectWarp
    population : PopulationAnatomy
    inside : ndarray of bool, (X, Y, Z)
        Voxels where tissue may be (the rest keeps fraction 0).
    severities : ndarray, (n_components,)
        Severity in [0, 1] of every connected lesion of the atlas.
    t2_shine_through : bool
        Whether lesions lengthen T2 (bright on b0).
    """
    grid = population.grid
    centres = grid.centres()[inside]
    template = warp.to_template(centres, population)
    # A dilated mask at voxel centres finds every voxel that a lesion may reach.
    reach_mm = float(np.linalg.norm(grid.zooms)) / 2 + 1.0
    reach_vox = np.abs(np.linalg.inv(atlas.affine[:3, :3])).sum(1) * reach_mm
    near = ndimage.maximum_filter(atlas.fraction, size=tuple(int(2 * np.ceil(r) + 1) for r in reach_vox))
    coarse = ndimage.map_coordinates(
        near, ((template - atlas.affine[:3, 3]) @ np.linalg.inv(atlas.affine[:3, :3]).T).T, order=0, mode="constant")
    rows = np.flatnonzero(coarse > 0)
    fraction = np.zeros(len(centres), np.float32)
    if rows.size:
        mask_zoom = float(np.abs(np.linalg.det(atlas.affine[:3, :3])) ** (1 / 3))
        offsets = _lattice(grid.zooms, max(mask_zoom, 0.5))
        points = (centres[rows, None, :] + offsets[None]).reshape(-1, 3)
        samples = atlas.sample(warp.to_template(points, population))
        fraction[rows] = samples.reshape(len(rows), len(offsets)).mean(1)
    volume = np.zeros(grid.shape, np.float32)
    volume[inside] = fraction
    owner = np.full(grid.shape, -1, np.int16)
    owner[inside] = atlas.component_at(template) - 1
    owner[volume <= 0] = -1
    effects = tuple(LesionEffect.from_severity(s, t2_shine_through) for s in severities)
    return LesionMaps(volume, owner, effects)
