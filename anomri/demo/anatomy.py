"""Anatomy of the synthetic cohort: the MNI152 template population and each subject's own head.

* The **population** is the MNI ICBM152 2009a tissue templates that nilearn
  ships offline, averaged to the simulation grid so every voxel carries
  partial volumes of white matter (WM), grey matter (GM) and CSF, plus smooth
  random fields, shared by everybody, for the WM fibre orientations, crossing
  bundles and the intra-axonal fraction.
* A **subject** is the population seen through a :class:`SubjectWarp`: a
  rigid pose, a per-axis scaling (head size), a smooth random nonlinear
  displacement of a few mm and, in patients, optional atrophy (ventricles
  pulled open, cortex thinned). The warp maps subject points to template
  points, so every subject map is sampled from the template where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

#: Voxels of background kept around the brain's bounding box.
MARGIN_VOXELS = 2
#: Smoothness (correlation length, mm) of the population fibre-orientation fields.
FIBRE_CORRELATION_MM = 15.0
#: Smoothness (mm) of the fields that modulate the crossing share and the intra-axonal fraction.
MODULATION_CORRELATION_MM = 12.0
#: Smoothing (mm) of the WM map whose gradient gives the radial orientation in cortex.
RADIAL_SMOOTHING_MM = 4.0
#: Smoothness (mm) of a subject's nonlinear displacement: brains differ in gyral and ventricular shape
#: over centimetres, not voxels.
WARP_CORRELATION_MM = 25.0
#: Ventricles are CSF deeper than this below the brain surface, mm.
VENTRICLE_DEPTH_MM = 15.0
#: Smoothing (mm) of the ventricle map whose gradient pulls the ventricles open in atrophy.
VENTRICLE_SMOOTHING_MM = 6.0
#: Cortex within this depth of the brain surface thins in atrophy, mm.
OUTER_CORTEX_MM = 4.0


@dataclass(frozen=True)
class Grid:
    """An axis-aligned RAS voxel grid (positive diagonal affine, world in mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def zooms(self) -> np.ndarray:
        """Voxel size per axis, mm."""
        return np.diag(self.affine)[:3].copy()

    @property
    def voxel_size(self) -> float:
        """Voxel size along the first axis, mm (the isotropic size of an isotropic grid)."""
        return float(self.affine[0, 0])

    def centres(self) -> np.ndarray:
        """World coordinates of all voxel centres, (X, Y, Z, 3)."""
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), axis=-1)
        return ijk * self.zooms + self.affine[:3, 3]

    def to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous voxel coordinates of world points ``xyz`` (..., 3)."""
        return (xyz - self.affine[:3, 3]) / self.zooms

    def refined(self, factor: int) -> Grid:
        """The grid ``factor`` times finer in plane (first two axes) whose voxel (f i, f j, k) is voxel (i, j, k)."""
        affine = self.affine.copy()
        affine[0, 0] /= factor
        affine[1, 1] /= factor
        return Grid(shape=(self.shape[0] * factor, self.shape[1] * factor, self.shape[2]), affine=affine)


@lru_cache(maxsize=1)
def mni_tissues() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1 mm MNI152 WM, GM, CSF fractions (skull-stripped, cropped to the brain) and their affine.

    CSF is the brain mask minus GM and WM, which also captures the ventricles.
    Cropping halves the cost of every filter and is exact, since all fractions
    are zero outside the brain. Cached because every cohort starts from the same templates.
    """
    from nilearn import datasets  # slow import, only needed here

    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    affine = wm_img.affine
    if not (np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) and (np.diag(affine)[:3] > 0).all()):
        raise RuntimeError(f"expected an axis-aligned RAS MNI template, got affine\n{affine}")
    # The templates hold small non-zero values in the skull and meninges; keep the brain only.
    wm = np.clip(np.asarray(wm_img.dataobj, np.float32), 0, 1) * mask
    gm = np.clip(np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, np.float32), 0, 1) * mask
    csf = np.clip(mask - wm - gm, 0, 1).astype(np.float32)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = affine.copy()
    affine[:3, 3] += lo * np.diag(affine)[:3]
    wm, gm, csf = (np.ascontiguousarray(t[crop]) for t in (wm, gm, csf))
    for arr in (wm, gm, csf):
        arr.flags.writeable = False
    return wm, gm, csf, affine


def brain_grid(mask: np.ndarray, affine: np.ndarray, voxel_size: float) -> Grid:
    """Grid at ``voxel_size`` covering the brain's bounding box plus a background margin."""
    idx = np.argwhere(mask)
    step = np.diag(affine)[:3]
    lo = affine[:3, 3] + (idx.min(0) - 0.5) * step  # outer faces of the extreme voxels
    hi = affine[:3, 3] + (idx.max(0) + 0.5) * step
    shape = tuple(int(n) for n in np.ceil((hi - lo) / voxel_size).astype(int) + 2 * MARGIN_VOXELS)
    grid_affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    grid_affine[:3, 3] = lo + (0.5 - MARGIN_VOXELS) * voxel_size
    return Grid(shape=shape, affine=grid_affine)


