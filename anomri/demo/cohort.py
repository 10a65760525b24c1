"""A synthetic BIDS diffusion-MRI cohort of healthy controls and MS patients that a dMRI researcher would accept.

anomri's default input, built to mimic what a scanner delivers from real brains:

* **Anatomy** (:mod:`~anomri.demo.anatomy`): the MNI152 tissue templates
  seen through each subject's own warp: pose, head size, a smooth nonlinear
  displacement of a few mm and, in patients, optional atrophy.
* **Tissue signal** (:mod:`~anomri.demo.tissue`): a multi-compartment model
  per voxel and direction; subjects differ in diffusivities, axon fraction and S0.
  A second family (Gaussian tensors) and a second lesion model (demyelination)
  let detection defaults tuned on one world be tested on another
  (:mod:`~anomri.demo.families`).
* **Lesions** (:mod:`~anomri.demo.lesions`): real MS consensus lesion masks
  (Lesjak et al. 2018, CC-BY) placed through each patient's warp, each
  lesion with its own severity; or the earlier soft-edged blobs.
* **Acquisition** (:mod:`~anomri.demo.acquisition`): a dipy gradient table,
  a shell specification or the user's bval/bvec files; head motion between
  volumes with unrotated b-vectors; a receive bias field; an SNR spread;
  optional Gibbs ringing; Rician noise.
* **Writer** (:mod:`~anomri.demo.writer`): BIDS raw data plus a ground-truth
  lesion derivative.

Every random draw comes from a stream keyed on (seed, purpose, group, index),
so the same seed gives byte-identical files and adding controls does not
change the patients. :meth:`CohortSettings.legacy` reproduces the earlier
cohort (one shared anatomy, blob lesions) byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.special import expit

from anomri.demo.acquisition import (
    Acquisition, VolumeMotion, add_rician_noise, coil_sensitivity, load_scheme, read_scheme, truncate_kspace,
)
from anomri.demo.anatomy import (
    WARP_CORRELATION_MM, FourierField, Grid, PopulationAnatomy, RigidMotion, SubjectWarp, brain_grid,
    build_population, mni_tissues,
)
from anomri.demo.families import (
    FAMILY_TEXT, JITTER_TEXT, LESION_MODELS, SIGNAL_MODELS, SIMULATORS, family_effect, subject_microstructure,
)
from anomri.demo.lesions import (
    LESION_DIAMETER_MM, N_LESIONS, LesionAtlas, LesionMaps, blob_lesion_maps, draw_blob_lesions, mask_lesion_maps,
    packaged_masks,
)
from anomri.demo.tissue import CROSSING_MAX, VoxelTissue
from anomri.demo.writer import SubjectImages, prepare_out_dir, write_dataset_files, write_subject

logger = logging.getLogger(__name__)

#: In-plane oversampling of the simulation when Gibbs ringing is on.
RINGING_OVERSAMPLING = 2
#: Std of the S0 scaling between subjects (coil loading, receiver gain).
S0_JITTER = 0.15


@dataclass(frozen=True)
class CohortSettings:
    """What the simulator draws each subject from (besides the seed and the group sizes).

    The defaults are the realistic cohort; :meth:`legacy` gives the earlier one.

    Attributes
    ----------
    voxel_size : float
        Isotropic voxel size, mm (>= 1, the template resolution).
    scheme : str
        A dipy gradient table (``3shell``, ``isbi2013-2shell``) or shells as
        ``"b:n,b:n"`` (see :func:`~anomri.demo.acquisition.load_scheme`).
    bvals, bvecs : str or None
        FSL files of the user's own scheme; they replace ``scheme``, ``n_b0``
        and ``max_dirs_per_shell``.
    n_b0 : int
        Interleaved b0 volumes.
    max_dirs_per_shell : int or None
        Subsample each shell of a dipy table to at most this many well-spread directions.
    snr : (float, float)
        Range of each subject's SNR (mean WM b0 / noise sigma).
    pose_rotation_deg, pose_translation_mm : float
        Head pose: rotation per axis and translation bounds.
    head_scaling : float
        Per-axis head size is uniform in [1 - h, 1 + h].
    warp_mm : float
        Amplitude of the smooth nonlinear displacement (per-component std, mm).
    ventricle_mm, cortex_thinning : float
        Patients' atrophy: largest ventricle enlargement (mm) and share of the
        outer cortex lost, each drawn uniformly from [0, value].
    diffusivity_jitter, axon_fraction_jitter : float
        Subject-level scaling of tissue diffusivities and of the intra-axonal
        fraction, uniform in [1 - j, 1 + j]. In the tensor family the axial and
        the radial eigenvalues are scaled independently, and WM D_perp is
        divided by the axon-fraction scale.
    bias_field : float
        Strength of the smooth receive bias (std of its log-quadratic coefficients).
    volume_motion_deg, volume_motion_mm : float
        Head motion between volumes (rotation per axis, translation); the
        b-vectors are not rotated, as on a real scanner.
    gibbs : bool
        Gibbs ringing: simulate twice finer in plane and keep the central k-space.
    lesions : {"ms", "blobs"}
        Real MS lesion masks, or ellipsoids in deep WM.
    lesion_masks : tuple of str
        Lesion masks in MNI space for ``lesions="ms"``, used in turn by the
        patients (empty: the masks shipped with anomri).
    severity : (float, float)
        Range of each lesion's severity, 0 barely visible to 1 a "black hole".
    t2_shine_through : bool
        Whether lesions are hyperintense on b0.
    signal_model : {"stick-zeppelin", "tensor"}
        Tissue signal family: stick + zeppelin + ball (:mod:`~anomri.demo.tissue`)
        or Gaussian diffusion tensors (:mod:`~anomri.demo.tensor_tissue`).
    lesion_model : {"axon-loss", "demyelination"}
        What a lesion of severity s does: axonal loss with free water and a
        freer extra-axonal space (:meth:`~anomri.demo.tissue.LesionEffect.from_severity`),
        or demyelination, radial diffusivity x (1 + 2 s) and axial x (1 - 0.15 s)
        (:func:`~anomri.demo.tissue.demyelination`).
    """

    voxel_size: float = 3.0
    scheme: str = "3shell"
    bvals: str | None = None
    bvecs: str | None = None
    n_b0: int = 6
    max_dirs_per_shell: int | None = 32
    snr: tuple[float, float] = (15.0, 35.0)
    pose_rotation_deg: float = 5.0
    pose_translation_mm: float = 4.0
    head_scaling: float = 0.06
    warp_mm: float = 2.5
    ventricle_mm: float = 2.0
    cortex_thinning: float = 0.3
    diffusivity_jitter: float = 0.07
    axon_fraction_jitter: float = 0.07
    bias_field: float = 0.2
    volume_motion_deg: float = 1.0
    volume_motion_mm: float = 1.0
    gibbs: bool = False
    lesions: str = "ms"
    lesion_masks: tuple[str, ...] = ()
    severity: tuple[float, float] = (0.15, 1.0)
    t2_shine_through: bool = True
    signal_model: str = "stick-zeppelin"
    lesion_model: str = "axon-loss"

    @classmethod
    def legacy(cls, **overrides) -> CohortSettings:
        """The earlier cohort: one shared anatomy moved rigidly, blob lesions, no inter-volume motion."""
        return cls(**({"snr": (15.0, 40.0), "pose_rotation_deg": 3.0, "pose_translation_mm": 2.0,
                       "head_scaling": 0.0, "warp_mm": 0.0, "ventricle_mm": 0.0, "cortex_thinning": 0.0,
                       "diffusivity_jitter": 0.05, "axon_fraction_jitter": 0.0, "bias_field": 0.06,
                       "volume_motion_deg": 0.0, "volume_motion_mm": 0.0, "lesions": "blobs"} | overrides))

    def __post_init__(self) -> None:
        if self.voxel_size < 1.0:
            raise ValueError(f"voxel_size must be >= 1 mm (template resolution), got {self.voxel_size}")
        if not 0 < self.snr[0] <= self.snr[1]:
            raise ValueError(f"snr must be a range (low, high) with 0 < low <= high, got {self.snr}")
        if not 0.0 <= self.severity[0] <= self.severity[1] <= 1.0:
            raise ValueError(f"severity must be a range within [0, 1], got {self.severity}")
        if self.lesions not in ("ms", "blobs"):
            raise ValueError(f"lesions must be 'ms' or 'blobs', got {self.lesions!r}")
        for name, allowed in (("signal_model", SIGNAL_MODELS), ("lesion_model", LESION_MODELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if (self.bvals is None) != (self.bvecs is None):
            raise ValueError("give both bvals and bvecs, or neither")
        for name in ("head_scaling", "diffusivity_jitter", "axon_fraction_jitter"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must lie in [0, 0.5), got {getattr(self, name)}")
        for name in ("warp_mm", "ventricle_mm", "bias_field", "volume_motion_deg", "volume_motion_mm",
                     "pose_rotation_deg", "pose_translation_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.cortex_thinning <= 1.0:
            raise ValueError(f"cortex_thinning must lie in [0, 1], got {self.cortex_thinning}")

    def acquisition(self) -> Acquisition:
        """The gradient table every subject is scanned with."""
        if self.bvals is not None:
            return read_scheme(self.bvals, self.bvecs)
        return load_scheme(self.scheme, n_b0=self.n_b0, max_dirs_per_shell=self.max_dirs_per_shell)

    def atlases(self) -> list[LesionAtlas]:
        """The lesion masks patients take in turn (none for blob lesions)."""
        if self.lesions != "ms":
            return []
        return [LesionAtlas.load(p) for p in (self.lesion_masks or packaged_masks())]


# --------------------------------------------------------------------------------------
# Participants and random streams
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


_STREAM_POPULATION, _STREAM_DEMOGRAPHICS, _STREAM_SCAN, _STREAM_SUBJECT, _STREAM_FAMILY = 0, 1, 2, 3, 4


def _subject_seed(seed: int, purpose: int, group: str, index: int) -> np.random.Generator:
    """Independent stream per subject and purpose.

    Keyed on (group, index) rather than spawned in sequence, so adding controls
    does not change the patients. ``_STREAM_SCAN`` draws what the earlier
    cohort drew, in its order; everything the realistic cohort adds comes
    from ``_STREAM_SUBJECT``, so the earlier cohort stays reproducible.
    ``_STREAM_FAMILY`` draws what only the tensor family needs, so its
    subjects share anatomy, lesions, motion and noise with the default family's.
    """
    key = (purpose, 0 if group == "control" else 1, index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


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


# --------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------


def _unit(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Rows of ``v`` normalised; rows of (near) zero length become ``fallback``."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(norm > 1e-12, v / np.maximum(norm, 1e-12), fallback)


def _draw_warp(motion: RigidMotion, extra: np.random.Generator, settings: CohortSettings,
               patient: bool) -> SubjectWarp:
    """A subject's warp: the pose plus whatever head size, nonlinear shape and atrophy ``settings`` ask for."""
    scaling = 1.0 + extra.uniform(-settings.head_scaling, settings.head_scaling, 3) if settings.head_scaling \
        else np.ones(3)
    displacement = FourierField.draw(extra, 3, WARP_CORRELATION_MM) if settings.warp_mm else None
    ventricle = float(extra.uniform(0.0, settings.ventricle_mm)) if patient and settings.ventricle_mm else 0.0
    thinning = float(extra.uniform(0.0, settings.cortex_thinning)) if patient and settings.cortex_thinning else 0.0
    return SubjectWarp(motion, scaling, displacement, settings.warp_mm, ventricle, thinning)


