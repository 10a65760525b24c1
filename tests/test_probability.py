"""Calibration and lesion probability: empirical CDF, post-processing, false-positive control."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from anomri.maps.postprocess import FWHM_TO_SIGMA, PostProcessing
from anomri.maps.probability import EmpiricalNull


def test_cdf_matches_brute_force_count(tmp_path) -> None:
    rng = np.random.default_rng(0)
    null = rng.normal(size=5000)
    null[:100] = 0.5  # ties
    scores = np.concatenate([rng.normal(size=300), [0.5, -10.0, 10.0]])
    model = EmpiricalNull({"s": null})
    expected = np.array([(null <= s).mean() for s in scores])
    np.testing.assert_allclose(model.cdf("s", scores), expected, atol=1e-7)
    path = tmp_path / "null.npz"
    model.save(path)
    np.testing.assert_allclose(EmpiricalNull.load(path).cdf("s", scores), expected, atol=1e-7)


def test_healthy_voxels_flagged_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(1)
    calibration, new_healthy = rng.gamma(2.0, size=200_000), rng.gamma(2.0, size=200_000)
    probability = EmpiricalNull({"s": calibration}).cdf("s", new_healthy)
    for level in (0.01, 0.001):
        flagged = (probability > 1 - level).mean()
        # Binomial standard error on 200k voxels is ~2e-4 at 1 % and ~7e-5 at 0.1 %.
        assert abs(flagged - level) < 4 * np.sqrt(level * (1 - level) / len(new_healthy)) + 1e-4


def test_postprocessing_round_trips_through_the_null_file(tmp_path) -> None:
    post = PostProcessing(erosion_voxels=2, smoothing_fwhm_mm=5.0)
    path = tmp_path / "null.npz"
    EmpiricalNull({"a": np.arange(3.0)}, post).save(path)
    assert EmpiricalNull.load(path).postprocessing == post


def test_smoothing_never_leaks_across_the_mask() -> None:
    rng = np.random.default_rng(2)
    mask = np.zeros((20, 20, 20), bool)
    mask[4:16, 4:16, 4:16] = True
    volume = rng.normal(size=mask.shape).astype(np.float32)
    other = volume.copy()
    other[~mask] = 1e6  # whatever lies outside the brain must not matter
    post = PostProcessing(smoothing_fwhm_mm=4.0)
    a, mask_a = post.apply(volume, mask, (2.0, 2.0, 2.0))
    b, _ = post.apply(other, mask, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(a, b)
    assert np.all(a[~mask_a] == 0)
    # Inside, it is the normalised convolution with sigma = FWHM / 2.355 / voxel size.
    sigma = 4.0 * FWHM_TO_SIGMA / 2.0
    masked = np.where(mask, volume, 0)
    expected = ndi.gaussian_filter(masked, sigma) / ndi.gaussian_filter(mask.astype(float), sigma)
    np.testing.assert_allclose(a[mask], expected[mask], rtol=1e-4, atol=1e-5)


def test_constant_map_stays_constant_after_smoothing() -> None:
    mask = np.zeros((15, 15, 15), bool)
    mask[3:12, 2:13, 5:10] = True
    volume = np.full(mask.shape, 7.0, np.float32)
    out, _ = PostProcessing(smoothing_fwhm_mm=6.0).apply(volume, mask, (3.0, 3.0, 3.0))
    np.testing.assert_allclose(out[mask], 7.0, rtol=1e-5)


def test_erosion_peels_the_brain_edge() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True
    out, eroded = PostProcessing(erosion_voxels=1).apply(np.ones(mask.shape), mask, (1.0, 1.0, 1.0))
    assert eroded.sum() == 4**3
    assert eroded[3:7, 3:7, 3:7].all()
    assert out[2, 4, 4] == 0 and out[4, 4, 4] == 1
