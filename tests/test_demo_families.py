"""The demo cohort's second signal family (Gaussian tensors) and second lesion model (demyelination).

Signals against dipy's single tensor and closed forms written out here from the
models' definitions; cohorts against the default family's files and against
their own normal-appearing white matter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.sims.voxel import single_tensor
from scipy.special import erf

from anomri.cli import main
from anomri.demo import anatomy, tissue
from anomri.demo.acquisition import Acquisition
from anomri.demo.cohort import CohortSettings, make_demo_cohort
from anomri.demo.tensor_tissue import TensorLesionEffect, TensorMicrostructure, simulate_tensor_signal, tensor_signal

D_FREE = 3.0e-3
#: Anatomy without pose, warp, atrophy or inter-volume motion: every subject's tissue is the population's.
STILL = dict(pose_rotation_deg=0.0, pose_translation_mm=0.0, head_scaling=0.0, warp_mm=0.0, ventricle_mm=0.0,
             cortex_thinning=0.0, volume_motion_deg=0.0, volume_motion_mm=0.0)
TINY = dict(n_controls=1, n_patients=1, voxel_size=6.0, seed=3)
FAMILIES = [("stick-zeppelin", "axon-loss"), ("tensor", "axon-loss"), ("stick-zeppelin", "demyelination"),
            ("tensor", "demyelination")]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _scheme(rng: np.random.Generator, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """b = 0 and three shells, random directions."""
    bvals = rng.choice([1000.0, 2000.0, 3000.0], n)
    bvals[:2] = 0.0
    bvecs = _unit(rng.normal(size=(n, 3)))
    bvecs[bvals == 0] = 0.0
    return bvals, bvecs


def _dipy_tensor(bvals: np.ndarray, bvecs: np.ndarray, axis: np.ndarray, d_par: float, d_perp: float) -> np.ndarray:
    """dipy's noise-free single tensor with eigenvalues (d_par, d_perp, d_perp), principal axis ``axis``."""
    u = _unit(np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0]))
    evecs = np.column_stack([axis, u, np.cross(axis, u)])
    return single_tensor(gradient_table(bvals, bvecs=bvecs), S0=1.0, evals=np.array([d_par, d_perp, d_perp]),
                         evecs=evecs)


def _voxel(axis: np.ndarray, modulation: float = 0.0, **fractions) -> tissue.VoxelTissue:
    """One voxel with fibre and cortical radial axis ``axis``; ``lesions`` given: it is all lesion."""
    effects = fractions.pop("lesions", ())
    one = np.ones(1)
    return tissue.VoxelTissue(
        wm=fractions.get("wm", 0.0) * one, gm=fractions.get("gm", 0.0) * one, csf=fractions.get("csf", 0.0) * one,
        fibre=axis[None], radial=axis[None], modulation=modulation * one,
        lesion=one if effects else None, lesion_id=np.zeros(1, int) if effects else None, lesions=effects)


def _t2_gain(gain: float) -> float:
    """b0 of WM whose T2 is ``gain`` times longer, relative to WM: spin echo exp(-TE / T2)."""
    te, t2 = tissue.ECHO_TIME_S, tissue.RELAXATION["wm"][2]
    return np.exp(-te / (gain * t2)) / np.exp(-te / t2)


# --------------------------------------------------------------------------------------
# Tensor family: signal
# --------------------------------------------------------------------------------------


def test_tensor_bundle_is_dipys_single_tensor_plus_free_water() -> None:
    rng = np.random.default_rng(0)
    bvals, bvecs = _scheme(rng)
    fibre = _unit(rng.normal(size=(6, 3)))
    d_par, d_perp = rng.uniform(1.2e-3, 2.2e-3, 6), rng.uniform(0.2e-3, 0.9e-3, 6)
    f_free = rng.uniform(0.0, 0.3, 6)
    signal = tensor_signal(bvals, bvecs, fibre, d_par, d_perp, f_free)
    assert signal.dtype == np.float32 and signal.shape == (6, len(bvals))
    for i in range(6):
        expected = ((1 - f_free[i]) * _dipy_tensor(bvals, bvecs, fibre[i], d_par[i], d_perp[i])
                    + f_free[i] * np.exp(-bvals * D_FREE))
        np.testing.assert_allclose(signal[i], expected, rtol=1e-5)