def _lesion_maps(rng: np.random.Generator, extra: np.random.Generator, warp: SubjectWarp,
                 population: PopulationAnatomy, parenchyma: np.ndarray, inside: np.ndarray,
                 settings: CohortSettings, atlas: LesionAtlas | None, patient: bool) -> LesionMaps:
    """Blob lesions (drawn from the earlier cohort's stream) or a real mask with per-lesion severities."""
    if not patient:
        return LesionMaps(np.zeros(population.grid.shape), np.full(population.grid.shape, -1, np.int16), ())
    if atlas is None:
        return blob_lesion_maps(draw_blob_lesions(rng), warp, population, parenchyma)
    severities = extra.uniform(*settings.severity, atlas.n_components)
    return mask_lesion_maps(atlas, warp, population, inside, severities, settings.t2_shine_through)


def _coarse(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average of each acquired voxel's footprint on a grid ``factor`` times finer in plane."""
    if factor == 1:
        return volume
    # Fine voxel (f i, f j) is centred on acquired voxel (i, j): a centred box of width f + 1
    # with half weights at both ends covers the footprint exactly.
    kernel = np.r_[0.5, np.ones(factor - 1), 0.5] / factor
    for axis in (0, 1):
        volume = ndimage.convolve1d(volume, kernel, axis=axis, mode="constant")
    return volume[::factor, ::factor]


def simulate_subject(population: PopulationAnatomy, acq: Acquisition, rng: np.random.Generator,
                     extra: np.random.Generator, *, family: np.random.Generator, patient: bool,
                     settings: CohortSettings, atlas: LesionAtlas | None = None) -> SubjectImages:
    """Simulate one scan: warp the population head, add lesions, synthesise signal, move, ring and add noise.

    ``rng`` is the earlier cohort's stream (pose, diffusivity, S0, SNR, blob
    lesions, coil, noise, in that order); ``family`` draws what only the
    tensor family needs; ``extra`` draws everything else.
    ``atlas`` is the patient's real lesion mask (None: blob lesions).
    """
    grid = population.grid
    factor = RINGING_OVERSAMPLING if settings.gibbs else 1
    motion = RigidMotion.draw(rng, population.centre, settings.pose_rotation_deg, settings.pose_translation_mm)
    diffusivity_scale = rng.uniform(1 - settings.diffusivity_jitter, 1 + settings.diffusivity_jitter)
    s0_scale = rng.uniform(1 - S0_JITTER, 1 + S0_JITTER)
    snr = rng.uniform(*settings.snr)
    j = settings.axon_fraction_jitter
    axon_scale = float(extra.uniform(1 - j, 1 + j)) if j else 1.0
    micro, scales = subject_microstructure(settings.signal_model, family, diffusivity_scale,
                                           settings.diffusivity_jitter, s0_scale, axon_scale)
    warp = _draw_warp(motion, extra, settings, patient)

    # Where each subject voxel was in the template: sample the population maps there.
    subject_xyz = grid.centres()
    template_ijk = np.moveaxis(grid.to_voxel(warp.to_template(subject_xyz, population)), -1, 0)

    def sample(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, template_ijk, order=1, mode="constant", prefilter=False)

    wm, gm, csf = sample(population.wm), sample(population.gm), sample(population.csf)
    if warp.cortex_thinning:
        lost = gm * warp.cortex_thinning * sample(population.outer_cortex)
        gm, csf = gm - lost, csf + lost
    inside = (wm + gm + csf) > 1e-3
    maps = _lesion_maps(rng, extra, warp, population, wm + gm, inside, settings, atlas, patient)
    lesion = maps.fraction * (wm + gm)  # lesions replace parenchyma, never CSF

    xyz = subject_xyz[inside]
    template_xyz = warp.to_template(xyz, population)
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
        wm=(wm * (1 - maps.fraction))[inside],
        gm=(gm * (1 - maps.fraction))[inside],
        csf=csf[inside],
        fibre=fibre,
        radial=radial,
        modulation=modulation[:, 1],
        fibre2=fibre2,
        crossing=crossing,
        lesion=lesion[inside],
        lesion_id=maps.owner[inside],
        lesions=tuple(family_effect(e, settings.signal_model, settings.lesion_model, settings.t2_shine_through)
                      for e in maps.effects),
    )
    core = (wm >= min(0.9, 0.9 * wm.max())) & (lesion == 0)  # SNR is defined on the mean b0 of pure WM
    volume_motion = None
    if settings.volume_motion_deg or settings.volume_motion_mm:
        volume_motion = VolumeMotion.draw(extra, len(acq.bvals), settings.volume_motion_deg,
                                          settings.volume_motion_mm, population.centre)
    if volume_motion is None and factor == 1:
        # The earlier cohort's path: signal of the tissue voxels only.
        signal = SIMULATORS[settings.signal_model](acq, tissue, micro)
        signal *= coil_sensitivity(rng, xyz, population.centre, settings.bias_field)[:, None]
        sigma = float(signal[core[inside]][:, acq.is_b0].mean()) / snr
        dwi = add_rician_noise(signal, inside, sigma, rng, (*grid.shape, len(acq.bvals)))
    else:
        head_acq = acq if volume_motion is None else Acquisition(acq.bvals, volume_motion.head_frame(acq.bvecs))
        full = np.zeros((*grid.shape, len(acq.bvals)), np.float32)
        full[inside] = SIMULATORS[settings.signal_model](head_acq, tissue, micro)
        if volume_motion is not None:
            full = volume_motion.apply(full, grid.affine)
        full *= coil_sensitivity(rng, subject_xyz.reshape(-1, 3), population.centre,
                                 settings.bias_field).reshape(grid.shape)[..., None].astype(np.float32)
        sigma = float(full[core][:, acq.is_b0].mean()) / snr
        full = truncate_kspace(full, factor)
        dwi = add_rician_noise(full, None, sigma, rng, full.shape)

    parameters: dict[str, object] = {"SNR": round(float(snr), 4), "NoiseSigma": round(sigma, 4)}
    parameters |= warp.record()
    parameters |= {"S0Scale": round(float(s0_scale), 4)} | scales | {"NumberOfLesions": len(maps.effects)}
    if j:
        parameters["AxonFractionScale"] = round(axon_scale, 4)
    if volume_motion is not None:
        parameters |= volume_motion.record()
    if atlas is not None:
        parameters["LesionMask"] = atlas.name
        if settings.lesion_model == "axon-loss":
            intra = [e.intra_factor for e in maps.effects]
            parameters["AxonalLossRange"] = [round(1 - max(intra), 4), round(1 - min(intra), 4)]
        else:
            severity = [e.severity for e in maps.effects]
            parameters["LesionSeverityRange"] = [round(min(severity), 4), round(max(severity), 4)]
    if not patient:
        return SubjectImages(dwi=dwi, lesion_fraction=None, lesion_mask=None, parameters=parameters)
    lesion = _coarse(lesion, factor)
    mask = lesion >= 0.5
    if maps.seeds is not None:
        mask |= _coarse(maps.seeds.astype(np.float32), factor) > 0
    return SubjectImages(dwi=dwi, lesion_fraction=lesion.astype(np.float32), lesion_mask=mask.astype(np.uint8),
                         parameters=parameters)


