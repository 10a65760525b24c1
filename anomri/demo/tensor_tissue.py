"""Second tissue family of the synthetic cohort ("tensor"): Gaussian diffusion tensors, no restricted compartment.

A family to test detection defaults tuned on the stick-zeppelin family
(:mod:`~anomri.demo.tissue`) against, on the same anatomy, relaxation and
acquisition:

* WM = an axially symmetric Gaussian tensor per bundle, E = exp(-b (D_perp +
  (D_par - D_perp) cos^2)), with D_par 1.7 and D_perp 0.4 um^2/ms (FA 0.73 per
  micro-bundle, ~0.5 for a dispersed bundle as DTI sees it), the same
  orientation dispersion and crossing bundles, plus a free-water ball (0.05).
  The modulation field varies D_perp (where the other family varies the axon fraction).
* GM = a low-FA tensor (0.9 / 0.75 um^2/ms, mean 0.8, FA ~ 0.1) along the
  cortical radial axis; CSF = free water.
* Subjects differ in axial and radial diffusivity independently (not one
  global scaling as in the other family); fewer axons raise WM D_perp.
* Lesions change D_par, D_perp and free water (:class:`TensorLesionEffect`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from anomri.demo.acquisition import Acquisition
from anomri.demo.tissue import (
    D_FREE, DISPERSION_DEG, LesionEffect, VoxelTissue, _column, _dispersed, _take, compose_signal,
    demyelination, lesion_parameters, relaxation_s0, wm_bundles,
)

#: WM tensor eigenvalues of the population, mm^2/s (typical adult DTI of coherent WM).
D_AXIAL_WM = 1.7e-3
D_RADIAL_WM = 0.4e-3
#: Relative change of the WM radial diffusivity per unit of the (clipped, +-2) modulation field.
RADIAL_MODULATION = 0.1


@dataclass(frozen=True)
class TensorMicrostructure:
    """Tissue parameters of one subject in the tensor family (diffusivities in mm^2/s).

    Attributes
    ----------
    d_axial, d_radial : float
        WM tensor eigenvalues along and across the fibres (D_perp spatially modulated around this mean).
    f_free_wm : float
        WM free-water (ball) fraction.
    dispersion_deg : float
        Axonal orientation dispersion (cone half-angle, degrees).
    d_gm_axial, d_gm_radial : float
        GM tensor eigenvalues along and across the cortical radial axis.
    d_free : float
        Free-water diffusivity.
    s0_wm, s0_gm, s0_csf : float
        b0 intensities of pure tissue voxels.
    """

    d_axial: float = D_AXIAL_WM
    d_radial: float = D_RADIAL_WM
    f_free_wm: float = 0.05
    dispersion_deg: float = DISPERSION_DEG
    d_gm_axial: float = 0.9e-3
    d_gm_radial: float = 0.75e-3
    d_free: float = D_FREE
    s0_wm: float = dataclasses.field(default_factory=lambda: relaxation_s0("wm"))
    s0_gm: float = dataclasses.field(default_factory=lambda: relaxation_s0("gm"))
    s0_csf: float = dataclasses.field(default_factory=lambda: relaxation_s0("csf"))

    def scaled(self, axial: float, radial: float, s0: float, axon_fraction: float = 1.0) -> TensorMicrostructure:
        """Copy for one subject: eigenvalues along the fibre or cortical axis times ``axial``, the others times
        ``radial``, WM D_perp further divided by ``axon_fraction`` (denser axons hinder more), S0 times ``s0``.
        """
        return dataclasses.replace(
            self,
            d_axial=self.d_axial * axial,
            d_radial=self.d_radial * radial / axon_fraction,
            d_gm_axial=self.d_gm_axial * axial,
            d_gm_radial=self.d_gm_radial * radial,
            s0_wm=self.s0_wm * s0,
            s0_gm=self.s0_gm * s0,
            s0_csf=self.s0_csf * s0,
        )


@dataclass(frozen=True)
class TensorLesionEffect:
    """What a lesion does to the white matter it replaces (tensor family).

    Attributes
    ----------
    radial_gain : float
        Multiplies WM D_perp (the lesion's D_perp never exceeds its D_par).
    axial_factor : float
        Multiplies WM D_par.
    free_gain : float
        Added to the free-water fraction.
    t2_gain : float
        Multiplies WM T2 (1 = no shine-through).
    """

    radial_gain: float
    axial_factor: float
    free_gain: float
    t2_gain: float

    @classmethod
    def demyelination(cls, severity: float, t2_shine_through: bool = True) -> TensorLesionEffect:
        """A demyelinating lesion of ``severity`` in [0, 1] (:func:`~anomri.demo.tissue.demyelination`)."""
        return cls(**demyelination(severity, t2_shine_through))

    @classmethod
    def from_axon_loss(cls, effect: LesionEffect) -> TensorLesionEffect:
        """An axon-loss lesion (``LesionEffect.from_severity`` or a drawn blob) in tensor terms.

        Losing the share a = 1 - ``intra_factor`` of the axons moves D_perp that
        share of the way to D_par (tortuosity: WM without axons is isotropic),
        at the population's eigenvalues; the freer extra-axonal space
        (``d_ex_gain``) scales both eigenvalues; free water and T2 as given.
        """
        axon_loss = 1.0 - effect.intra_factor
        radial = 1.0 + axon_loss * (D_AXIAL_WM / D_RADIAL_WM - 1.0)
        return cls(radial_gain=radial * effect.d_ex_gain, axial_factor=effect.d_ex_gain,
                   free_gain=effect.free_gain, t2_gain=effect.t2_gain)


def tensor_signal(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    fibre: np.ndarray,
    d_axial: float | np.ndarray,
    d_radial: float | np.ndarray,
    f_free: float | np.ndarray,
    d_free: float = D_FREE,
    dispersion_deg: float = 0.0,
) -> np.ndarray:
    """Normalised signal of an axially symmetric Gaussian tensor plus free water, float32 (N, V).

    E = (1 - f_free) < exp(-b (D_perp + (D_par - D_perp) cos^2 theta)) > + f_free exp(-b D_free),
    theta the angle between gradient and micro-bundle and <> the mean over the
    micro-bundles of the dispersion cone; with ``dispersion_deg`` = 0 the
    single tensor exp(-b g^T D g).

    Parameters
    ----------
    bvals : ndarray, (V,)
    bvecs : ndarray, (V, 3)
        Unit gradient directions (any vector for b0).
    fibre : ndarray, (N, 3)
        Unit directions of the tensors' principal axis.
    d_axial, d_radial : float or ndarray (N,)
        Eigenvalues along and across the principal axis.
    f_free : float or ndarray (N,)
        Free-water fraction.
    d_free : float
        Free-water diffusivity.
    dispersion_deg : float
        Half-angle of the cone of micro-bundles, degrees.
    """
    d_axial, d_radial, f_free = map(_column, (d_axial, d_radial, f_free))
    b = _column(bvals).T
    rate = b * (d_radial - d_axial)
    bvecs32 = bvecs.T.astype(np.float32)
    directions = _dispersed(np.asarray(fibre, float), dispersion_deg).astype(np.float32)
    total = np.zeros((len(fibre), len(bvals)), np.float32)
    term = np.empty_like(total)
    for direction in directions:
        np.square(np.matmul(direction, bvecs32, out=term), out=term)
        total += np.exp(np.multiply(term, rate, out=term), out=term)
    total *= (1.0 - f_free) * np.exp(-b * d_radial) / len(directions)
    total += f_free * np.exp(-b * np.float32(d_free))
    return total


def simulate_tensor_signal(acq: Acquisition, tissue: VoxelTissue, micro: TensorMicrostructure) -> np.ndarray:
    """Noise-free signal of N voxels in the tensor family, float32 (N, V).

    ``tissue.lesions`` are :class:`TensorLesionEffect`; lesion tissue keeps the
    local fibre directions.
    """
    bvals, bvecs = acq.bvals, acq.bvecs
    d_radial = micro.d_radial * (1.0 - RADIAL_MODULATION * tissue.modulation)

    def grey(rows: np.ndarray) -> np.ndarray:
        return tensor_signal(bvals, bvecs, tissue.radial[rows], micro.d_gm_axial, micro.d_gm_radial, 0.0)

    def white(rows: np.ndarray, owner: np.ndarray | None) -> np.ndarray:
        d_par, d_perp, f_free = micro.d_axial, d_radial[rows], micro.f_free_wm
        if owner is not None:
            radial, axial, free = lesion_parameters(tissue, owner, "radial_gain", "axial_factor", "free_gain")
            d_par, f_free = d_par * axial, f_free + free
            d_perp = np.minimum(d_perp * radial, d_par)  # a lesion leaves the tissue at most isotropic

        def bundle(sub: np.ndarray, fibre: np.ndarray) -> np.ndarray:
            return tensor_signal(bvals, bvecs, fibre, _take(d_par, sub), d_perp[sub], _take(f_free, sub),
                                 micro.d_free, micro.dispersion_deg)

        return wm_bundles(tissue, rows, bundle)

    return compose_signal(acq, tissue, micro, grey, white)
