"""Noise estimation from b0 replicates and noisier copies of a scan."""

from __future__ import annotations

import numpy as np
import pytest
from dipy.core.gradients import gradient_table

from anomri.dmri.noise import add_noise, estimate_sigma


def _gtab(n_b0: int, n_dw: int = 4):
    bvals = np.r_[np.zeros(n_b0), np.full(n_dw, 1000.0)]
    bvecs = np.r_[np.zeros((n_b0, 3)), np.eye(3)[np.arange(n_dw) % 3]]
    return gradient_table(bvals, bvecs=bvecs)


def test_sigma_from_the_background_with_piesno() -> None:
    """A head in air: the background is Rayleigh noise, which PIESNO finds whatever the head does."""
    rng = np.random.default_rng(3)
    sigma = 20.0
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 40, 12)], indexing="ij"), -1)
    head = np.linalg.norm((ijk - [20, 20, 6]) / [12, 14, 20], axis=-1) < 1
    gtab = _gtab(2, 10)
    signal = np.where(head[..., None], rng.uniform(200, 1500, head.shape + (12,)), 0.0)
    signal[..., 0] *= 1.3  # b0 volumes moved and brighter: irrelevant to the background
    data = np.hypot(signal + sigma * rng.standard_normal(signal.shape), sigma * rng.standard_normal(signal.shape))
    assert estimate_sigma(data, gtab, head) == pytest.approx(sigma, rel=0.03)


@pytest.mark.parametrize("n_b0", [3, 6])
def test_sigma_from_b0_replicates(n_b0: int) -> None:
    """A scan cropped to the brain has no background: the b0 volumes' spread gives sigma."""
    rng = np.random.default_rng(0)
    sigma = 12.0
    truth = rng.uniform(400, 1500, (30, 30, 20))  # brain b0 SNR >= 33: Gaussian regime
    gtab = _gtab(n_b0)
    data = np.repeat(truth[..., None], len(gtab.bvals), -1)
    data = np.hypot(data + sigma * rng.standard_normal(data.shape), sigma * rng.standard_normal(data.shape))
    mask = np.ones(truth.shape, bool)
    assert estimate_sigma(data, gtab, mask) == pytest.approx(sigma, rel=0.02)
    # Head motion between b0 volumes at 5 % of the voxels (edges) barely moves the median-based estimate.
    moved = data.copy()
    edge = rng.random(truth.shape) < 0.05
    moved[edge, 0] *= 1.5
    assert estimate_sigma(moved, gtab, mask) == pytest.approx(sigma, rel=0.05)


def test_added_noise_adds_in_quadrature() -> None:
    rng = np.random.default_rng(1)
    signal = np.full((200_000,), 1000.0)
    base = np.hypot(signal + 10 * rng.standard_normal(signal.shape), 10 * rng.standard_normal(signal.shape))
    noisier = add_noise(base, 10 * np.sqrt(3.0), np.random.default_rng(2))
    # Total std sqrt(10^2 + 300) = 20 at high SNR; the mean barely moves (Rician bias sigma^2 / 2S).
    assert noisier.std() == pytest.approx(20.0, rel=0.02)
    assert noisier.mean() == pytest.approx(np.sqrt(1000.0**2 + 20.0**2), rel=1e-3)


def test_preprocessing_records_the_noise_level_of_a_scan_and_of_its_noisier_copy(tmp_path) -> None:
    """A head in air with known sigma: the sidecar's sigma and SNR, measured and at twice the noise."""
    import json

    import nibabel as nib

    from anomri.cli import main
    from tests.conftest import RAW_FEATURES, write_gradients

    rng = np.random.default_rng(5)
    sigma = 20.0
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 40, 12)], indexing="ij"), -1)
    head = np.linalg.norm((ijk - [19.5, 19.5, 5.5]) / [12, 14, 20], axis=-1) < 1
    gtab = _gtab(2, 10)
    signal = np.where(head[..., None], np.where(gtab.b0s_mask, 1000.0, 400.0), 0.0)
    data = np.hypot(signal + sigma * rng.standard_normal(signal.shape), sigma * rng.standard_normal(signal.shape))
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), tmp_path / "dwi.nii.gz")
    write_gradients(tmp_path / "dwi.bval", tmp_path / "dwi.bvec", gtab.bvals, gtab.bvecs)
    nib.save(nib.Nifti1Image(head.astype(np.uint8), np.eye(4)), tmp_path / "mask.nii.gz")
    records = {}
    for factor in (1.0, 2.0):
        out = tmp_path / f"out{factor:g}"
        assert main(["preprocess", "--dwi", str(tmp_path / "dwi.nii.gz"), "--bval", str(tmp_path / "dwi.bval"),
                     "--bvec", str(tmp_path / "dwi.bvec"), "--mask", str(tmp_path / "mask.nii.gz"),
                     "--output-dir", str(out), "--prefix", "sub-01", "--noise-factor", str(factor),
                     *RAW_FEATURES]) == 0
        sidecar = out / "sub-01" / "dwi" / "sub-01_space-dwi_desc-qspace_features.json"
        records[factor] = json.loads(sidecar.read_text())["Preprocessing"]["noise"]
    # The b0 signal is 1000 in the head (Rician bias sigma^2 / 2000 = 0.2): SNR 50 measured, 25 at twice the noise.
    assert records[1.0]["sigma"] == pytest.approx(sigma, rel=0.05)
    assert records[1.0]["snr"] == pytest.approx(1000.0 / sigma, rel=0.05)
    assert records[2.0]["sigma"] == pytest.approx(2 * sigma, rel=0.05)
    assert records[2.0]["snr"] == pytest.approx(1000.0 / (2 * sigma), rel=0.05)


def test_a_noise_free_scan_is_named_in_a_warning_and_left_unmatched(tmp_path, capsys) -> None:
    """Zero background and no noise: the noise estimate is 0, which would silently drop noise matching."""
    import json

    import nibabel as nib

    from anomri.cli import main
    from tests.conftest import RAW_FEATURES, write_gradients

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 40, 12)], indexing="ij"), -1)
    head = np.linalg.norm((ijk - [19.5, 19.5, 5.5]) / [12, 14, 20], axis=-1) < 1
    gtab = _gtab(2, 10)
    data = np.where(head[..., None], np.where(gtab.b0s_mask, 1000.0, 400.0), 0.0)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), tmp_path / "sub-09_dwi.nii.gz")
    write_gradients(tmp_path / "dwi.bval", tmp_path / "dwi.bvec", gtab.bvals, gtab.bvecs)
    assert main(["preprocess", "--dwi", str(tmp_path / "sub-09_dwi.nii.gz"), "--bval", str(tmp_path / "dwi.bval"),
                 "--bvec", str(tmp_path / "dwi.bvec"), "--output-dir", str(tmp_path / "out"),
                 "--prefix", "sub-09", *RAW_FEATURES]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if " WARNING: " in line]
    assert any("sub-09_dwi.nii.gz" in m and "not noise-matched" in m for m in warnings), warnings
    sidecar = tmp_path / "out" / "sub-09" / "dwi" / "sub-09_space-dwi_desc-qspace_features.json"
    assert json.loads(sidecar.read_text())["Preprocessing"]["noise"] == {"sigma": None, "snr": None}

