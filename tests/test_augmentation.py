"""Subject-level augmentation of healthy scans (anomri.dmri.augmentation), through ``anomri preprocess``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table

from anomri.cli import main
from conftest import RAW_FEATURES, unit_directions, write_gradients

SHAPE = (20, 20, 8)
BVALS = np.r_[0.0, 0.0, np.full(12, 1000.0), np.full(12, 2500.0)]


def _scan(tmp_path, signal: np.ndarray, head: np.ndarray, bvecs: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(np.where(head[..., None], signal, 0.0).astype(np.float32), np.eye(4)),
             tmp_path / "dwi.nii.gz")
    write_gradients(tmp_path / "dwi.bval", tmp_path / "dwi.bvec", BVALS, bvecs)
    nib.save(nib.Nifti1Image(head.astype(np.uint8), np.eye(4)), tmp_path / "mask.nii.gz")


def _features(tmp_path, option: str, scale: float) -> tuple[np.ndarray, dict]:
    """Raw S/S0 features of the copy at ``scale`` and the sidecar's Preprocessing record."""
    out = tmp_path / f"out{option}{scale:g}"
    assert main(["preprocess", "--dwi", str(tmp_path / "dwi.nii.gz"), "--bval", str(tmp_path / "dwi.bval"),
                 "--bvec", str(tmp_path / "dwi.bvec"), "--mask", str(tmp_path / "mask.nii.gz"),
                 "--output-dir", str(out), "--prefix", "sub-01", option, str(scale), *RAW_FEATURES]) == 0
    path = out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-qspace_features.nii.gz"
    record = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())["Preprocessing"]
    return np.asarray(nib.load(path).dataobj), record


def _head() -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    return np.linalg.norm((ijk - [9.5, 9.5, 3.5]) / [7, 8, 10], axis=-1) < 1


def _bvecs() -> np.ndarray:
    return np.r_[np.zeros((2, 3)), unit_directions(1), unit_directions(2)]


def test_diffusivity_augmentation_scales_every_diffusivity(tmp_path) -> None:
    """S/S0 = exp(-b D) per voxel; the copy at scale s has exp(-b s D) = (S/S0)^s in every voxel and volume."""
    head = _head()
    diffusivity = 0.5e-3 + 2e-3 * np.random.default_rng(6).uniform(size=head.shape)  # mm^2/s, per voxel
    _scan(tmp_path, 1000.0 * np.exp(-BVALS * diffusivity[..., None]), head, _bvecs())
    dw = BVALS > 0
    for scale in (0.9, 1.1):
        features, record = _features(tmp_path, "--diffusivity-scale", scale)
        assert record["diffusivity_augmentation"] == {"scale": scale}
        expected = np.exp(-BVALS[dw] * scale * diffusivity[head][:, None])
        np.testing.assert_allclose(features[head], expected, rtol=1e-4)


def test_anisotropy_augmentation_scales_the_directional_contrast_around_its_mean(tmp_path) -> None:
    """A tensor per voxel: -log(S/S0)/b = D(g). The copy at t has D'(g) = mean_shell D + t (D(g) - mean_shell D)."""
    head = _head()
    rng = np.random.default_rng(7)
    bvecs = _bvecs()
    fibre = rng.normal(size=(*head.shape, 3))
    fibre /= np.linalg.norm(fibre, axis=-1, keepdims=True)
    cos2 = np.einsum("xyzc,vc->xyzv", fibre, bvecs) ** 2
    d_par, d_perp = 1.7e-3, 0.4e-3 + 0.2e-3 * rng.uniform(size=head.shape)[..., None]
    apparent = d_perp + (d_par - d_perp) * cos2
    _scan(tmp_path, 1000.0 * np.exp(-BVALS * apparent), head, bvecs)
    for scale in (0.9, 1.1):
        features, record = _features(tmp_path, "--anisotropy-scale", scale)
        assert record["anisotropy_augmentation"] == {"scale": scale}
        for b in (1000.0, 2500.0):
            shell = np.flatnonzero(BVALS[BVALS > 0] == b)
            d = apparent[head][:, np.flatnonzero(BVALS == b)]
            expected = d.mean(1, keepdims=True) + scale * (d - d.mean(1, keepdims=True))
            np.testing.assert_allclose(-np.log(features[head][:, shell]) / b, expected, rtol=1e-4)


