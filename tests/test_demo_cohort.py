"""Tests of the synthetic demo cohort: BIDS layout, headers, gradients, physics, lesions, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from anomri.demo import acquisition, anatomy, lesions, tissue
from anomri.demo.cohort import CohortSettings, demo_participants, make_demo_cohort
from anomri.errors import InputError

TINY = dict(n_controls=3, n_patients=2, voxel_size=6.0, seed=3)
LESION_DIR = Path("derivatives") / "lesions"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The realistic cohort (the default): warped anatomy, real MS lesion masks, motion, bias."""
    return make_demo_cohort(tmp_path_factory.mktemp("demo") / "bids", **TINY)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The earlier cohort: one shared anatomy, blob lesions."""
    return make_demo_cohort(tmp_path_factory.mktemp("legacy") / "bids", settings=CohortSettings.legacy(), **TINY)


def _dwi(root: Path, pid: str) -> Path:
    return root / pid / "dwi" / f"{pid}_dwi"


def _lesion(root: Path, pid: str, suffix: str = "mask") -> Path:
    return root / LESION_DIR / pid / "dwi" / f"{pid}_space-dwi_desc-lesion_{suffix}.nii.gz"


def _gradients(root: Path, pid: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _dwi(root, pid)
    bvals = np.loadtxt(prefix.with_name(prefix.name + ".bval"), ndmin=2)
    bvecs = np.loadtxt(prefix.with_name(prefix.name + ".bvec"), ndmin=2)
    return bvals, bvecs


def _sidecar(root: Path, pid: str) -> dict:
    prefix = _dwi(root, pid)
    return json.loads(prefix.with_name(prefix.name + ".json").read_text())


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


# --------------------------------------------------------------------------------------
# Participants and layout
# --------------------------------------------------------------------------------------


def test_demo_participants_ids_and_groups() -> None:
    assert demo_participants(2, 1) == [("sub-C01", "control"), ("sub-C02", "control"), ("sub-P01", "patient")]
    assert demo_participants() == demo_participants(6, 4)
    assert len(demo_participants(120, 0)) == 120 and demo_participants(120, 0)[-1][0] == "sub-C120"
    with pytest.raises(ValueError):
        demo_participants(-1, 2)


def test_dataset_files(tiny: Path) -> None:
    description = json.loads((tiny / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.9.0" and description["DatasetType"] == "raw"
    generated_by = description["GeneratedBy"][0]
    assert generated_by["Name"] == "anomri" and "seed 3" in generated_by["Description"]
    assert "Lesjak" in " ".join(description["ReferencesAndLinks"])  # the CC-BY masks are cited
    derivative = json.loads((tiny / LESION_DIR / "dataset_description.json").read_text())
    assert derivative["DatasetType"] == "derivative"

    with open(tiny / "participants.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [(r["participant_id"], r["group"]) for r in rows] == demo_participants(3, 2)
    assert all(22 <= int(r["age"]) <= 60 and r["sex"] in {"F", "M"} for r in rows)
    columns = json.loads((tiny / "participants.json").read_text())
    assert set(columns) == {"participant_id", "group", "age", "sex"}


def test_subject_files(tiny: Path) -> None:
    for pid, group in demo_participants(3, 2):
        prefix = _dwi(tiny, pid)
        for ext in (".nii.gz", ".bval", ".bvec", ".json"):
            assert prefix.with_name(prefix.name + ext).is_file(), (pid, ext)
        has_lesions = group == "patient"
        assert _lesion(tiny, pid).is_file() == has_lesions
        assert _lesion(tiny, pid, "probseg").is_file() == has_lesions
        assert (tiny / LESION_DIR / pid).exists() == has_lesions
    # Atomic writes leave no temporary files behind.
    assert not [p for p in tiny.rglob("*") if p.name.startswith(".tmp")]


def test_refuses_a_directory_with_files(tmp_path: Path) -> None:
    (tmp_path / "sub-C01").mkdir()
    (tmp_path / "sub-C01" / "notes.txt").write_text("x")
    with pytest.raises(InputError):
        make_demo_cohort(tmp_path, n_controls=1, n_patients=0, voxel_size=6.0)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "sub-C01"]  # nothing touched


# --------------------------------------------------------------------------------------
# Gradients and images
# --------------------------------------------------------------------------------------


def test_gradient_files_match_volumes(tiny: Path) -> None:
    n_volumes = nib.load(_dwi(tiny, "sub-C01").with_suffix(".nii.gz")).shape[3]
    bvals, bvecs = _gradients(tiny, "sub-C01")
    assert bvals.shape == (1, n_volumes) and bvecs.shape == (3, n_volumes)
    bvals = bvals[0]
    assert np.array_equal(bvals, np.round(bvals))
    b0 = bvals < acquisition.B0_THRESHOLD
    assert b0.sum() >= 6 and b0[0]
    assert np.all(bvecs[:, b0] == 0)
    np.testing.assert_allclose(np.linalg.norm(bvecs[:, ~b0], axis=0), 1.0, atol=1e-5)
    shells, counts = np.unique(bvals[~b0], return_counts=True)
    assert list(shells) == [1000, 2000, 3500] and list(counts) == [32, 32, 32]
    # The same table for everybody.
    assert all(np.array_equal(_gradients(tiny, pid)[1], bvecs) for pid, _ in demo_participants(3, 2))


def test_load_scheme_interleaves_b0_and_spreads_directions() -> None:
    acq = acquisition.load_scheme("3shell", n_b0=6, max_dirs_per_shell=32)
    positions = np.flatnonzero(acq.is_b0)
    assert len(positions) == 6 and positions[0] == 0
    assert np.ptp(np.diff(positions)) <= 1  # evenly spaced through the series
    for b in (1000, 2000, 3500):
        g = acq.bvecs[acq.bvals == b]
        cosines = np.abs(g @ g.T)
        np.fill_diagonal(cosines, 0)
        assert np.degrees(np.arccos(cosines.max())) > 15  # no two axes closer than 15 degrees

    full = acquisition.load_scheme("isbi2013-2shell", n_b0=1, max_dirs_per_shell=None)
    assert len(full.bvals) == 64 and full.is_b0.sum() == 1
    assert sorted(set(full.bvals[~full.is_b0])) == [1500, 2500]
    with pytest.raises(ValueError):
        acquisition.load_scheme("dsi")


def test_shell_specification_spreads_directions() -> None:
    acq = acquisition.load_scheme("1000:30,2500:20", n_b0=4)
    assert acq.is_b0.sum() == 4 and list(np.unique(acq.bvals[~acq.is_b0])) == [1000, 2500]
    for b, n in ((1000, 30), (2500, 20)):
        g = acq.bvecs[acq.bvals == b]
        assert len(g) == n
        np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-9)
        cosines = np.abs(g @ g.T)
        np.fill_diagonal(cosines, 0)
        # Electrostatic repulsion: 30 axes on the half sphere are at least ~17 degrees apart.
        assert np.degrees(np.arccos(cosines.max())) > (15 if n == 30 else 20)
    # The same specification always gives the same table (its n_b0 only adds b0 volumes).
    again = acquisition.load_scheme("1000:30,2500:20", n_b0=4)
    np.testing.assert_array_equal(again.bvecs, acq.bvecs)


def test_scheme_from_files(tmp_path: Path) -> None:
    bvals = np.array([0, 1000, 1000, 0, 2000])
    bvecs = np.array([[0, 0, 0], [1, 0, 0], [0, 0.6, 0.8], [0, 0, 0], [0, 2.0, 0]], float)
    np.savetxt(tmp_path / "s.bval", bvals[None], fmt="%d")
    np.savetxt(tmp_path / "s.bvec", bvecs.T)
    with pytest.raises(InputError, match="unit b-vectors"):
        acquisition.read_scheme(tmp_path / "s.bval", tmp_path / "s.bvec")
    bvecs[4] = [0, 1.0, 0]
    np.savetxt(tmp_path / "s.bvec", bvecs.T)
    acq = acquisition.read_scheme(tmp_path / "s.bval", tmp_path / "s.bvec")
    np.testing.assert_array_equal(acq.bvals, bvals)
    assert list(np.flatnonzero(acq.is_b0)) == [0, 3]
    np.testing.assert_allclose(acq.bvecs[~acq.is_b0], bvecs[[1, 2, 4]])


def test_truncated_kspace_rings_like_gibbs() -> None:
    """A sharp step sampled through truncated k-space overshoots by the Gibbs constant, ~9 % of the jump."""
    fine = np.zeros((256, 8, 2))
    fine[64:192] = 1.0
    coarse = acquisition.truncate_kspace(fine, 4)
    assert coarse.shape == (64, 2, 2)
    profile = coarse[:, 0, 0]
    assert profile.max() == pytest.approx(1.0895, abs=0.02)  # Wilbraham-Gibbs: 1.0895 for a jump of 1
    assert profile.min() < -0.04  # and undershoots outside
    np.testing.assert_allclose(profile.mean(), 0.5, atol=1e-9)  # the DC term is kept exactly


def test_nifti_headers(tiny: Path) -> None:
    img = nib.load(_dwi(tiny, "sub-P01").with_suffix(".nii.gz"))
    assert img.ndim == 4 and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms()[:3], TINY["voxel_size"])
    np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), TINY["voxel_size"])
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    np.testing.assert_allclose(img.get_qform(), img.affine, atol=1e-4)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")  # dcm2niix-like storage

    for suffix, dtype in (("mask", np.uint8), ("probseg", np.float32)):
        lesion = nib.load(_lesion(tiny, "sub-P01", suffix))
        assert lesion.shape == img.shape[:3] and lesion.get_data_dtype() == dtype
        np.testing.assert_allclose(lesion.affine, img.affine)
    mask = _data(_lesion(tiny, "sub-P01"))
    probseg = _data(_lesion(tiny, "sub-P01", "probseg"))
    assert set(np.unique(mask)) == {0, 1}
    assert probseg.min() >= 0 and probseg.max() <= 1
    assert np.all(mask[probseg >= 0.5] == 1)


def test_brain_lies_where_the_affine_says(tiny: Path) -> None:
    """The b0 centroid in world space matches the MNI brain's, catching any flip of the LAS storage."""
    img = nib.load(_dwi(tiny, "sub-C01").with_suffix(".nii.gz"))
    bvals = _gradients(tiny, "sub-C01")[0][0]
    b0 = np.asarray(img.dataobj)[..., bvals == 0].mean(-1)
    weight = np.where(b0 > 5 * _sidecar(tiny, "sub-C01")["SimulationParameters"]["NoiseSigma"], b0, 0)
    centroid_ijk = np.array(ndimage.center_of_mass(weight))
    centroid = nib.affines.apply_affine(img.affine, centroid_ijk)
    wm, gm, csf, affine = anatomy.mni_tissues()
    mni = nib.affines.apply_affine(affine, np.array(ndimage.center_of_mass(wm + gm + csf)))
    # Within a voxel despite CSF weighting, head pose (<= 4 mm) and the warp.
    assert np.linalg.norm(centroid - mni) < 8.0


