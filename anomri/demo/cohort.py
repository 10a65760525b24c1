"""A physically credible synthetic BIDS diffusion-MRI cohort: healthy controls and MS-like patients.

The cohort is anomri's default input, so it mimics what a scanner delivers rather
than a toy image:

* **Anatomy** comes from the MNI ICBM152 2009a tissue templates that nilearn
  ships offline, averaged to the requested voxel size so every voxel carries
  partial volumes of white matter (WM), grey matter (GM) and CSF. Smooth random
  fields, shared by all subjects, set the WM fibre orientations, crossing
  bundles and the intra-axonal fraction; cortex has radial neurites.
* **Acquisition** uses a real multi-shell gradient table shipped by dipy, with
  several b0 volumes interleaved through the series as scanners do.
* **Signal** is a multi-compartment model evaluated per voxel and direction:
  WM = intra-axonal stick + extra-axonal zeppelin (tortuosity) + free-water
  ball, with orientation dispersion and, in part of the WM, a second crossing
  bundle; GM = isotropic hindered ball + a weak radial stick; CSF = free water.
  S0 follows from proton density and T1/T2 relaxation at the sequence's TR/TE,
  so CSF is bright and WM dark on b0 as in real data.
* **Subjects** differ by a small rigid head motion, diffusivity and S0 scaling,
  a smooth receive-coil sensitivity and their SNR; noise is Rician.
* **Lesions** (patients only) are soft-edged ellipsoids in deep WM with axonal
  loss, oedema (free water) and T2 prolongation; their partial-volume fraction
  is written as a probseg map and its >= 0.5 level as the ground-truth mask.

Everything is deterministic from one integer seed, down to the bytes of the
gzip streams.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
from scipy.special import expit

from anomri import __version__
from anomri.errors import InputError
from anomri.io.atomic import atomic_path, write_json, write_text

logger = logging.getLogger(__name__)

#: Gradient tables shipped in ``dipy/data/files`` (rows are q = b * g, comma separated).
SCHEMES = {"3shell": "gtab_3shell.txt", "isbi2013-2shell": "gtab_isbi2013_2shell.txt"}
#: Volumes with b below this are b0 (s/mm^2).
B0_THRESHOLD = 50.0

#: Free (CSF-like) water diffusivity at body temperature, mm^2/s. A physical constant of
#: water at 37 C, so unlike tissue diffusivities it is not varied between subjects.
D_FREE = 3.0e-3

# Sequence timing of a typical 3 T multi-shell protocol. The long TE that b = 3000+
# needs is what makes CSF so much brighter than WM on b0.
ECHO_TIME_S = 0.089
REPETITION_TIME_S = 4.2
#: (proton density, T1 s, T2 s) at 3 T, literature values.
RELAXATION = {"wm": (0.69, 0.85, 0.070), "gm": (0.80, 1.35, 0.085), "csf": (1.00, 4.2, 2.0)}
#: Mean WM b0 intensity of a subject before global scaling; scanners store ~1e3 in int16.
WM_S0 = 1500.0

#: Voxels of background kept around the brain's bounding box.
MARGIN_VOXELS = 2
#: Smoothness (correlation length, mm) of the population fibre-orientation fields.
FIBRE_CORRELATION_MM = 15.0
#: Half-angle of the cone of micro-bundles that models axonal orientation dispersion
#: (with the central bundle, E[sin^2] of a Watson distribution with kappa ~ 5, NODDI ODI ~ 0.12).
DISPERSION_DEG = 30.0
#: Crossing fibres: the second bundle's maximum share of the WM, and the share below
#: which it is not simulated.
CROSSING_MAX = 0.5
CROSSING_MIN = 0.01
#: Smoothness (mm) of the fields that modulate the crossing share and the intra-axonal fraction,
#: and the amplitude of the latter.
MODULATION_CORRELATION_MM = 12.0
F_INTRA_MODULATION = 0.04
#: Smoothing (mm) of the WM map whose gradient gives the radial orientation in cortex.
RADIAL_SMOOTHING_MM = 4.0

# Subject variability.
MAX_ROTATION_DEG = 3.0
MAX_TRANSLATION_MM = 2.0
DIFFUSIVITY_JITTER = 0.05
S0_JITTER = 0.15
COIL_JITTER = 0.06  # std of the linear/quadratic log-coefficients of the coil sensitivity
COIL_RADIUS_MM = 100.0

# Lesions.
N_LESIONS = (3, 10)
LESION_DIAMETER_MM = (3.0, 12.0)
LESION_MAX_ASPECT_LOG = 0.25  # semi-axes vary by up to exp(+-0.25) around the mean radius
LESION_EDGE_MM = 0.5  # logistic width of the tissue-level lesion border
LESION_SUBSAMPLE_MM = 0.75  # sub-voxel sampling step for the partial-volume fraction
LESION_SEED_WM = 0.8  # lesion centres lie where the WM fraction exceeds this
LESION_EDGE_CLEARANCE_MM = 6.0  # extra distance between a lesion and the brain surface
LESION_GAP_MM = 3.0  # minimum gap between two lesions
PLACEMENT_GRID_MM = 2.0

GZIP_LEVEL = 1  # noisy int16 barely compresses further; level 1 is ~4x faster than 6


# --------------------------------------------------------------------------------------
# Participants
# --------------------------------------------------------------------------------------


def demo_participants(n_controls: int = 6, n_patients: int = 4) -> list[tuple[str, str]]:
    """List the demo cohort's participants, controls first.

    Parameters
    ----------
    n_controls, n_patients : int
        Group sizes (>= 0).

    Returns
    -------
    list of (str, str)
        ``(participant_id, group)`` pairs such as ``("sub-C01", "control")`` and
        ``("sub-P01", "patient")``. Labels are zero-padded to at least two digits.
    """
    if n_controls < 0 or n_patients < 0:
        raise ValueError(f"group sizes must be >= 0, got {n_controls} controls and {n_patients} patients")
    width = max(2, len(str(max(n_controls, n_patients))))
    controls = [(f"sub-C{i:0{width}d}", "control") for i in range(1, n_controls + 1)]
    patients = [(f"sub-P{i:0{width}d}", "patient") for i in range(1, n_patients + 1)]
    return controls + patients


# --------------------------------------------------------------------------------------
# Acquisition
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquisition:
    """Gradient table of the simulated series.

    Attributes
    ----------
    bvals : ndarray, (V,)
        Integer-valued b-values, s/mm^2 (0 for b0 volumes).
    bvecs : ndarray, (V, 3)
        Unit gradient directions in scanner (RAS world) axes; zeros for b0.
    """

    bvals: np.ndarray
    bvecs: np.ndarray

    @property
    def is_b0(self) -> np.ndarray:
        """Boolean mask of the b0 volumes."""
        return self.bvals < B0_THRESHOLD


def _spread_subset(directions: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` well-spread axes among ``directions`` (N, 3), in table order.

    Greedy farthest-point sampling on the projective sphere (g and -g are the
    same measurement): each step adds the direction whose largest |cos| to the
    chosen ones is smallest. Starting from the first row makes it deterministic.
    """
    if k >= len(directions):
        return np.arange(len(directions))
    chosen = [0]
    closeness = np.abs(directions @ directions[0])
    for _ in range(k - 1):
        nxt = int(np.argmin(closeness))
        chosen.append(nxt)
        closeness = np.maximum(closeness, np.abs(directions @ directions[nxt]))
    return np.sort(chosen)