# --------------------------------------------------------------------------------------
# The cohort
# --------------------------------------------------------------------------------------


def _description(settings: CohortSettings, acq: Acquisition, seed: int) -> str:
    """The dataset's one-paragraph description of how it was simulated."""
    s = settings
    scheme = (f"scheme from {Path(s.bvals).name}" if s.bvals else
              f"scheme {s.scheme} ({len(acq.bvals)} volumes, {s.n_b0} b0, <= {s.max_dirs_per_shell} directions "
              "per shell)")
    if s == CohortSettings.legacy(voxel_size=s.voxel_size, scheme=s.scheme, n_b0=s.n_b0, snr=s.snr,
                                  max_dirs_per_shell=s.max_dirs_per_shell):
        return (
            f"{FAMILY_TEXT[s.signal_model]} on MNI ICBM152 2009a tissue partial volumes; {scheme}, "
            f"{s.voxel_size:g} mm isotropic voxels, rigid motion <= {s.pose_rotation_deg:g} deg / "
            f"{s.pose_translation_mm:g} mm, Rician noise with SNR {s.snr[0]:g}-{s.snr[1]:g} (mean WM b0 / sigma), "
            f"{N_LESIONS[0]}-{N_LESIONS[1]} lesions of "
            f"{LESION_DIAMETER_MM[0]:g}-{LESION_DIAMETER_MM[1]:g} mm per patient; seed {seed}."
        )
    lesions = ("real MS consensus lesion masks (Lesjak et al. 2018, CC-BY) through each patient's warp, severity "
               f"{s.severity[0]:g}-{s.severity[1]:g} per lesion" if s.lesions == "ms" else
               f"{N_LESIONS[0]}-{N_LESIONS[1]} blob lesions of {LESION_DIAMETER_MM[0]:g}-{LESION_DIAMETER_MM[1]:g} mm")
    if s.lesion_model == "demyelination":
        lesions += (", demyelinating (radial diffusivity x (1 + 2 s), axial x (1 - 0.15 s), free water + 0.25 s "
                    "at severity s)")
    jitter = JITTER_TEXT[s.signal_model].format(100 * s.diffusivity_jitter, 100 * s.axon_fraction_jitter)
    return (
        f"{FAMILY_TEXT[s.signal_model]} on MNI ICBM152 2009a tissue partial volumes warped per subject (pose <= "
        f"{s.pose_rotation_deg:g} deg / {s.pose_translation_mm:g} mm, head size +-{100 * s.head_scaling:g} %, "
        f"nonlinear warp {s.warp_mm:g} mm, patients' atrophy up to {s.ventricle_mm:g} mm ventricles / "
        f"{100 * s.cortex_thinning:g} % outer cortex); {jitter}; {scheme}, {s.voxel_size:g} mm isotropic voxels, "
        f"inter-volume motion <= {s.volume_motion_deg:g} deg / "
        f"{s.volume_motion_mm:g} mm (b-vectors not rotated), receive bias {s.bias_field:g}, "
        f"{'Gibbs ringing, ' if s.gibbs else ''}Rician noise with SNR {s.snr[0]:g}-{s.snr[1]:g} (mean WM b0 / "
        f"sigma); {lesions}; seed {seed}."
    )