def test_tensor_voxel_sums_wm_gm_and_csf_tensors() -> None:
    """WM: 1.7 / 0.4 um^2/ms tensor + 5 % free water, D_perp x (1 - 0.1 m); GM: 0.9 / 0.75 tensor; CSF: free water."""
    rng = np.random.default_rng(1)
    bvals, bvecs = _scheme(rng)
    acq = Acquisition(bvals, bvecs)
    micro = dataclasses.replace(TensorMicrostructure(), dispersion_deg=0.0)
    axis = _unit(np.array([0.3, -0.5, 0.8]))
    for modulation in (0.0, 1.5):
        signal = simulate_tensor_signal(acq, _voxel(axis, modulation, wm=0.6, gm=0.3, csf=0.1), micro)[0]
        e_wm = 0.95 * _dipy_tensor(bvals, bvecs, axis, 1.7e-3, 0.4e-3 * (1 - 0.1 * modulation)) \
            + 0.05 * np.exp(-bvals * D_FREE)
        e_gm = _dipy_tensor(bvals, bvecs, axis, 0.9e-3, 0.75e-3)
        expected = 0.6 * micro.s0_wm * e_wm + 0.3 * micro.s0_gm * e_gm + 0.1 * micro.s0_csf * np.exp(-bvals * D_FREE)
        np.testing.assert_allclose(signal, expected, rtol=1e-5)


def test_dispersion_keeps_the_powder_average() -> None:
    """Dispersion only turns micro-bundles, so the shell mean stays the closed-form powder average of one tensor,
    exp(-b D_perp) sqrt(pi) erf(sqrt(b dD)) / (2 sqrt(b dD)); along the fibre the signal rises, across it falls."""
    n = 4000  # a Fibonacci sphere: near-uniform directions
    z = 1 - (2 * np.arange(n) + 1) / n
    phi = np.arange(n) * np.pi * (3 - np.sqrt(5))
    sphere = np.column_stack([np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z])
    fibre = _unit(np.array([[0.2, 0.9, -0.4]]))
    d_par, d_perp = 1.7e-3, 0.4e-3
    for b in (1000.0, 3000.0):
        x = np.sqrt(b * (d_par - d_perp))
        powder = np.exp(-b * d_perp) * np.sqrt(np.pi) * erf(x) / (2 * x)
        for dispersion in (0.0, 30.0):
            signal = tensor_signal(np.full(n, b), sphere, fibre, d_par, d_perp, 0.0, dispersion_deg=dispersion)
            assert signal.mean() == pytest.approx(powder, rel=1e-3), (b, dispersion)
        along_across = np.array([fibre[0], _unit(np.cross(fibre[0], [1.0, 0, 0]))])
        coherent, dispersed = (tensor_signal(np.full(2, b), along_across, fibre, d_par, d_perp, 0.0,
                                             dispersion_deg=d)[0] for d in (0.0, 30.0))
        assert dispersed[0] > coherent[0] and dispersed[1] < coherent[1]


def test_subject_scaling_is_not_one_global_factor() -> None:
    micro = TensorMicrostructure().scaled(axial=1.05, radial=0.93, s0=1.1, axon_fraction=1.02)
    assert micro.d_axial == pytest.approx(1.7e-3 * 1.05) and micro.d_gm_axial == pytest.approx(0.9e-3 * 1.05)
    assert micro.d_radial == pytest.approx(0.4e-3 * 0.93 / 1.02) and micro.d_gm_radial == pytest.approx(0.75e-3 * 0.93)
    assert micro.s0_wm == pytest.approx(1.1 * tissue.relaxation_s0("wm"))


# --------------------------------------------------------------------------------------
# Lesion models
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, severity, d_par, d_perp, f_free, t2", [
    # Demyelination: D_perp x (1 + 2 s), D_par x (1 - 0.15 s), free water + 0.25 s, T2 x (1 + 0.5 s).
    ("demyelination", 0.6, 1.7e-3 * 0.91, 0.4e-3 * 2.2, 0.05 + 0.15, 1.3),
    # Axon loss (85 % s of the axons, free water + 0.45 s, 1.3 s freer space, T2 x (1 + 0.6 s)): D_perp moves the
    # lost share of the way to D_par, and both eigenvalues rise with the freer space.
    ("axon-loss", 0.5, 1.7e-3 * 1.15, (0.4e-3 + 0.425 * (1.7e-3 - 0.4e-3)) * 1.15, 0.05 + 0.225, 1.3),
])
def test_tensor_lesion_voxel(model: str, severity: float, d_par: float, d_perp: float, f_free: float,
                             t2: float) -> None:
    rng = np.random.default_rng(2)
    bvals, bvecs = _scheme(rng)
    axis = _unit(np.array([-0.6, 0.1, 0.7]))
    effect = (TensorLesionEffect.demyelination(severity) if model == "demyelination" else
              TensorLesionEffect.from_axon_loss(tissue.LesionEffect.from_severity(severity)))
    micro = dataclasses.replace(TensorMicrostructure(), dispersion_deg=0.0)
    signal = simulate_tensor_signal(Acquisition(bvals, bvecs), _voxel(axis, lesions=(effect,)), micro)[0]
    expected = micro.s0_wm * _t2_gain(t2) * ((1 - f_free) * _dipy_tensor(bvals, bvecs, axis, d_par, d_perp)
                                              + f_free * np.exp(-bvals * D_FREE))
    np.testing.assert_allclose(signal, expected, rtol=1e-5)