def load_scheme(scheme: str = "3shell", *, n_b0: int = 6, max_dirs_per_shell: int | None = 32) -> Acquisition:
    """Build the acquisition from a gradient table that dipy ships.

    Parameters
    ----------
    scheme : str
        A key of :data:`SCHEMES`.
    n_b0 : int
        Number of b0 volumes; they replace the table's b0 row and are spread at
        regular positions through the series (the first volume is a b0), which
        lets drift and motion be tracked as on real scanners.
    max_dirs_per_shell : int or None
        Keep at most this many well-spread directions per shell (None: all).

    Returns
    -------
    Acquisition
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    if n_b0 < 1:
        raise ValueError(f"n_b0 must be >= 1, got {n_b0}")
    if max_dirs_per_shell is not None and max_dirs_per_shell < 1:
        raise ValueError(f"max_dirs_per_shell must be >= 1 or None, got {max_dirs_per_shell}")
    table = resources.files("dipy") / "data" / "files" / SCHEMES[scheme]
    q = np.loadtxt(io.StringIO(table.read_text()), delimiter=",")
    b = np.linalg.norm(q, axis=1)
    weighted = np.flatnonzero(b >= B0_THRESHOLD)
    shell_of = np.round(b[weighted] / 100.0)  # shells are nominal multiples of 100 s/mm^2
    keep = []
    for shell in np.unique(shell_of):
        rows = weighted[shell_of == shell]
        k = len(rows) if max_dirs_per_shell is None else max_dirs_per_shell
        keep.extend(rows[_spread_subset(q[rows] / b[rows, None], k)])
    keep = np.sort(keep)

    n_volumes = len(keep) + n_b0
    b0_positions = np.round(np.arange(n_b0) * n_volumes / n_b0).astype(int)
    is_dw = np.ones(n_volumes, bool)
    is_dw[b0_positions] = False
    bvals = np.zeros(n_volumes)
    bvecs = np.zeros((n_volumes, 3))
    bvals[is_dw] = np.round(b[keep])
    bvecs[is_dw] = q[keep] / b[keep, None]
    return Acquisition(bvals=bvals, bvecs=bvecs)


# --------------------------------------------------------------------------------------
# Population anatomy
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """An axis-aligned RAS voxel grid (positive diagonal affine, world in mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def voxel_size(self) -> float:
        """Isotropic voxel size, mm."""
        return float(self.affine[0, 0])

    def centres(self) -> np.ndarray:
        """World coordinates of all voxel centres, (X, Y, Z, 3)."""
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), axis=-1)
        return ijk * self.voxel_size + self.affine[:3, 3]

    def to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous voxel coordinates of world points ``xyz`` (..., 3)."""
        return (xyz - self.affine[:3, 3]) / self.voxel_size


@lru_cache(maxsize=1)
def _mni_tissues() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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


def _brain_grid(mask: np.ndarray, affine: np.ndarray, voxel_size: float) -> Grid:
    """Grid at ``voxel_size`` covering the brain's bounding box plus a background margin."""
    idx = np.argwhere(mask)
    step = np.diag(affine)[:3]
    lo = affine[:3, 3] + (idx.min(0) - 0.5) * step  # outer faces of the extreme voxels
    hi = affine[:3, 3] + (idx.max(0) + 0.5) * step
    shape = tuple(int(n) for n in np.ceil((hi - lo) / voxel_size).astype(int) + 2 * MARGIN_VOXELS)
    grid_affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    grid_affine[:3, 3] = lo + (0.5 - MARGIN_VOXELS) * voxel_size
    return Grid(shape=shape, affine=grid_affine)


def _box_average(volume: np.ndarray, affine: np.ndarray, grid: Grid) -> np.ndarray:
    """Average a 1 mm ``volume`` over each voxel of ``grid`` (partial-volume downsampling).

    A box filter as wide as the target voxel followed by sampling at the target
    centres; for integer voxel sizes this is the exact block mean.
    """
    width = max(1, round(grid.voxel_size / affine[0, 0]))
    boxed = ndimage.uniform_filter(volume, size=width, mode="constant")
    # uniform_filter centres an even-width window half a voxel low; compensate.
    offset = 0.5 if width % 2 == 0 else 0.0
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
    """Anatomy shared by every subject ("the population"), before subject motion.

    Attributes
    ----------
    grid : Grid
        The acquisition grid (also every subject's image grid).
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
    seed_points, seed_depth : ndarray
        Candidate lesion centres in deep WM (M, 3) and their distance to the brain surface (M,).
    """

    grid: Grid
    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    radial: np.ndarray
    fibre_field: FourierField
    modulation_field: FourierField
    centre: np.ndarray
    seed_points: np.ndarray
    seed_depth: np.ndarray