def box_average(volume: np.ndarray, affine: np.ndarray, grid: Grid) -> np.ndarray:
    """Average a 1 mm ``volume`` over each voxel of ``grid`` (partial-volume downsampling).

    A box filter as wide as the target voxel followed by sampling at the target
    centres; for integer voxel sizes this is the exact block mean.
    """
    widths = [max(1, round(z / affine[0, 0])) for z in grid.zooms]
    boxed = ndimage.uniform_filter(volume, size=widths, mode="constant")
    # uniform_filter centres an even-width window half a voxel low; compensate.
    offset = np.array([0.5 if w % 2 == 0 else 0.0 for w in widths])
    ijk = (grid.centres() - affine[:3, 3]) / np.diag(affine)[:3] + offset
    return ndimage.map_coordinates(boxed, np.moveaxis(ijk, -1, 0), order=1, mode="constant", prefilter=False)


@dataclass(frozen=True)
class FourierField:
    """A smooth Gaussian random field that can be evaluated at any world point.

    A sum of random plane waves with Gaussian-distributed wave vectors, which
    has a Gaussian covariance exp(-r^2 / 2 l^2) and unit variance per component.
    Being analytic, it needs no grid: a moved head samples it exactly.
    """

    wavevectors: np.ndarray  # (K, 3), rad/mm
    phases: np.ndarray  # (K,)
    amplitudes: np.ndarray  # (K, D)

    @classmethod
    def draw(cls, rng: np.random.Generator, dim: int, correlation_mm: float, n_modes: int = 64) -> FourierField:
        """Draw a field with ``dim`` components and correlation length ``correlation_mm``."""
        return cls(
            wavevectors=rng.normal(0.0, 1.0 / correlation_mm, (n_modes, 3)),
            phases=rng.uniform(0.0, 2 * np.pi, n_modes),
            amplitudes=rng.normal(0.0, np.sqrt(2.0 / n_modes), (n_modes, dim)),
        )

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        """Field values at world points ``xyz`` (N, 3), shape (N, D)."""
        return np.cos(xyz @ self.wavevectors.T + self.phases) @ self.amplitudes


@dataclass(frozen=True)
class PopulationAnatomy:
    """Anatomy shared by every subject ("the population"), in template space.

    Attributes
    ----------
    grid : Grid
        The simulation grid (also every subject's image grid).
    wm, gm, csf : ndarray, (X, Y, Z)
        Partial-volume tissue fractions on ``grid``.
    radial : ndarray, (3, X, Y, Z)
        Un-normalised direction normal to the cortical layers (gradient of smoothed WM).
    fibre_field : FourierField
        Orientations (un-normalised, 6-D) of the main WM bundle and of a crossing bundle.
    modulation_field : FourierField
        Unit-variance drivers (2-D) of the crossing bundle's share and of the intra-axonal fraction.
    centre : ndarray, (3,)
        Brain centroid, mm: the pivot of head motion.
    ventricle_pull : ndarray, (3, X, Y, Z)
        Unit-peak gradient of the smoothed ventricle map: moving a sampling
        point along it samples closer to the ventricles, so they look larger.
    outer_cortex : ndarray, (X, Y, Z)
        Share of each voxel's GM that lies in the outer cortex, which thins in atrophy.
    """

    grid: Grid
    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    radial: np.ndarray
    fibre_field: FourierField
    modulation_field: FourierField
    centre: np.ndarray
    ventricle_pull: np.ndarray
    outer_cortex: np.ndarray


def build_population(grid: Grid, rng: np.random.Generator) -> PopulationAnatomy:
    """Resample the MNI152 tissues to ``grid`` and draw the shared orientation fields."""
    wm1, gm1, csf1, affine = mni_tissues()
    wm, gm, csf = (box_average(t, affine, grid) for t in (wm1, gm1, csf1))
    total = wm + gm + csf
    centre = (grid.centres() * total[..., None]).sum((0, 1, 2)) / total.sum()
    sigma = RADIAL_SMOOTHING_MM / grid.zooms
    # Derivative-of-Gaussian filters: the gradient of the smoothed WM map along each axis.
    radial = np.stack([ndimage.gaussian_filter(wm, sigma, order=[int(a == k) for a in range(3)]) for k in range(3)])
    depth = ndimage.distance_transform_edt(total > 0.5, sampling=grid.zooms)
    ventricles = ndimage.gaussian_filter(((csf > 0.5) & (depth > VENTRICLE_DEPTH_MM)).astype(np.float32),
                                         VENTRICLE_SMOOTHING_MM / grid.zooms)
    pull = np.stack(np.gradient(ventricles, *grid.zooms))
    pull /= max(float(np.linalg.norm(pull, axis=0).max()), 1e-12)
    outer = np.clip(1.0 - depth / OUTER_CORTEX_MM, 0.0, 1.0) * (gm > 0)
    return PopulationAnatomy(
        grid=grid,
        wm=wm,
        gm=gm,
        csf=csf,
        radial=radial,
        fibre_field=FourierField.draw(rng, 6, FIBRE_CORRELATION_MM),
        modulation_field=FourierField.draw(rng, 2, MODULATION_CORRELATION_MM),
        centre=centre,
        ventricle_pull=pull.astype(np.float32),
        outer_cortex=outer.astype(np.float32),
    )