# --------------------------------------------------------------------------------------
# Physics
# --------------------------------------------------------------------------------------


def _single_voxel(**fractions: float) -> tissue.VoxelTissue:
    one = np.ones(1)
    return tissue.VoxelTissue(
        wm=fractions.get("wm", 0.0) * one,
        gm=fractions.get("gm", 0.0) * one,
        csf=fractions.get("csf", 0.0) * one,
        fibre=np.array([[1.0, 0.0, 0.0]]),
        radial=np.array([[0.0, 0.0, 1.0]]),
        modulation=0.0 * one,
    )


def test_free_water_voxel_decays_as_exp_minus_b_d() -> None:
    acq = acquisition.load_scheme()
    micro = tissue.Microstructure()
    signal = tissue.simulate_signal(acq, _single_voxel(csf=1.0), micro)[0]
    np.testing.assert_allclose(signal, micro.s0_csf * np.exp(-acq.bvals * 3.0e-3), rtol=1e-5)


def test_white_matter_closed_forms() -> None:
    bvals = np.array([0.0, 1000.0, 2000.0, 3000.0])
    g = np.array([[1.0, 0.0, 0.0]] * 4)
    fibre = np.array([[0.6, 0.8, 0.0]])
    cos2 = 0.36
    # A pure stick: exp(-b D cos^2).
    stick = tissue.white_matter_signal(bvals, g, fibre, f_intra=1.0, f_free=0.0, d_par=2e-3, d_ex_par=2e-3)
    np.testing.assert_allclose(stick[0], np.exp(-bvals * 2e-3 * cos2), rtol=1e-5)
    # Without axons tortuosity makes the extra-axonal space isotropic.
    hindered = tissue.white_matter_signal(bvals, g, fibre, f_intra=0.0, f_free=0.0, d_par=2e-3, d_ex_par=1.5e-3)
    np.testing.assert_allclose(hindered[0], np.exp(-bvals * 1.5e-3), rtol=1e-5)
    # Tortuosity: D_perp = D_par * f_extra / (f_intra + f_extra) for the zeppelin across the fibre.
    across = np.array([[0.0, 0.0, 1.0]] * 4)
    mixed = tissue.white_matter_signal(bvals, across, fibre, f_intra=0.6, f_free=0.1, d_par=2e-3, d_ex_par=2e-3)
    expected = 0.6 + 0.3 * np.exp(-bvals * 2e-3 * 0.3 / 0.9) + 0.1 * np.exp(-bvals * 3e-3)
    np.testing.assert_allclose(mixed[0], expected, rtol=1e-5)