@pytest.mark.parametrize("option", ["--diffusivity-scale", "--anisotropy-scale"])
def test_a_scale_beyond_a_subject_level_shift_is_one_error_line(tmp_path, option: str, capsys) -> None:
    _scan(tmp_path, np.ones((*SHAPE, len(BVALS))), _head(), _bvecs())
    assert main(["preprocess", "--dwi", str(tmp_path / "dwi.nii.gz"), "--bval", str(tmp_path / "dwi.bval"),
                 "--bvec", str(tmp_path / "dwi.bvec"), "--output-dir", str(tmp_path / "o"), "--prefix", "sub-01",
                 option, "3"]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("anomri: error:")]
    assert len(errors) == 1 and "must lie in [0.5, 2.0]" in errors[0]
    assert not (tmp_path / "o").exists()


def _preprocess_args(tmp_path, out, *extra: str) -> list[str]:
    return ["preprocess", "--dwi", str(tmp_path / "dwi.nii.gz"), "--bval", str(tmp_path / "dwi.bval"),
            "--bvec", str(tmp_path / "dwi.bvec"), "--output-dir", str(out), "--prefix", "sub-01", *RAW_FEATURES,
            *extra]


def test_copies_made_in_the_scans_job_equal_copies_made_one_by_one(tmp_path) -> None:
    """``--copies`` preprocesses the scan, then each copy within the scan's own brain mask: every map and sidecar
    equals that of the copy preprocessed on its own with the scan's mask (the workflow's former copy jobs)."""
    head = _head()
    diffusivity = 0.5e-3 + 2e-3 * np.random.default_rng(8).uniform(size=head.shape)
    _scan(tmp_path, 1000.0 * np.exp(-BVALS * diffusivity[..., None]), head, _bvecs())
    out, copies = tmp_path / "derivatives", tmp_path / "augmented"
    assert main(_preprocess_args(tmp_path, out, "--copies", "diffusivity-90", "anisotropy-110",
                                 "--copies-dir", str(copies))) == 0
    scan_mask = out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-brain_mask.nii.gz"
    for copy, option, scale in (("diffusivity-90", "--diffusivity-scale", "0.9"),
                                ("anisotropy-110", "--anisotropy-scale", "1.1")):
        alone = tmp_path / f"alone-{copy}"
        assert main(_preprocess_args(tmp_path, alone, "--mask", str(scan_mask), option, scale)) == 0
        files = sorted(p.relative_to(alone) for p in alone.rglob("*_space-dwi_*"))
        assert len(files) == 6  # brain mask, mean b0, features, each with its sidecar
        for name in files:
            made, expected = copies / copy / name, alone / name
            if name.suffix == ".json":
                assert json.loads(made.read_text()) == json.loads(expected.read_text()), name
            else:
                np.testing.assert_array_equal(*(np.asarray(nib.load(p).dataobj) for p in (made, expected)))


@pytest.mark.parametrize("extra, message", [
    (["--copies", "noise-x", "--copies-dir", "c"], "named <kind>-<100 x factor>"),
    (["--copies", "noise-150"], "needs --copies-dir"),
    (["--copies", "noise-150", "--copies-dir", "c", "--diffusivity-scale", "0.9"], "leave out --diffusivity-scale"),
])
def test_bad_copies_are_one_error_line_before_anything_is_written(tmp_path, extra, message, capsys) -> None:
    _scan(tmp_path, np.ones((*SHAPE, len(BVALS))), _head(), _bvecs())
    assert main(_preprocess_args(tmp_path, tmp_path / "o", *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("anomri: error:")]
    assert len(errors) == 1 and "--copies" in errors[0] and message in errors[0], errors
    assert not (tmp_path / "o").exists()