@lru_cache(maxsize=1)
def _lesion_seeds() -> tuple[np.ndarray, np.ndarray]:
    """Deep-WM lesion centre candidates on a fixed 2 mm grid, with their depth in mm.

    A fixed grid makes a patient's lesions independent of the voxel size asked for.
    """
    wm, gm, csf, affine = _mni_tissues()
    grid = _brain_grid((wm + gm + csf) > 0, affine, PLACEMENT_GRID_MM)
    fractions = [_box_average(t, affine, grid) for t in (wm, gm, csf)]
    depth = ndimage.distance_transform_edt(sum(fractions) > 0.5, sampling=PLACEMENT_GRID_MM)
    seeds = (fractions[0] > LESION_SEED_WM) & (depth > LESION_EDGE_CLEARANCE_MM)
    points, depth = grid.centres()[seeds], depth[seeds]
    points.flags.writeable = depth.flags.writeable = False  # shared through the cache
    return points, depth


def build_population(voxel_size: float, rng: np.random.Generator) -> PopulationAnatomy:
    """Resample the MNI152 tissues to ``voxel_size`` and draw the shared orientation fields."""
    wm1, gm1, csf1, affine = _mni_tissues()
    grid = _brain_grid((wm1 + gm1 + csf1) > 0, affine, voxel_size)
    wm, gm, csf = (_box_average(t, affine, grid) for t in (wm1, gm1, csf1))
    total = wm + gm + csf
    centre = (grid.centres() * total[..., None]).sum((0, 1, 2)) / total.sum()
    sigma = RADIAL_SMOOTHING_MM / voxel_size
    # Derivative-of-Gaussian filters: the gradient of the smoothed WM map along each axis.
    radial = np.stack([ndimage.gaussian_filter(wm, sigma, order=[int(a == k) for a in range(3)]) for k in range(3)])
    seed_points, seed_depth = _lesion_seeds()
    return PopulationAnatomy(
        grid=grid,
        wm=wm,
        gm=gm,
        csf=csf,
        radial=radial,
        fibre_field=FourierField.draw(rng, 6, FIBRE_CORRELATION_MM),
        modulation_field=FourierField.draw(rng, 2, MODULATION_CORRELATION_MM),
        centre=centre,
        seed_points=seed_points,
        seed_depth=seed_depth,
    )


# --------------------------------------------------------------------------------------
# Microstructure and signal
# --------------------------------------------------------------------------------------


def relaxation_s0(tissue: str, t2_gain: float = 1.0) -> float:
    """b0 intensity of a pure ``tissue`` voxel at the protocol's TR/TE, WM scaled to :data:`WM_S0`.

    Spin-echo steady state PD * (1 - exp(-TR/T1)) * exp(-TE/T2); ``t2_gain``
    lengthens T2 (oedema and demyelination in lesions).
    """

    def weight(pd: float, t1: float, t2: float) -> float:
        return pd * (1 - np.exp(-REPETITION_TIME_S / t1)) * np.exp(-ECHO_TIME_S / t2)

    pd, t1, t2 = RELAXATION[tissue]
    return WM_S0 * weight(pd, t1, t2 * t2_gain) / weight(*RELAXATION["wm"])


@dataclass(frozen=True)
class Microstructure:
    """Compartment parameters of one subject (diffusivities in mm^2/s).

    Attributes
    ----------
    f_intra : float
        WM intra-axonal signal fraction (spatially modulated around this mean).
    f_free_wm : float
        WM free-water (ball) fraction.
    d_par : float
        Axial diffusivity of WM sticks and zeppelins; the zeppelin's radial
        diffusivity follows from tortuosity.
    dispersion_deg : float
        Axonal orientation dispersion (cone half-angle, degrees).
    d_gm, f_stick_gm : float
        GM hindered isotropic diffusivity, and the fraction of radial neurite sticks.
    d_free : float
        Free-water diffusivity.
    s0_wm, s0_gm, s0_csf : float
        b0 intensities of pure tissue voxels.
    """

    f_intra: float = 0.65
    f_free_wm: float = 0.05
    d_par: float = 1.9e-3
    dispersion_deg: float = DISPERSION_DEG
    d_gm: float = 0.85e-3
    f_stick_gm: float = 0.10
    d_free: float = D_FREE
    s0_wm: float = dataclasses.field(default_factory=lambda: relaxation_s0("wm"))
    s0_gm: float = dataclasses.field(default_factory=lambda: relaxation_s0("gm"))
    s0_csf: float = dataclasses.field(default_factory=lambda: relaxation_s0("csf"))

    def scaled(self, diffusivity: float, s0: float) -> Microstructure:
        """Copy with tissue diffusivities times ``diffusivity`` and all S0 times ``s0``."""
        return dataclasses.replace(
            self,
            d_par=self.d_par * diffusivity,
            d_gm=self.d_gm * diffusivity,
            s0_wm=self.s0_wm * s0,
            s0_gm=self.s0_gm * s0,
            s0_csf=self.s0_csf * s0,
        )


@dataclass(frozen=True)
class Lesion:
    """One MS-like lesion, in population (template) world coordinates.

    Attributes
    ----------
    centre : ndarray, (3,)
        mm.
    axes : ndarray, (3, 3)
        Columns are the ellipsoid's principal axes.
    semi_axes : ndarray, (3,)
        mm.
    intra_factor : float
        Multiplies the intra-axonal fraction (axonal loss).
    free_gain : float
        Added to the free-water fraction (oedema).
    d_ex_gain : float
        Multiplies the extra-axonal axial diffusivity (loss of hindrance).
    t2_gain : float
        Multiplies WM T2 (lesions are hyperintense on b0).
    """

    centre: np.ndarray
    axes: np.ndarray
    semi_axes: np.ndarray
    intra_factor: float
    free_gain: float
    d_ex_gain: float
    t2_gain: float


