"""The cohort's signal families and lesion models: what a subject's tissue and lesions are in each.

Detection defaults tuned on one simulated world should hold in another, so the
cohort offers two of each:

* **Signal families**: ``stick-zeppelin`` (:mod:`~anomri.demo.tissue`, the
  default) and ``tensor`` (:mod:`~anomri.demo.tensor_tissue`).
* **Lesion models**: ``axon-loss`` (:meth:`LesionEffect.from_severity
  <anomri.demo.tissue.LesionEffect.from_severity>`, the default) and
  ``demyelination`` (:func:`~anomri.demo.tissue.demyelination`).

Any combination works; lesions are drawn in the axon-loss model and converted here.
"""

from __future__ import annotations

import numpy as np

from anomri.demo.tensor_tissue import TensorLesionEffect, TensorMicrostructure, simulate_tensor_signal
from anomri.demo.tissue import LesionEffect, Microstructure, simulate_signal

#: Each signal family's simulation of the noise-free signal, ``f(acq, tissue, micro)``.
SIMULATORS = {"stick-zeppelin": simulate_signal, "tensor": simulate_tensor_signal}
SIGNAL_MODELS = tuple(SIMULATORS)
LESION_MODELS = ("axon-loss", "demyelination")

#: How the dataset description names each signal family.
FAMILY_TEXT = {
    "stick-zeppelin": "Multi-compartment diffusion simulation (WM stick+zeppelin+ball, GM ball+radial stick, CSF "
                      "free water)",
    "tensor": "Diffusion-tensor simulation (WM axially symmetric Gaussian tensors, axial 1.7 / radial 0.4 um^2/ms, "
              "plus a free-water ball; GM low-FA tensor along the cortical radial axis; CSF free water)",
}
#: How it describes each family's subject-level nuisance, formatted with the two jitters in %.
JITTER_TEXT = {
    "stick-zeppelin": "diffusivities +-{:g} %, axon fraction +-{:g} %",
    "tensor": "axial and radial diffusivities independently +-{:g} %, WM radial diffusivity / axon fraction +-{:g} %",
}


def subject_microstructure(signal_model: str, family: np.random.Generator, diffusivity_scale: float,
                           diffusivity_jitter: float, s0_scale: float, axon_scale: float
                           ) -> tuple[Microstructure | TensorMicrostructure, dict[str, float]]:
    """A subject's tissue parameters in ``signal_model``, and the scales to record in its sidecar.

    Stick-zeppelin: every diffusivity times ``diffusivity_scale``, the
    intra-axonal fraction times ``axon_scale``. Tensor: the eigenvalues along
    fibres and cortical columns times ``diffusivity_scale``, the others times a
    radial scale drawn from ``family``, uniform in [1 - j, 1 + j] with j =
    ``diffusivity_jitter`` (so subjects differ by more than one global
    scaling), and WM D_perp divided by ``axon_scale``. S0 times ``s0_scale`` in both.
    """
    if signal_model == "stick-zeppelin":
        micro = Microstructure().scaled(diffusivity_scale, s0_scale, axon_scale)
        return micro, {"DiffusivityScale": round(float(diffusivity_scale), 4)}
    radial_scale = float(family.uniform(1 - diffusivity_jitter, 1 + diffusivity_jitter))
    micro = TensorMicrostructure().scaled(diffusivity_scale, radial_scale, s0_scale, axon_scale)
    return micro, {"AxialDiffusivityScale": round(float(diffusivity_scale), 4),
                   "RadialDiffusivityScale": round(radial_scale, 4)}


def family_effect(effect: LesionEffect, signal_model: str, lesion_model: str,
                  t2_shine_through: bool) -> LesionEffect | TensorLesionEffect:
    """A lesion drawn in the axon-loss model (real mask or blob) in ``signal_model`` and ``lesion_model``.

    A demyelinating lesion takes the severity of that draw
    (:attr:`~anomri.demo.tissue.LesionEffect.severity`: for blobs, the severity
    with their axonal loss) and ``t2_shine_through``.
    """
    tensor = signal_model == "tensor"
    if lesion_model == "demyelination":
        return (TensorLesionEffect if tensor else LesionEffect).demyelination(effect.severity, t2_shine_through)
    return TensorLesionEffect.from_axon_loss(effect) if tensor else effect