def make_demo_cohort(out_dir: str | Path, *, n_controls: int = 6, n_patients: int = 4, seed: int = 0,
                     settings: CohortSettings | None = None, workers: int = 2, **overrides) -> Path:
    """Write a synthetic BIDS diffusion-MRI cohort of controls and MS patients.

    Parameters
    ----------
    out_dir : str or Path
        Dataset root; created, and must not exist or hold no files (empty folders are fine).
    n_controls, n_patients : int
        Group sizes.
    seed : int
        Seed of everything random; the same seed gives byte-identical files.
    settings : CohortSettings, optional
        What to simulate (default: the realistic cohort).
    workers : int
        Subjects simulated concurrently in threads (numpy and zlib release the GIL,
        so this uses as many cores). The output does not depend on it.
    **overrides
        Fields of :class:`CohortSettings` replacing those of ``settings``.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    InputError
        ``out_dir`` already holds files, or a lesion mask or gradient file is unusable.
    ValueError
        An invalid parameter.
    """
    settings = dataclasses.replace(settings or CohortSettings(), **overrides)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    participants = demo_participants(n_controls, n_patients)
    acq = settings.acquisition()
    atlases = settings.atlases()
    out = Path(out_dir)
    prepare_out_dir(out)

    start = time.perf_counter()
    wm, gm, csf, affine = mni_tissues()
    grid = brain_grid((wm + gm + csf) > 0, affine, settings.voxel_size)
    simulation_grid = grid.refined(RINGING_OVERSAMPLING) if settings.gibbs else grid
    population = build_population(
        simulation_grid, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_POPULATION,))))
    logger.info("population anatomy on a %s grid at %.3g mm (%.1f s)", grid.shape, settings.voxel_size,
                time.perf_counter() - start)
    references = [
        "Fonov et al. (2011) NeuroImage 54:313-327, MNI ICBM152 2009a tissue templates (via nilearn)",
        "Gradient tables from dipy (dipy/data/files)",
    ]
    if atlases:
        references.append("Lesjak et al. (2018) Neuroinformatics 16:51-63, consensus MS lesion masks in MNI152 "
                          "space (CC-BY; lesion geometry of the patients)")
    write_dataset_files(out, _demographics(seed, participants), _description(settings, acq, seed), references)
    mask_description = (
        "Voxels whose lesion partial-volume fraction (probseg) is >= 0.5" +
        (", plus the most lesioned voxel of every lesion so that none is lost at coarse resolution."
         if settings.lesions == "blobs" else " (lesions smaller than half a voxel everywhere are not in the mask)."))

    def scan(pid: str, group: str, index: int) -> None:
        tic = time.perf_counter()
        rng = _subject_seed(seed, _STREAM_SCAN, group, index)
        extra = _subject_seed(seed, _STREAM_SUBJECT, group, index)
        family = _subject_seed(seed, _STREAM_FAMILY, group, index)
        patient = group == "patient"
        atlas = atlases[(index - 1) % len(atlases)] if patient and atlases else None
        images = simulate_subject(population, acq, rng, extra, family=family, patient=patient, settings=settings,
                                  atlas=atlas)
        write_subject(out, pid, images, acq, grid, mask_description)
        logger.info("%s (%s): SNR %.1f, %d lesions, %.1f s", pid, group, images.parameters["SNR"],
                    images.parameters["NumberOfLesions"], time.perf_counter() - tic)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(scan, *job) for job in _numbered(participants)]:
            future.result()  # re-raise the first failure
    logger.info("wrote %d participants to %s in %.1f s", len(participants), out, time.perf_counter() - start)
    return out