def test_tensor_lesion_is_at_most_isotropic() -> None:
    bvals, bvecs = _scheme(np.random.default_rng(3))
    effect = TensorLesionEffect(radial_gain=10.0, axial_factor=1.0, free_gain=0.0, t2_gain=1.0)
    micro = dataclasses.replace(TensorMicrostructure(), dispersion_deg=0.0)
    signal = simulate_tensor_signal(Acquisition(bvals, bvecs), _voxel(np.array([0, 0, 1.0]),
                                                                              lesions=(effect,)), micro)[0]
    expected = micro.s0_wm * (0.95 * np.exp(-bvals * 1.7e-3) + 0.05 * np.exp(-bvals * D_FREE))
    np.testing.assert_allclose(signal, expected, rtol=1e-5)


def test_stick_zeppelin_demyelinated_voxel() -> None:
    """Demyelination (s = 0.5) in stick-zeppelin terms: axons x 0.85, free water + 0.125, stick D x 0.925, the
    zeppelin's tortuosity radial diffusivity x 2 (at most its axial one), T2 x 1.25."""
    rng = np.random.default_rng(4)
    bvals, bvecs = _scheme(rng)
    axis = _unit(np.array([0.5, 0.5, -0.7]))
    micro = dataclasses.replace(tissue.Microstructure(), dispersion_deg=0.0)
    effect = tissue.LesionEffect.demyelination(0.5)
    signal = tissue.simulate_signal(Acquisition(bvals, bvecs), _voxel(axis, lesions=(effect,)), micro)[0]
    f_in, f_free = 0.65 * 0.85, 0.05 + 0.125
    f_ex = 1 - f_in - f_free
    d = 1.9e-3
    d_perp = min(d * f_ex / (f_in + f_ex) * 2.0, d)
    cos2 = (bvecs @ axis) ** 2
    e = (f_in * np.exp(-bvals * d * 0.925 * cos2) + f_ex * np.exp(-bvals * (d_perp + (d - d_perp) * cos2))
         + f_free * np.exp(-bvals * D_FREE))
    np.testing.assert_allclose(signal, micro.s0_wm * _t2_gain(1.25) * e, rtol=1e-5)


def test_demyelination_takes_the_severity_of_an_axon_loss_draw() -> None:
    """Blob lesions are drawn as axon loss: their severity is the one with their axonal loss (85 % at s = 1)."""
    blob = tissue.LesionEffect(intra_factor=0.32, free_gain=0.3, d_ex_gain=1.2, t2_gain=1.4)
    assert blob.severity == pytest.approx(0.8)
    for s in (0.0, 0.15, 0.7, 1.0):
        assert tissue.LesionEffect.from_severity(s).severity == pytest.approx(s)
    severe = TensorLesionEffect.demyelination(1.0, t2_shine_through=False)
    assert (severe.radial_gain, severe.axial_factor, severe.free_gain, severe.t2_gain) == pytest.approx(
        (3.0, 0.85, 0.25, 1.0))


