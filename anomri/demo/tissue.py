"""Tissue signal of the synthetic cohort: a multi-compartment diffusion model evaluated per voxel and direction.

* WM = intra-axonal stick + extra-axonal zeppelin (tortuosity) + free-water
  ball, with orientation dispersion and, in part of the WM, a second crossing
  bundle; GM = isotropic hindered ball + a weak radial stick; CSF = free water.
* S0 follows from proton density and T1/T2 relaxation at the sequence's TR/TE,
  so CSF is bright and WM dark on b0 as in real data.
* Lesion tissue is WM with fewer axons, more free water, a freer
  extra-axonal space and, optionally, a longer T2 (shine-through on b0); or,
  demyelinating, WM whose radial diffusivity rises and axial diffusivity drops.

This is the default ("stick-zeppelin") family; :mod:`~anomri.demo.tensor_tissue`
is a second one built on the same anatomy, relaxation and composition
(:func:`compose_signal`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from anomri.demo.acquisition import Acquisition

if TYPE_CHECKING:
    from anomri.demo.tensor_tissue import TensorLesionEffect, TensorMicrostructure


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


#: Half-angle of the cone of micro-bundles that models axonal orientation dispersion
#: (with the central bundle, E[sin^2] of a Watson distribution with kappa ~ 5, NODDI ODI ~ 0.12).
DISPERSION_DEG = 30.0
#: Crossing fibres: the second bundle's maximum share of the WM, and the share below
#: which it is not simulated.
CROSSING_MAX = 0.5
CROSSING_MIN = 0.01
#: Smoothness (mm) of the fields that modulate the crossing share and the intra-axonal fraction,
#: Amplitude of the spatial modulation of the intra-axonal fraction.
F_INTRA_MODULATION = 0.04
#: Share of the axons an axon-loss lesion of severity 1 destroys (the loss is linear in severity).
MAX_AXON_LOSS = 0.85


def demyelination(severity: float, t2_shine_through: bool = True) -> dict[str, float]:
    """What a demyelinating lesion of ``severity`` in [0, 1] does, in either signal family.

    Radial diffusivity x (1 + 2 s) (myelin no longer hinders diffusion across
    the axons), axial diffusivity x (1 - 0.15 s) (axonal injury), free water
    + 0.25 s (oedema) and T2 x (1 + 0.5 s) with shine-through.

    Returns
    -------
    dict
        ``radial_gain``, ``axial_factor``, ``free_gain`` and ``t2_gain``.
    """
    s = float(np.clip(severity, 0.0, 1.0))
    return {"radial_gain": 1.0 + 2.0 * s, "axial_factor": 1.0 - 0.15 * s, "free_gain": 0.25 * s,
            "t2_gain": 1.0 + 0.5 * s if t2_shine_through else 1.0}


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

    def scaled(self, diffusivity: float, s0: float, axon_fraction: float = 1.0) -> Microstructure:
        """Copy with tissue diffusivities times ``diffusivity``, all S0 times ``s0`` and f_intra times ``axon_fraction``."""
        return dataclasses.replace(
            self,
            f_intra=self.f_intra * axon_fraction,
            d_par=self.d_par * diffusivity,
            d_gm=self.d_gm * diffusivity,
            s0_wm=self.s0_wm * s0,
            s0_gm=self.s0_gm * s0,
            s0_csf=self.s0_csf * s0,
        )


@dataclass(frozen=True)
class LesionEffect:
    """What a lesion does to the white matter it replaces (stick-zeppelin family).

    Attributes
    ----------
    intra_factor : float
        Multiplies the intra-axonal fraction (axonal loss).
    free_gain : float
        Added to the free-water fraction (oedema, tissue destruction).
    d_ex_gain : float
        Multiplies the extra-axonal axial diffusivity (loss of hindrance).
    t2_gain : float
        Multiplies WM T2 (lesions are hyperintense on b0; 1 = no shine-through).
    radial_gain : float
        Multiplies the zeppelin's radial diffusivity, up to its axial one
        (demyelination: less hindrance across the axons than tortuosity implies).
    axial_factor : float
        Multiplies the intra-axonal (stick) diffusivity (axonal injury, beading).
    """

    intra_factor: float
    free_gain: float
    d_ex_gain: float
    t2_gain: float
    radial_gain: float = 1.0
    axial_factor: float = 1.0

    @classmethod
    def from_severity(cls, severity: float, t2_shine_through: bool = True) -> LesionEffect:
        """A lesion of ``severity`` in [0, 1], from barely visible (0) to a "black hole" (1): the axon-loss model.

        Axonal loss up to 85 %, free water up to +0.45 and a 1.3x freer
        extra-axonal space at severity 1; T2 up to 1.6x with shine-through.
        """
        s = float(np.clip(severity, 0.0, 1.0))
        return cls(intra_factor=1.0 - MAX_AXON_LOSS * s, free_gain=0.45 * s, d_ex_gain=1.0 + 0.3 * s,
                   t2_gain=1.0 + 0.6 * s if t2_shine_through else 1.0)

    @classmethod
    def demyelination(cls, severity: float, t2_shine_through: bool = True) -> LesionEffect:
        """A demyelinating lesion of ``severity`` (see :func:`demyelination`) in stick-zeppelin terms.

        The radial rise acts on the zeppelin; the axial drop on the sticks
        (beading slows diffusion inside the axons); a mild axonal loss of 0.3 s
        goes with it. The extra-axonal axial diffusivity is unchanged.
        """
        s = float(np.clip(severity, 0.0, 1.0))
        return cls(intra_factor=1.0 - 0.3 * s, d_ex_gain=1.0, **demyelination(s, t2_shine_through))

    @property
    def severity(self) -> float:
        """The axon-loss severity with this effect's axonal loss (that of a drawn blob lesion too), in [0, 1]."""
        return float(np.clip((1.0 - self.intra_factor) / MAX_AXON_LOSS, 0.0, 1.0))

    def record(self) -> dict[str, float]:
        """The parameters, rounded for a sidecar."""
        return {k: round(float(v), 4) for k, v in dataclasses.asdict(self).items()}