def test_white_matter_is_darker_along_the_fibre() -> None:
    acq = acquisition.load_scheme()
    micro = tissue.Microstructure()
    fibre = np.array([[0.0, 0.0, 1.0]])
    dirs = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # along, across
    for b in (1000.0, 2000.0, 3500.0):
        e = tissue.white_matter_signal(np.array([b, b]), dirs, fibre, micro.f_intra, micro.f_free_wm, micro.d_par,
                                       micro.d_par, dispersion_deg=micro.dispersion_deg)[0]
        assert e[0] < 0.5 * e[1], b
    # Dispersion makes the bundle less anisotropic.
    coherent = tissue.white_matter_signal(np.array([2000.0, 2000.0]), dirs, fibre, 0.65, 0.05, 1.9e-3, 1.9e-3)[0]
    dispersed = tissue.white_matter_signal(np.array([2000.0, 2000.0]), dirs, fibre, 0.65, 0.05, 1.9e-3, 1.9e-3,
                                           dispersion_deg=30.0)[0]
    assert dispersed[0] > coherent[0] and dispersed[1] < coherent[1]


def test_relaxation_contrast() -> None:
    micro = tissue.Microstructure()
    assert 1000 <= micro.s0_wm <= 3000
    assert micro.s0_wm < micro.s0_gm < micro.s0_csf  # T2-weighted b0
    assert tissue.relaxation_s0("wm", t2_gain=1.4) > micro.s0_wm  # lesions are hyperintense
    # Lesion severity: monotone from barely visible to a black hole; no shine-through when switched off.
    mild, severe = tissue.LesionEffect.from_severity(0.1), tissue.LesionEffect.from_severity(1.0)
    assert severe.intra_factor < mild.intra_factor < 1 and severe.free_gain > mild.free_gain > 0
    assert tissue.LesionEffect.from_severity(0.8, t2_shine_through=False).t2_gain == 1.0