# --------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """A still-anatomy tiny cohort of every family and lesion model; tensor + demyelination through the CLI."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for signal_model, lesion_model in FAMILIES[:-1]:
        out[signal_model, lesion_model] = make_demo_cohort(
            root / f"{signal_model}_{lesion_model}", **TINY, **STILL, signal_model=signal_model,
            lesion_model=lesion_model)
    path = root / "tensor_demyelination"
    still = [a for k, v in STILL.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    assert main(["demo-cohort", str(path), "--n-controls", "1", "--n-patients", "1", "--voxel-size", "6",
                 "--seed", "3", *still, "--signal-model", "tensor", "--lesion-model", "demyelination"]) == 0
    out["tensor", "demyelination"] = path
    return out


def _params(root: Path, pid: str) -> dict:
    return json.loads((root / pid / "dwi" / f"{pid}_dwi.json").read_text())["SimulationParameters"]


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_family_cohort_has_the_default_layout_and_anatomy(cohorts: dict, family: tuple[str, str]) -> None:
    """Same files, headers, gradients and lesion ground truth as the default family of the same seed."""
    default, other = cohorts[FAMILIES[0]], cohorts[family]
    files = sorted(p.relative_to(default) for p in default.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix in (".bval", ".bvec") or "derivatives" in rel.parts and rel.name.endswith(".nii.gz"):
            assert (default / rel).read_bytes() == (other / rel).read_bytes(), rel
        elif rel.name.endswith("_dwi.nii.gz"):
            a, b = nib.load(default / rel), nib.load(other / rel)
            assert a.shape == b.shape and a.get_data_dtype() == b.get_data_dtype()
            np.testing.assert_array_equal(a.affine, b.affine)
    description = json.loads((other / "dataset_description.json").read_text())["GeneratedBy"][0]["Description"]
    assert ("Diffusion-tensor" in description) == (family[0] == "tensor")
    assert ("demyelinating" in description) == (family[1] == "demyelination")
    j = CohortSettings().diffusivity_jitter
    for pid in ("sub-C01", "sub-P01"):
        params = _params(other, pid)
        if family[0] == "tensor":
            axial, radial = params["AxialDiffusivityScale"], params["RadialDiffusivityScale"]
            assert abs(axial - 1) <= j and abs(radial - 1) <= j and axial != radial
            assert "DiffusivityScale" not in params
            # The axial scale is the draw that scales every diffusivity in the default family.
            assert axial == _params(default, pid)["DiffusivityScale"]
    severity = _params(other, "sub-P01").get("LesionSeverityRange")
    assert (severity is not None) == (family[1] == "demyelination")
    if severity:
        assert CohortSettings().severity[0] - 1e-4 <= severity[0] <= severity[1] <= 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_lesions_raise_the_mean_diffusivity(cohorts: dict, family: tuple[str, str]) -> None:
    """Mean over DW volumes of -log(S/S0)/b: higher in the lesion mask than in the patient's other WM."""
    root = cohorts[family]
    prefix = root / "sub-P01" / "dwi" / "sub-P01_dwi"
    data = np.asarray(nib.load(prefix.with_suffix(".nii.gz")).dataobj, float)
    bvals = np.loadtxt(prefix.with_suffix(".bval"))
    s0 = data[..., bvals == 0].mean(-1)
    lesion_dir = root / "derivatives" / "lesions" / "sub-P01" / "dwi"
    mask = np.asarray(nib.load(lesion_dir / "sub-P01_space-dwi_desc-lesion_mask.nii.gz").dataobj).astype(bool)
    fraction = np.asarray(nib.load(lesion_dir / "sub-P01_space-dwi_desc-lesion_probseg.nii.gz").dataobj)
    wm, gm, csf, affine = anatomy.mni_tissues()
    grid = anatomy.brain_grid((wm + gm + csf) > 0, affine, TINY["voxel_size"])
    population_wm = anatomy.build_population(grid, np.random.default_rng(0)).wm[::-1]  # the files are stored LAS
    nawm = (population_wm > 0.8) & (fraction == 0)
    dw = bvals > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        md = (-np.log(data[..., dw] / s0[..., None]) / bvals[dw]).mean(-1)
    assert mask.sum() >= 10 and nawm.sum() >= 100
    lesion, normal = md[mask], md[nawm]
    assert np.isfinite(lesion).all() and np.isfinite(normal).all()
    # Higher by more than noise could make it (Welch's statistic > 4), and by at least 10 %.
    difference = lesion.mean() - normal.mean()
    assert difference > 4 * np.sqrt(lesion.var() / lesion.size + normal.var() / normal.size), family
    assert lesion.mean() > 1.1 * normal.mean(), family


def test_unknown_models_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="signal_model must be one of 'stick-zeppelin', 'tensor', got 'foo'"):
        CohortSettings(signal_model="foo")
    with pytest.raises(ValueError, match="lesion_model must be one of 'axon-loss', 'demyelination'"):
        CohortSettings(lesion_model="oedema")
    for option in ("--signal-model", "--lesion-model"):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo-cohort", str(tmp_path / "out"), option, "foo"])
        assert exit_info.value.code != 0
        assert "invalid choice: 'foo'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