@dataclass
class VoxelTissue:
    """Per-voxel composition of N voxels (all fractions are of the voxel volume).

    Attributes
    ----------
    wm, gm, csf, lesion : ndarray, (N,)
        Tissue fractions; their sum is <= 1 (the rest is signal-free background).
    fibre, radial : ndarray, (N, 3)
        Unit WM fibre direction and GM radial direction, world axes.
    f_intra : ndarray, (N,)
        Local WM intra-axonal fraction.
    fibre2 : ndarray, (N, 3) or None
        Unit direction of a crossing WM bundle.
    crossing : ndarray, (N,) or None
        Share of the WM in the crossing bundle (None: a single bundle everywhere).
    lesion_id : ndarray of int, (N,) or None
        Index into ``lesions`` of the lesion filling each voxel (ignored where lesion == 0).
    lesions : tuple of Lesion
        The lesions referenced by ``lesion_id``.
    """

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    fibre: np.ndarray
    radial: np.ndarray
    f_intra: np.ndarray
    fibre2: np.ndarray | None = None
    crossing: np.ndarray | None = None
    lesion: np.ndarray | None = None
    lesion_id: np.ndarray | None = None
    lesions: tuple[Lesion, ...] = ()


def _column(x: float | np.ndarray) -> np.ndarray:
    """Per-voxel parameter as a float32 (N, 1) or (1, 1) column that broadcasts against (N, V).

    The (N, V) signal arrays are the cohort's largest; float32 halves their cost
    and is far more precise than the noise.
    """
    return np.atleast_1d(np.asarray(x, dtype=np.float32))[:, None]