def test_noise_is_rician_at_the_requested_snr(tiny: Path) -> None:
    """Background is Rayleigh (mean sigma sqrt(pi/2)); the WM b0 level is SNR x sigma."""
    params = _sidecar(tiny, "sub-C02")["SimulationParameters"]
    snr, sigma = params["SNR"], params["NoiseSigma"]
    settings = CohortSettings()
    assert settings.snr[0] <= snr <= settings.snr[1] and 1000 <= snr * sigma <= 3000
    corner = _data(_dwi(tiny, "sub-C02").with_suffix(".nii.gz"))[:2, :2, :2].astype(float)
    assert corner.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.1)
    assert np.linalg.norm(params["TranslationMm"]) <= settings.pose_translation_mm + 1e-3
    assert np.all(np.abs(params["RotationDeg"]) <= settings.pose_rotation_deg + 1e-3)
    assert all(abs(s - 1) <= settings.head_scaling + 1e-4 for s in params["HeadScaling"])
    assert params["MaxVolumeRotationDeg"] > 0 and params["MaxVolumeTranslationMm"] <= settings.volume_motion_mm + 1e-3


# --------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------


def test_real_lesion_masks_in_patients(tiny: Path) -> None:
    """Patients take the shipped masks in turn; controls get no lesion and no atrophy."""
    names = [p.name.split(".")[0] for p in lesions.packaged_masks()]
    for index, pid in enumerate(("sub-P01", "sub-P02")):
        params = _sidecar(tiny, pid)["SimulationParameters"]
        assert params["LesionMask"] == names[index]
        assert params["NumberOfLesions"] == lesions.LesionAtlas.load(lesions.packaged_masks()[index]).n_components
        assert 0 <= params["VentricleEnlargementMm"] <= CohortSettings().ventricle_mm
        fraction = _data(_lesion(tiny, pid, "probseg"))
        assert fraction.sum() * 6.0**3 > 3000  # several mL of lesion (the masks hold 30 mL each)
    control = _sidecar(tiny, "sub-C01")["SimulationParameters"]
    assert control["NumberOfLesions"] == 0 and control["VentricleEnlargementMm"] == 0 == control["CortexThinning"]