@dataclass
class VoxelTissue:
    """Per-voxel composition of N voxels (all fractions are of the voxel volume).

    Attributes
    ----------
    wm, gm, csf, lesion : ndarray, (N,)
        Tissue fractions; their sum is <= 1 (the rest is signal-free background).
    fibre, radial : ndarray, (N, 3)
        Unit WM fibre direction and GM radial direction, world axes.
    modulation : ndarray, (N,)
        Smooth field (about +-2) that modulates the WM microstructure: the
        intra-axonal fraction here, the radial diffusivity in the tensor family.
    fibre2 : ndarray, (N, 3) or None
        Unit direction of a crossing WM bundle.
    crossing : ndarray, (N,) or None
        Share of the WM in the crossing bundle (None: a single bundle everywhere).
    lesion_id : ndarray of int, (N,) or None
        Index into ``lesions`` of the lesion filling each voxel (ignored where lesion == 0).
    lesions : tuple of LesionEffect or of TensorLesionEffect
        The lesions referenced by ``lesion_id``, in the signal family's terms.
    """

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    fibre: np.ndarray
    radial: np.ndarray
    modulation: np.ndarray
    fibre2: np.ndarray | None = None
    crossing: np.ndarray | None = None
    lesion: np.ndarray | None = None
    lesion_id: np.ndarray | None = None
    lesions: tuple[LesionEffect, ...] | tuple[TensorLesionEffect, ...] = ()


def _column(x: float | np.ndarray) -> np.ndarray:
    """Per-voxel parameter as a float32 (N, 1) or (1, 1) column that broadcasts against (N, V).

    The (N, V) signal arrays are the cohort's largest; float32 halves their cost
    and is far more precise than the noise.
    """
    return np.atleast_1d(np.asarray(x, dtype=np.float32))[:, None]


def _take(x: float | np.ndarray, sub: np.ndarray) -> float | np.ndarray:
    """Per-voxel values ``x`` at ``sub``, or the scalar ``x`` as is (the same for every voxel)."""
    return x[sub] if np.ndim(x) else x


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
    radial_gain: float | np.ndarray = 1.0,
) -> np.ndarray:
    """Normalised stick + zeppelin + ball signal E = S/S0 of one bundle, float32 (N, V).

    The zeppelin's radial diffusivity follows the tortuosity model
    D_perp = D_ex_par * (1 - nu), nu = f_intra / (f_intra + f_extra): fewer axons
    leave the extra-axonal space less hindered; ``radial_gain`` multiplies it,
    up to D_ex_par (an isotropic extra-axonal space). Orientation dispersion averages
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
    radial_gain : float or ndarray (N,)
        Multiplies the zeppelin's radial diffusivity (demyelination).
    """
    f_intra, f_free, d_par, d_ex_par, radial_gain = map(_column, (f_intra, f_free, d_par, d_ex_par, radial_gain))
    f_extra = 1.0 - f_intra - f_free
    d_perp = np.minimum(d_ex_par * f_extra / (f_intra + f_extra) * radial_gain, d_ex_par)
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