def _dispersed(fibre: np.ndarray, angle_deg: float) -> np.ndarray:
    """Micro-bundle directions (K, N, 3): the fibre, plus 6 on a cone around it when angle > 0.

    Equal weights over the centre and a hexagonal cone are a 7-point quadrature of
    an axially symmetric orientation distribution.
    """
    if angle_deg == 0:
        return fibre[None]
    helper = np.where(np.abs(fibre[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    u = np.cross(fibre, helper)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = np.cross(fibre, u)
    phi = np.arange(6)[:, None, None] * np.pi / 3
    theta = np.radians(angle_deg)
    cone = np.cos(theta) * fibre + np.sin(theta) * (np.cos(phi) * u + np.sin(phi) * v)
    return np.concatenate([fibre[None], cone])


def white_matter_signal(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    fibre: np.ndarray,
    f_intra: float | np.ndarray,
    f_free: float | np.ndarray,
    d_par: float | np.ndarray,
    d_ex_par: float | np.ndarray,
    d_free: float = D_FREE,
    dispersion_deg: float = 0.0,
) -> np.ndarray:
    """Normalised stick + zeppelin + ball signal E = S/S0 of one bundle, float32 (N, V).

    The zeppelin's radial diffusivity follows the tortuosity model
    D_perp = D_ex_par * (1 - nu), nu = f_intra / (f_intra + f_extra): fewer axons
    leave the extra-axonal space less hindered. Orientation dispersion averages
    stick and zeppelin over micro-bundles around the mean direction; with
    ``dispersion_deg`` = 0 the model is the exact single-direction closed form.

    Parameters
    ----------
    bvals : ndarray, (V,)
    bvecs : ndarray, (V, 3)
        Unit gradient directions (any vector for b0).
    fibre : ndarray, (N, 3)
        Unit fibre directions.
    f_intra, f_free : float or ndarray (N,)
        Intra-axonal and free-water fractions; the extra-axonal fraction is the rest.
    d_par : float or ndarray (N,)
        Intra-axonal (stick) diffusivity.
    d_ex_par : float or ndarray (N,)
        Extra-axonal axial diffusivity.
    d_free : float
        Free-water diffusivity.
    dispersion_deg : float
        Half-angle of the cone of micro-bundles, degrees.
    """
    f_intra, f_free, d_par, d_ex_par = map(_column, (f_intra, f_free, d_par, d_ex_par))
    f_extra = 1.0 - f_intra - f_free
    d_perp = d_ex_par * f_extra / (f_intra + f_extra)
    b = _column(bvals).T
    # This loop dominates the cohort's run time, hence the in-place updates. The zeppelin
    # is factored as f_extra exp(-b D_perp) * exp(-b (D_par - D_perp) cos^2).
    stick_rate = -b * d_par
    zeppelin_rate = b * (d_perp - d_ex_par)
    zeppelin_base = f_extra * np.exp(-b * d_perp)
    bvecs32 = bvecs.T.astype(np.float32)
    directions = _dispersed(np.asarray(fibre, float), dispersion_deg).astype(np.float32)
    total = np.zeros((len(fibre), len(bvals)), np.float32)
    cos2, term = np.empty_like(total), np.empty_like(total)
    for direction in directions:
        np.square(np.matmul(direction, bvecs32, out=cos2), out=cos2)
        np.exp(np.multiply(cos2, stick_rate, out=term), out=term)
        total += np.multiply(term, f_intra, out=term)
        np.exp(np.multiply(cos2, zeppelin_rate, out=term), out=term)
        total += np.multiply(term, zeppelin_base, out=term)
    total /= len(directions)
    total += f_free * np.exp(-b * np.float32(d_free))
    return total


def grey_matter_signal(
    bvals: np.ndarray, bvecs: np.ndarray, radial: np.ndarray, f_stick: float, d_stick: float, d_iso: float
) -> np.ndarray:
    """Normalised GM signal, float32 (N, V): hindered ball plus a weak stick along the cortical radial axis."""
    f32 = np.float32
    cos2 = np.square(radial.astype(f32) @ bvecs.T.astype(f32))
    stick = np.exp(cos2 * (-bvals * d_stick).astype(f32), out=cos2)
    stick *= f_stick
    return stick + ((1.0 - f_stick) * np.exp(-bvals * d_iso)).astype(f32)


def free_water_signal(bvals: np.ndarray, d_free: float = D_FREE) -> np.ndarray:
    """Normalised free-water signal exp(-b D), shape (V,)."""
    return np.exp(-bvals * d_free)


def _wm_bundles(
    acq: Acquisition,
    tissue: VoxelTissue,
    rows: np.ndarray,
    micro: Microstructure,
    f_intra: np.ndarray,
    f_free: np.ndarray,
    d_ex_par: np.ndarray,
) -> np.ndarray:
    """Normalised WM signal (len(rows), V) of the voxels ``rows``: main bundle plus crossing bundle.

    The per-voxel parameters are given for ``rows`` only.
    """

    def bundle(sub: np.ndarray, fibre: np.ndarray) -> np.ndarray:
        return white_matter_signal(acq.bvals, acq.bvecs, fibre, f_intra[sub], f_free[sub], micro.d_par,
                                   d_ex_par[sub], micro.d_free, micro.dispersion_deg)

    signal = bundle(np.arange(len(rows)), tissue.fibre[rows])
    if tissue.crossing is None:
        return signal
    share = tissue.crossing[rows]
    sub = np.flatnonzero(share > CROSSING_MIN)  # most voxels have a single bundle: skip the rest
    if sub.size:
        w = share[sub, None]
        signal[sub] = (1 - w) * signal[sub] + w * bundle(sub, tissue.fibre2[rows[sub]])
    return signal


def simulate_signal(acq: Acquisition, tissue: VoxelTissue, micro: Microstructure) -> np.ndarray:
    """Noise-free signal of N voxels, float32 (N, V): the volume-weighted sum of the compartments.

    Lesion tissue is WM with fewer axons, more free water, a freer extra-axonal
    space and a longer T2, keeping the local fibre directions of the surviving axons.
    """
    bvals, bvecs = acq.bvals, acq.bvecs
    e_csf = free_water_signal(bvals, micro.d_free)
    signal = micro.s0_csf * _column(tissue.csf) * e_csf[None, :].astype(np.float32)
    # Each compartment only where its tissue is present.
    rows = np.flatnonzero(tissue.gm > 0)
    e_gm = grey_matter_signal(bvals, bvecs, tissue.radial[rows], micro.f_stick_gm, micro.d_par, micro.d_gm)
    signal[rows] += micro.s0_gm * _column(tissue.gm[rows]) * e_gm

    rows = np.flatnonzero(tissue.wm > 0)
    n = len(rows)
    e_wm = _wm_bundles(acq, tissue, rows, micro, tissue.f_intra[rows], np.full(n, micro.f_free_wm),
                       np.full(n, micro.d_par))
    signal[rows] += micro.s0_wm * _column(tissue.wm[rows]) * e_wm
    if tissue.lesion is None or not tissue.lesions:
        return signal

    rows = np.flatnonzero(tissue.lesion > 0)
    # Lesion S0 relative to the subject's WM S0: only T2 changes.
    params = np.array([
        [les.intra_factor, les.free_gain, les.d_ex_gain, relaxation_s0("wm", les.t2_gain) / relaxation_s0("wm")]
        for les in tissue.lesions
    ])
    intra, free, d_ex, s0_gain = params[tissue.lesion_id[rows]].T
    e_les = _wm_bundles(acq, tissue, rows, micro, tissue.f_intra[rows] * intra, micro.f_free_wm + free,
                        micro.d_par * d_ex)
    signal[rows] += _column(micro.s0_wm * s0_gain * tissue.lesion[rows]) * e_les
    return signal


# --------------------------------------------------------------------------------------
# Subjects
# --------------------------------------------------------------------------------------


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


def _draw_motion(rng: np.random.Generator, centre: np.ndarray) -> RigidMotion:
    """Rotation of up to a few degrees per axis and a translation of at most 2 mm."""
    angles = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0.0, MAX_TRANSLATION_MM)
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    return RigidMotion(rotation=rotation, translation=shift, centre=centre)


def _draw_lesions(rng: np.random.Generator, population: PopulationAnatomy) -> tuple[Lesion, ...]:
    """Draw 3-10 non-overlapping lesions centred in deep WM, away from the brain surface."""
    n = int(rng.integers(N_LESIONS[0], N_LESIONS[1] + 1))
    lesions: list[Lesion] = []
    for _ in range(n):
        radius = rng.uniform(*LESION_DIAMETER_MM) / 2
        aspect = rng.uniform(-LESION_MAX_ASPECT_LOG, LESION_MAX_ASPECT_LOG, 3)
        semi_axes = radius * np.exp(aspect - aspect.mean())  # same volume as a sphere of ``radius``
        reach = semi_axes.max()
        ok = population.seed_depth > reach + LESION_EDGE_CLEARANCE_MM
        for other in lesions:
            gap = np.linalg.norm(population.seed_points - other.centre, axis=1)
            ok &= gap > reach + other.semi_axes.max() + LESION_GAP_MM
        candidates = np.flatnonzero(ok)
        if candidates.size == 0:
            logger.warning("no room for another lesion; keeping %d", len(lesions))
            break
        jitter = rng.uniform(-PLACEMENT_GRID_MM / 2, PLACEMENT_GRID_MM / 2, 3)
        quaternion = rng.normal(size=4)  # normalised Gaussian 4-vector: a uniform random rotation
        lesions.append(
            Lesion(
                centre=population.seed_points[rng.choice(candidates)] + jitter,
                axes=Rotation.from_quat(quaternion / np.linalg.norm(quaternion)).as_matrix(),
                semi_axes=semi_axes,
                intra_factor=float(rng.uniform(0.2, 0.5)),
                free_gain=float(rng.uniform(0.2, 0.4)),
                d_ex_gain=float(rng.uniform(1.1, 1.3)),
                t2_gain=float(rng.uniform(1.2, 1.6)),
            )
        )
    return tuple(lesions)


def _lesion_partial_volume(lesion: Lesion, motion: RigidMotion, grid: Grid) -> tuple[tuple[slice, ...], np.ndarray]:
    """Fraction of each voxel near ``lesion`` that lies inside it, on the subject grid.

    The lesion border is a logistic over ~``LESION_EDGE_MM`` of tissue (lesions
    fade into normal-appearing WM); the voxel fraction is its mean over a
    sub-voxel lattice, which gives true partial volume at any voxel size.

    Returns
    -------
    box : tuple of slice
        The voxel box around the lesion.
    fraction : ndarray
        Partial-volume fraction in the box.
    """
    centre = motion.apply(lesion.centre)
    axes = motion.rotation @ lesion.axes
    vs = grid.voxel_size
    reach = (lesion.semi_axes.max() + 6 * LESION_EDGE_MM) / vs + 1
    mid = grid.to_voxel(centre)
    lo = np.clip(np.floor(mid - reach).astype(int), 0, grid.shape)
    hi = np.clip(np.ceil(mid + reach).astype(int) + 1, 0, grid.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    k = max(2, int(np.ceil(vs / LESION_SUBSAMPLE_MM)))
    lattice = ((np.arange(k) + 0.5) / k - 0.5) * vs
    offsets = np.stack(np.meshgrid(lattice, lattice, lattice, indexing="ij"), -1).reshape(-1, 3)
    points = (ijk * vs + grid.affine[:3, 3])[:, None, :] + offsets[None, :, :]
    local = (points - centre) @ axes  # coordinates along the ellipsoid's axes
    dist = np.linalg.norm(local, axis=-1)
    # Distance to the surface along the ray from the centre: |x| - r_surface(direction).
    unit = local / np.maximum(dist, 1e-9)[..., None]
    surface = 1.0 / np.linalg.norm(unit / lesion.semi_axes, axis=-1)
    inside = expit((surface - dist) / LESION_EDGE_MM)
    return box, inside.mean(-1).reshape(hi - lo)


@dataclass
class SubjectImages:
    """What one simulated scan writes.

    Attributes
    ----------
    dwi : ndarray of int16, (X, Y, Z, V)
    lesion_fraction : ndarray of float32 (X, Y, Z) or None
        Partial-volume lesion fraction (patients).
    lesion_mask : ndarray of uint8 (X, Y, Z) or None
        Ground truth (patients).
    parameters : dict
        Simulation parameters, for the JSON sidecar.
    """

    dwi: np.ndarray
    lesion_fraction: np.ndarray | None
    lesion_mask: np.ndarray | None
    parameters: dict[str, object]


def _unit(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Rows of ``v`` normalised; rows of (near) zero length become ``fallback``."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(norm > 1e-12, v / np.maximum(norm, 1e-12), fallback)


def _coil_sensitivity(rng: np.random.Generator, xyz: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Smooth receive-coil gain at ``xyz`` (N, 3): exp of a random quadratic, fixed to the scanner."""
    u = (xyz - centre) / COIL_RADIUS_MM
    terms = np.concatenate([u, u**2, u[:, [0, 0, 1]] * u[:, [1, 2, 2]]], axis=1)
    return np.exp(terms @ rng.normal(0.0, COIL_JITTER, terms.shape[1]))


def _lesion_maps(
    lesions: tuple[Lesion, ...], motion: RigidMotion, grid: Grid, parenchyma: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union lesion fraction, the lesion owning each voxel, and the ground-truth seeds.

    Returns
    -------
    union : ndarray, (X, Y, Z)
        1 - prod(1 - f_i): fraction of the voxel inside any lesion.
    owner : ndarray of int, (X, Y, Z)
        Index of the lesion with the largest fraction (-1 where none).
    seeds : ndarray of bool, (X, Y, Z)
        Each lesion's most lesioned voxel, so that even a lesion smaller than a
        voxel appears in the ground truth.
    """
    keep = np.ones(grid.shape)
    best = np.zeros(grid.shape)
    owner = np.full(grid.shape, -1, np.int16)
    seeds = np.zeros(grid.shape, bool)
    for i, lesion in enumerate(lesions):
        box, fraction = _lesion_partial_volume(lesion, motion, grid)
        keep[box] *= 1.0 - fraction
        wins = fraction > best[box]
        owner[box][wins] = i
        best[box] = np.maximum(best[box], fraction)
        peak = np.unravel_index(np.argmax(fraction * parenchyma[box]), fraction.shape)
        seeds[tuple(s.start + p for s, p in zip(box, peak))] = True
    return 1.0 - keep, owner, seeds


def simulate_subject(
    population: PopulationAnatomy,
    acq: Acquisition,
    rng: np.random.Generator,
    *,
    patient: bool,
    snr_range: tuple[float, float],
) -> SubjectImages:
    """Simulate one scan: move the population head, add lesions, synthesise signal and Rician noise."""
    grid = population.grid
    motion = _draw_motion(rng, population.centre)
    diffusivity_scale = rng.uniform(1 - DIFFUSIVITY_JITTER, 1 + DIFFUSIVITY_JITTER)
    s0_scale = rng.uniform(1 - S0_JITTER, 1 + S0_JITTER)
    snr = rng.uniform(*snr_range)
    micro = Microstructure().scaled(diffusivity_scale, s0_scale)

    # Where each subject voxel was in the template: sample the population maps there.
    subject_xyz = grid.centres()
    template_ijk = np.moveaxis(grid.to_voxel(motion.inverse(subject_xyz)), -1, 0)

    def sample(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, template_ijk, order=1, mode="constant", prefilter=False)

    wm, gm, csf = sample(population.wm), sample(population.gm), sample(population.csf)
    lesions = _draw_lesions(rng, population) if patient else ()
    union, owner, seeds = _lesion_maps(lesions, motion, grid, wm + gm)
    lesion = union * (wm + gm)  # lesions replace parenchyma, never CSF
    inside = (wm + gm + csf) > 1e-3

    xyz = subject_xyz[inside]
    template_xyz = motion.inverse(xyz)
    # Orientation fields live in the template; the head's rotation turns them.
    up = np.array([0.0, 0.0, 1.0])
    orientations = population.fibre_field(template_xyz)
    fibre = _unit(orientations[:, :3], up) @ motion.rotation.T
    fibre2 = _unit(orientations[:, 3:], up) @ motion.rotation.T
    modulation = np.clip(population.modulation_field(template_xyz), -2, 2)
    # A logistic of the smooth driver: about half of the WM carries a crossing bundle.
    crossing = CROSSING_MAX * expit(3.0 * (modulation[:, 0] - 0.3))
    radial_t = np.stack([sample(c)[inside] for c in population.radial], -1)
    radial = _unit(radial_t, up) @ motion.rotation.T
    tissue = VoxelTissue(
        wm=(wm * (1 - union))[inside],
        gm=(gm * (1 - union))[inside],
        csf=csf[inside],
        fibre=fibre,
        radial=radial,
        f_intra=micro.f_intra + F_INTRA_MODULATION * modulation[:, 1],
        fibre2=fibre2,
        crossing=crossing,
        lesion=lesion[inside],
        lesion_id=owner[inside],
        lesions=lesions,
    )
    signal = simulate_signal(acq, tissue, micro)
    signal *= _coil_sensitivity(rng, xyz, population.centre)[:, None]

    # SNR is defined on the mean b0 signal of WM voxels (as is usual for dMRI).
    core = (wm[inside] >= min(0.9, 0.9 * wm.max())) & (lesion[inside] == 0)
    sigma = float(signal[core][:, acq.is_b0].mean()) / snr
    shape = (*grid.shape, len(acq.bvals))
    # Rician magnitude |S + sigma (n1 + i n2)|, built in place: these are the largest arrays.
    real = rng.standard_normal(shape, dtype=np.float32)
    real *= sigma
    real[inside] += signal
    imag = rng.standard_normal(shape, dtype=np.float32)
    imag *= sigma
    magnitude = np.hypot(real, imag, out=real)
    np.clip(np.rint(magnitude, out=magnitude), 0, np.iinfo(np.int16).max, out=magnitude)
    dwi = magnitude.astype(np.int16)

    parameters = {
        "SNR": round(float(snr), 4),
        "NoiseSigma": round(sigma, 4),
        "RotationDeg": [round(float(a), 4) for a in Rotation.from_matrix(motion.rotation).as_euler("xyz", True)],
        "TranslationMm": [round(float(t), 4) for t in motion.translation],
        "S0Scale": round(float(s0_scale), 4),
        "DiffusivityScale": round(float(diffusivity_scale), 4),
        "NumberOfLesions": len(lesions),
    }
    if not patient:
        return SubjectImages(dwi=dwi, lesion_fraction=None, lesion_mask=None, parameters=parameters)
    mask = ((lesion >= 0.5) | seeds).astype(np.uint8)
    return SubjectImages(dwi=dwi, lesion_fraction=lesion.astype(np.float32), lesion_mask=mask, parameters=parameters)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

#: Images are stored left-to-right flipped (LAS, negative determinant) like dcm2niix
#: output: then FSL bvecs are plain voxel-axis components, and FSL, MRtrix and dipy
#: all read them the same way.
_RAS_TO_LAS = np.diag([-1.0, 1.0, 1.0])


def _las_affine(grid: Grid) -> np.ndarray:
    """Affine of ``grid`` after flipping its first voxel axis."""
    flip = np.eye(4)
    flip[0, 0] = -1.0
    flip[0, 3] = grid.shape[0] - 1
    return grid.affine @ flip


def _write_nifti(path: Path, data: np.ndarray, grid: Grid) -> None:
    """Write ``data`` (RAS voxel order) as LAS gzipped NIfTI, atomically and byte-reproducibly.

    The gzip stream is built here with mtime 0 so equal data give equal files.
    """
    affine = _las_affine(grid)
    img = nib.Nifti1Image(np.ascontiguousarray(data[::-1]), affine)
    img.header.set_data_dtype(data.dtype)
    img.set_sform(affine, code=1)  # 1 = scanner
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        img.header["pixdim"][4] = REPETITION_TIME_S
    img.header["descrip"] = b"anomri synthetic"
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0))


def _write_gradients(prefix: Path, acq: Acquisition) -> None:
    """FSL .bval (one row) and .bvec (three rows, voxel axes of the LAS image)."""
    bvecs = acq.bvecs @ _RAS_TO_LAS  # world -> voxel axes
    bvecs[acq.is_b0] = 0.0  # avoid "-0"
    write_text(prefix.with_name(prefix.name + ".bval"), " ".join(str(int(b)) for b in acq.bvals) + "\n")
    rows = [" ".join(f"{v:.6f}" for v in axis) for axis in bvecs.T]
    write_text(prefix.with_name(prefix.name + ".bvec"), "\n".join(rows) + "\n")


def _subject_seed(seed: int, purpose: int, group: str, index: int) -> np.random.Generator:
    """Independent stream per subject and purpose.

    Keyed on (group, index) rather than spawned in sequence, so adding controls
    does not change the patients.
    """
    key = (purpose, 0 if group == "control" else 1, index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


_STREAM_POPULATION, _STREAM_DEMOGRAPHICS, _STREAM_SCAN = 0, 1, 2


def _numbered(participants: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """``(participant_id, group, index)`` with the 1-based index within the group."""
    counts = {"control": 0, "patient": 0}
    numbered = []
    for pid, group in participants:
        counts[group] += 1
        numbered.append((pid, group, counts[group]))
    return numbered


def _demographics(seed: int, participants: list[tuple[str, str]]) -> list[dict[str, str]]:
    """participants.tsv rows; MS patients are ~70 % women, controls balanced."""
    rows = []
    for pid, group, index in _numbered(participants):
        rng = _subject_seed(seed, _STREAM_DEMOGRAPHICS, group, index)
        age = int(rng.integers(22, 61))
        sex = "F" if rng.random() < (0.7 if group == "patient" else 0.5) else "M"
        rows.append({"participant_id": pid, "group": group, "age": str(age), "sex": sex})
    return rows


def _write_dataset_files(out: Path, rows: list[dict[str, str]], description: str) -> None:
    """Top-level BIDS files of the raw dataset and of the lesion derivative."""
    generated_by = [{"Name": "anomri", "Version": __version__, "Description": description}]
    write_json(out / "dataset_description.json", {
        "Name": "anomri synthetic diffusion MRI demo cohort",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": generated_by,
        "ReferencesAndLinks": [
            "Fonov et al. (2011) NeuroImage 54:313-327, MNI ICBM152 2009a tissue templates (via nilearn)",
            "Gradient tables from dipy (dipy/data/files)",
        ],
    })
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["participant_id", "group", "age", "sex"], delimiter="\t",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "participants.tsv", buffer.getvalue())
    write_json(out / "participants.json", {
        "participant_id": {"Description": "Participant label"},
        "group": {"Description": "Diagnostic group",
                  "Levels": {"control": "healthy control", "patient": "MS-like patient with white-matter lesions"}},
        "age": {"Description": "Age at scan", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"F": "female", "M": "male"}},
    })
    write_text(out / "README", "Synthetic diffusion MRI cohort generated by anomri.demo.cohort.\n\n"
               + description + "\n\nGround-truth lesion masks are in derivatives/lesions.\n")
    write_json(out / "derivatives" / "lesions" / "dataset_description.json", {
        "Name": "anomri synthetic ground-truth lesions",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": generated_by,
    })


def _write_subject(out: Path, pid: str, images: SubjectImages, acq: Acquisition, grid: Grid) -> None:
    """DWI, gradients and sidecar; for patients also the lesion mask and fraction."""
    prefix = out / pid / "dwi" / f"{pid}_dwi"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _write_nifti(prefix.with_name(prefix.name + ".nii.gz"), images.dwi, grid)
    _write_gradients(prefix, acq)
    write_json(prefix.with_name(prefix.name + ".json"), {
        "Manufacturer": "anomri",
        "ManufacturersModelName": "synthetic multi-compartment simulator",
        "MagneticFieldStrength": 3,
        "EchoTime": ECHO_TIME_S,
        "RepetitionTime": REPETITION_TIME_S,
        "PhaseEncodingDirection": "j-",
        "TotalReadoutTime": 0.05,
        "SimulationParameters": images.parameters,
    })
    if images.lesion_mask is None:
        return
    les = out / "derivatives" / "lesions" / pid / "dwi" / f"{pid}_space-dwi_desc-lesion"
    les.parent.mkdir(parents=True, exist_ok=True)
    _write_nifti(les.with_name(les.name + "_mask.nii.gz"), images.lesion_mask, grid)
    _write_nifti(les.with_name(les.name + "_probseg.nii.gz"), images.lesion_fraction, grid)
    write_json(les.with_name(les.name + "_mask.json"), {
        "Type": "Lesion",
        "Sources": [f"bids:raw:{pid}/dwi/{pid}_dwi.nii.gz"],
        "Description": "Voxels whose lesion partial-volume fraction (probseg) is >= 0.5, plus the most "
                       "lesioned voxel of every lesion so that none is lost at coarse resolution.",
    })


def _prepare_out_dir(out: Path) -> None:
    # Empty folders are fine: Snakemake creates the folders of declared outputs
    # before the job runs. Existing files are never overwritten.
    if out.exists() and (not out.is_dir() or any(p.is_file() for p in out.rglob("*"))):
        raise InputError(out, "exists and holds files; the demo cohort needs a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)


def make_demo_cohort(
    out_dir: str | Path,
    *,
    n_controls: int = 6,
    n_patients: int = 4,
    voxel_size: float = 3.0,
    scheme: str = "3shell",
    n_b0: int = 6,
    snr: tuple[float, float] = (15.0, 40.0),
    seed: int = 0,
    max_dirs_per_shell: int | None = 32,
    workers: int = 2,
) -> Path:
    """Write a synthetic BIDS diffusion-MRI cohort of controls and MS-like patients.

    Parameters
    ----------
    out_dir : str or Path
        Dataset root; created, and must not exist or hold no files (empty folders are fine).
    n_controls, n_patients : int
        Group sizes.
    voxel_size : float
        Isotropic voxel size, mm (>= 1, the template resolution).
    scheme : str
        Gradient table, a key of :data:`SCHEMES`.
    n_b0 : int
        Number of interleaved b0 volumes.
    snr : (float, float)
        Range from which each subject's SNR (mean WM b0 / noise sigma) is drawn uniformly.
    seed : int
        Seed of everything random; the same seed gives byte-identical files.
    max_dirs_per_shell : int or None
        Subsample each shell to at most this many well-spread directions.
    workers : int
        Subjects simulated concurrently in threads (numpy and zlib release the GIL,
        so this uses as many cores). The output does not depend on it.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    InputError
        ``out_dir`` already holds files.
    ValueError
        An invalid parameter.
    """
    if voxel_size < 1.0:
        raise ValueError(f"voxel_size must be >= 1 mm (template resolution), got {voxel_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0 < snr[0] <= snr[1]:
        raise ValueError(f"snr must be a range (low, high) with 0 < low <= high, got {snr}")
    participants = demo_participants(n_controls, n_patients)
    acq = load_scheme(scheme, n_b0=n_b0, max_dirs_per_shell=max_dirs_per_shell)
    out = Path(out_dir)
    _prepare_out_dir(out)

    start = time.perf_counter()
    population = build_population(
        voxel_size, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_POPULATION,)))
    )
    logger.info("population anatomy on a %s grid at %.3g mm (%.1f s)", population.grid.shape, voxel_size,
                time.perf_counter() - start)
    description = (
        f"Multi-compartment diffusion simulation (WM stick+zeppelin+ball, GM ball+radial stick, CSF free water) "
        f"on MNI ICBM152 2009a tissue partial volumes; scheme {scheme} ({len(acq.bvals)} volumes, {n_b0} b0, "
        f"<= {max_dirs_per_shell} directions per shell), {voxel_size:g} mm isotropic voxels, "
        f"rigid motion <= {MAX_ROTATION_DEG:g} deg / {MAX_TRANSLATION_MM:g} mm, Rician noise with SNR "
        f"{snr[0]:g}-{snr[1]:g} (mean WM b0 / sigma), {N_LESIONS[0]}-{N_LESIONS[1]} lesions of "
        f"{LESION_DIAMETER_MM[0]:g}-{LESION_DIAMETER_MM[1]:g} mm per patient; seed {seed}."
    )
    _write_dataset_files(out, _demographics(seed, participants), description)

    def scan(pid: str, group: str, index: int) -> None:
        tic = time.perf_counter()
        rng = _subject_seed(seed, _STREAM_SCAN, group, index)
        images = simulate_subject(population, acq, rng, patient=group == "patient", snr_range=snr)
        _write_subject(out, pid, images, acq, population.grid)
        logger.info("%s (%s): SNR %.1f, %d lesions, %.1f s", pid, group, images.parameters["SNR"],
                    images.parameters["NumberOfLesions"], time.perf_counter() - tic)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(scan, *job) for job in _numbered(participants)]:
            future.result()  # re-raise the first failure
    logger.info("wrote %d participants to %s in %.1f s", len(participants), out, time.perf_counter() - start)
    return out