@dataclass(frozen=True)
class RigidMotion:
    """Head position: x_subject = R (x_template - c) + c + t."""

    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,), mm
    centre: np.ndarray  # (3,), mm

    def apply(self, xyz: np.ndarray) -> np.ndarray:
        """Template to subject world coordinates, (..., 3)."""
        return (xyz - self.centre) @ self.rotation.T + self.centre + self.translation

    def inverse(self, xyz: np.ndarray) -> np.ndarray:
        """Subject to template world coordinates, (..., 3)."""
        return (xyz - self.centre - self.translation) @ self.rotation + self.centre

    @classmethod
    def draw(cls, rng: np.random.Generator, centre: np.ndarray, max_rotation_deg: float,
             max_translation_mm: float) -> RigidMotion:
        """Rotation of up to ``max_rotation_deg`` per axis and a translation of at most ``max_translation_mm``."""
        angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
        direction = rng.normal(size=3)
        shift = direction / np.linalg.norm(direction) * rng.uniform(0.0, max_translation_mm)
        rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        return cls(rotation=rotation, translation=shift, centre=centre)


@dataclass(frozen=True)
class SubjectWarp:
    """Where each point of a subject's head was in the template.

    x_template = A^-1(x) + a d(A^-1(x)) + v(.), with A the subject's pose and
    head size (``motion`` after ``scaling`` about the brain centre), d a unit
    smooth random displacement field of amplitude a = ``displacement_mm`` and
    v the atrophy pull towards the ventricles (``ventricle_mm``). With unit
    scaling and no displacement or atrophy it is the rigid pose alone.

    Attributes
    ----------
    motion : RigidMotion
    scaling : ndarray, (3,)
        Subject size over template size, per template axis.
    displacement : FourierField or None
        3-component field with unit variance per component.
    displacement_mm : float
    ventricle_mm : float
        Largest atrophy displacement, mm (0 = none).
    cortex_thinning : float
        Fraction of the outer cortex's GM replaced by CSF (0 = none).
    """

    motion: RigidMotion
    scaling: np.ndarray = field(default_factory=lambda: np.ones(3))
    displacement: FourierField | None = None
    displacement_mm: float = 0.0
    ventricle_mm: float = 0.0
    cortex_thinning: float = 0.0

    @property
    def is_rigid(self) -> bool:
        """Whether the warp is the rigid pose alone."""
        return (np.all(self.scaling == 1.0) and (self.displacement is None or self.displacement_mm == 0)
                and self.ventricle_mm == 0)

    def to_template(self, xyz: np.ndarray, population: PopulationAnatomy | None = None) -> np.ndarray:
        """Template world coordinates of subject points ``xyz`` (N, 3).

        ``population`` supplies the ventricle map for atrophy (needed when ``ventricle_mm`` > 0).
        """
        y = self.motion.inverse(xyz)
        if self.is_rigid:
            return y
        c = self.motion.centre
        y = c + (y - c) / self.scaling
        if self.displacement is not None and self.displacement_mm:
            y = y + self.displacement_mm * self.displacement(y)
        if self.ventricle_mm:
            if population is None:
                raise ValueError("atrophy needs the population's ventricle map")
            ijk = np.moveaxis(population.grid.to_voxel(y), -1, 0)
            pull = np.stack([ndimage.map_coordinates(p, ijk, order=1, mode="constant") for p in
                             population.ventricle_pull], -1)
            y = y + self.ventricle_mm * pull
        return y

    def from_template(self, xyz: np.ndarray, population: PopulationAnatomy | None = None,
                      iterations: int = 20) -> np.ndarray:
        """Subject coordinates of template points ``xyz`` (..., 3): the inverse of :meth:`to_template`.

        Exact for a rigid warp; otherwise a fixed-point iteration, which
        converges because the nonlinear part is small and smooth.
        """
        if self.is_rigid:
            return self.motion.apply(xyz)
        target = np.asarray(xyz, float).reshape(-1, 3)
        x = self.motion.apply(self.motion.centre + (target - self.motion.centre) * self.scaling)
        jacobian = self.motion.rotation * self.scaling  # d x / d y of the affine part
        for _ in range(iterations):
            x = x + (target - self.to_template(x, population)) @ jacobian.T
        return x.reshape(np.shape(xyz))

    def record(self) -> dict[str, object]:
        """Pose and shape parameters, for the sidecar."""
        out: dict[str, object] = {
            "RotationDeg": [round(float(a), 4) for a in Rotation.from_matrix(self.motion.rotation).as_euler("xyz", True)],
            "TranslationMm": [round(float(t), 4) for t in self.motion.translation],
        }
        if not self.is_rigid:
            out |= {"HeadScaling": [round(float(s), 4) for s in self.scaling],
                    "WarpAmplitudeMm": round(float(self.displacement_mm), 4),
                    "VentricleEnlargementMm": round(float(self.ventricle_mm), 4),
                    "CortexThinning": round(float(self.cortex_thinning), 4)}
        return out