def test_blob_lesion_count_and_extent(legacy: Path) -> None:
    for pid in ("sub-P01", "sub-P02"):
        tiny = legacy
        mask = _data(_lesion(tiny, pid)).astype(bool)
        n_lesions = _sidecar(tiny, pid)["SimulationParameters"]["NumberOfLesions"]
        _, n_components = ndimage.label(mask)
        assert 3 <= n_lesions <= 10
        assert 1 <= n_components <= n_lesions  # touching lesions may merge, none is lost
        b0 = _data(_dwi(tiny, pid).with_suffix(".nii.gz"))[..., 0]
        brain = b0 > 5 * _sidecar(tiny, pid)["SimulationParameters"]["NoiseSigma"]
        assert 0 < mask.sum() < 0.02 * brain.sum()
        assert np.all(brain[mask])  # lesions lie inside the brain


def test_lesions_change_the_signal_as_modelled(legacy: Path) -> None:
    """Lesions: brighter b0 (longer T2), lower S/S0 at every shell (free water, axonal loss)."""
    tiny = legacy  # one shared anatomy: the population's WM is every subject's
    wm1, gm1, csf1, affine = anatomy.mni_tissues()
    grid = anatomy.brain_grid((wm1 + gm1 + csf1) > 0, affine, TINY["voxel_size"])
    wm = anatomy.build_population(grid, np.random.default_rng(0)).wm[::-1]  # the files are stored LAS
    for pid in ("sub-P01", "sub-P02"):
        data = _data(_dwi(tiny, pid).with_suffix(".nii.gz")).astype(float)
        bvals = _gradients(tiny, pid)[0][0]
        mask = _data(_lesion(tiny, pid)).astype(bool)
        nawm = (wm > 0.8) & (_data(_lesion(tiny, pid, "probseg")) == 0)
        b0 = data[..., bvals == 0].mean(-1)
        assert b0[mask].mean() > 1.05 * b0[nawm].mean(), pid
        for b in (1000, 3500):
            ratio = data[..., bvals == b].mean(-1) / b0
            assert ratio[mask].mean() < 0.9 * ratio[nawm].mean(), (pid, b)


def test_lesion_partial_volume_is_exact_for_a_big_sphere() -> None:
    """Voxel fractions of a 20 mm sphere sum to the volume of its logistic-edged indicator.

    For a logistic edge of width w the integral is 4/3 pi R^3 (1 + pi^2 w^2 / R^2).
    """
    grid = anatomy.Grid(shape=(12, 12, 12), affine=np.diag([3.0, 3.0, 3.0, 1.0]))
    lesion = lesions.BlobLesion(centre=np.array([17.0, 17.5, 16.2]), axes=np.eye(3), semi_axes=np.full(3, 10.0),
                                effect=tissue.LesionEffect.from_severity(0.5))
    still = anatomy.SubjectWarp(anatomy.RigidMotion(rotation=np.eye(3), translation=np.zeros(3), centre=np.zeros(3)))
    population = SimpleNamespace(grid=grid)
    _, fraction = lesions._blob_partial_volume(lesion, still, population)
    volume = fraction.sum() * 27.0
    w = lesions.LESION_EDGE_MM
    assert volume == pytest.approx(4 / 3 * np.pi * 10.0**3 * (1 + np.pi**2 * w**2 / 10.0**2), rel=0.005)
    assert fraction.max() > 0.99 and fraction.min() < 1e-3


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------


def test_same_seed_same_bytes_and_subjects_independent_of_cohort_size(tiny: Path, tmp_path: Path) -> None:
    small = make_demo_cohort(tmp_path / "small", n_controls=1, n_patients=1, voxel_size=6.0, seed=3, workers=1)
    for rel in ("sub-C01/dwi/sub-C01_dwi.nii.gz", "sub-P01/dwi/sub-P01_dwi.nii.gz", "sub-P01/dwi/sub-P01_dwi.bvec",
                "derivatives/lesions/sub-P01/dwi/sub-P01_space-dwi_desc-lesion_mask.nii.gz"):
        assert (small / rel).read_bytes() == (tiny / rel).read_bytes(), rel


def test_other_seed_other_data(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "other" / "sub-C01" / "dwi").mkdir(parents=True)  # empty folders (as Snakemake makes) are fine
    other = make_demo_cohort(tmp_path / "other", n_controls=1, n_patients=1, voxel_size=6.0, seed=4)
    for pid in ("sub-C01", "sub-P01"):
        a = _data(_dwi(tiny, pid).with_suffix(".nii.gz"))
        b = _data(_dwi(other, pid).with_suffix(".nii.gz"))
        assert a.shape == b.shape and not np.array_equal(a, b)
    assert not np.array_equal(_data(_lesion(tiny, "sub-P01")), _data(_lesion(other, "sub-P01")))