def wm_bundles(tissue: VoxelTissue, rows: np.ndarray,
               bundle: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Normalised WM signal (len(rows), V) of the voxels ``rows``: main bundle plus crossing bundle.

    ``bundle(sub, fibre)`` is the signal of one bundle with directions ``fibre``
    in the voxels ``rows[sub]``.
    """
    signal = bundle(np.arange(len(rows)), tissue.fibre[rows])
    if tissue.crossing is None:
        return signal
    share = tissue.crossing[rows]
    sub = np.flatnonzero(share > CROSSING_MIN)  # most voxels have a single bundle: skip the rest
    if sub.size:
        w = share[sub, None]
        signal[sub] = (1 - w) * signal[sub] + w * bundle(sub, tissue.fibre2[rows[sub]])
    return signal


def lesion_parameters(tissue: VoxelTissue, owner: np.ndarray, *names: str) -> np.ndarray:
    """Fields ``names`` of the lesion effect of each voxel, (len(names), len(owner)) for unpacking."""
    return np.array([[getattr(les, name) for name in names] for les in tissue.lesions])[owner].T


def compose_signal(
    acq: Acquisition,
    tissue: VoxelTissue,
    micro: Microstructure | TensorMicrostructure,
    grey: Callable[[np.ndarray], np.ndarray],
    white: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
) -> np.ndarray:
    """Noise-free signal of N voxels, float32 (N, V): the S0- and volume-weighted sum of the tissues.

    CSF is free water; a family gives the normalised signal of the rest.

    Parameters
    ----------
    acq : Acquisition
    tissue : VoxelTissue
    micro : Microstructure or TensorMicrostructure
        The subject's S0 of every tissue and free-water diffusivity.
    grey : callable
        ``grey(rows)``: normalised GM signal (len(rows), V) of the voxels ``rows``.
    white : callable
        ``white(rows, owner)``: normalised signal of WM in the voxels ``rows``
        (``owner`` None), or of the lesion tissue there, ``owner`` being the
        index into ``tissue.lesions`` of each voxel's lesion. Lesion S0 is the
        subject's WM S0 with the lesion's longer T2.
    """
    e_csf = free_water_signal(acq.bvals, micro.d_free)
    signal = micro.s0_csf * _column(tissue.csf) * e_csf[None, :].astype(np.float32)
    # Each compartment only where its tissue is present.
    rows = np.flatnonzero(tissue.gm > 0)
    signal[rows] += micro.s0_gm * _column(tissue.gm[rows]) * grey(rows)
    rows = np.flatnonzero(tissue.wm > 0)
    signal[rows] += micro.s0_wm * _column(tissue.wm[rows]) * white(rows, None)
    if tissue.lesion is None or not tissue.lesions:
        return signal

    rows = np.flatnonzero(tissue.lesion > 0)
    owner = tissue.lesion_id[rows]
    # Lesion S0 relative to the subject's WM S0: only T2 changes.
    s0_gain = np.array([relaxation_s0("wm", les.t2_gain) / relaxation_s0("wm") for les in tissue.lesions])[owner]
    signal[rows] += _column(micro.s0_wm * s0_gain * tissue.lesion[rows]) * white(rows, owner)
    return signal


def simulate_signal(acq: Acquisition, tissue: VoxelTissue, micro: Microstructure) -> np.ndarray:
    """Noise-free signal of N voxels in the stick-zeppelin family, float32 (N, V).

    Lesion tissue is WM changed as its :class:`LesionEffect` says, keeping the
    local fibre directions of the surviving axons.
    """
    bvals, bvecs = acq.bvals, acq.bvecs
    f_intra = micro.f_intra + F_INTRA_MODULATION * tissue.modulation

    def grey(rows: np.ndarray) -> np.ndarray:
        return grey_matter_signal(bvals, bvecs, tissue.radial[rows], micro.f_stick_gm, micro.d_par, micro.d_gm)

    def white(rows: np.ndarray, owner: np.ndarray | None) -> np.ndarray:
        f_in, f_free, d_par, d_ex_par, radial = f_intra[rows], micro.f_free_wm, micro.d_par, micro.d_par, 1.0
        if owner is not None:
            intra, free, d_ex, axial, radial = lesion_parameters(
                tissue, owner, "intra_factor", "free_gain", "d_ex_gain", "axial_factor", "radial_gain")
            f_in, f_free, d_par, d_ex_par = f_in * intra, f_free + free, d_par * axial, d_ex_par * d_ex

        def bundle(sub: np.ndarray, fibre: np.ndarray) -> np.ndarray:
            return white_matter_signal(bvals, bvecs, fibre, f_in[sub], _take(f_free, sub), _take(d_par, sub),
                                       _take(d_ex_par, sub), micro.d_free, micro.dispersion_deg, _take(radial, sub))

        return wm_bundles(tissue, rows, bundle)

    return compose_signal(acq, tissue, micro, grey, white)
