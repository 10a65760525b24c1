"""Global image descriptors, the model of normal descriptors, calibration on normal images and fusion.

Numerics are checked against closed forms (a constant image, a pure sinusoid,
a ramp, alternating columns, a known Gaussian) or brute force, not against
the code itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import mahalanobis
from scipy.stats import norm

from anomri.images.descriptors import (GlobalDescriptorModel, band_edges, descriptor_names, extract_descriptors,
                                       local_maps, prepare_image, radial_band_power)
from anomri.images.fusion import NormalCalibration, fuse

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCALES = (2.0, 4.0)


def _named(descriptors: np.ndarray, size: int, scales=SCALES) -> dict[str, float]:
    return dict(zip(descriptor_names(size, scales), descriptors))


def test_a_constant_image_has_its_value_everywhere_and_no_contrast() -> None:
    value = 0.37
    named = _named(extract_descriptors(np.full((1, 1, 48, 48), value), size=48, scales=SCALES)[0], 48)
    assert len(named) == len(descriptor_names(48, SCALES))
    for name, got in named.items():
        if name.startswith("intensity-std") or name.startswith(("local-std", "local-gradient")) or (
                name.startswith("local-mean") and name.endswith("-std")):
            assert got == pytest.approx(0.0, abs=1e-9), name
        elif name.startswith("spectrum"):
            assert got == pytest.approx(-12.0), name  # log10 of the power floor: no power at all
        else:  # the mean and every quantile of the pixels and of the local mean
            assert got == pytest.approx(value, abs=1e-6), name


def _sinusoid(size: int, frequency: int, amplitude: float) -> np.ndarray:
    rows = amplitude * np.sin(2 * np.pi * frequency * np.arange(size) / size + 0.4)
    return 0.5 + np.broadcast_to(rows[None, :], (size, size))  # varies along the columns


@pytest.mark.parametrize(("frequency", "band"), [(6, 2), (12, 3), (22, 4), (28, 4)])
def test_a_sinusoid_puts_half_its_squared_amplitude_in_its_band(frequency: int, band: int) -> None:
    # The Hann window spreads frequency f over f - 1 .. f + 1 (and +-1 across): all of it inside f's band here.
    size, amplitude = 64, 0.3
    edges = band_edges(size)
    assert edges[band] <= frequency - 1 and np.hypot(frequency + 1, 1) < edges[band + 1]
    image = _sinusoid(size, frequency, amplitude)
    power = radial_band_power(image[None])[0]
    expected = np.zeros(len(edges) - 1)
    expected[band] = amplitude**2 / 2
    np.testing.assert_allclose(power, expected, atol=1e-12)
    # Turned by 90 degrees it is the same sinusoid.
    np.testing.assert_allclose(radial_band_power(image.T[None])[0], expected, atol=1e-12)


def test_a_sinusoid_near_a_band_edge_keeps_its_total_power() -> None:
    # f = 3 spreads over 2 .. 4 cycles, across the edge at 4: split between two bands, summing to A^2 / 2 (Parseval).
    power = radial_band_power(_sinusoid(64, 3, 0.3)[None])[0]
    assert power.sum() == pytest.approx(0.3**2 / 2)
    assert power[1] > 0 and power[2] > 0


def test_band_edges_are_octaves_up_to_the_corner_of_the_spectrum() -> None:
    edges = band_edges(64)
    np.testing.assert_array_equal(edges[:-1], [1, 2, 4, 8, 16])
    assert edges[-1] > np.hypot(32, 32)  # every non-DC bin falls in a band


def test_gradient_of_a_ramp_is_its_slope_and_local_std_of_alternating_columns_is_a_half() -> None:
    size, slope = 64, 0.01
    ramp = np.broadcast_to(slope * np.arange(size)[None, :], (size, size))[None]
    gradient = local_maps(ramp, 2.0)["gradient"][0]
    # Away from the border (4 sigma + the Sobel stencil) the smoothed ramp is the ramp: gradient = slope.
    np.testing.assert_allclose(gradient[:, 10:-10], slope, rtol=1e-9)
    assert np.median(gradient) == pytest.approx(slope)
    columns = np.broadcast_to((np.arange(size) % 2)[None, :], (size, size)).astype(float)[None]
    maps = local_maps(columns, 4.0)
    # A wide Gaussian sees half ones, half zeros: mean 1/2, mean square 1/2, std sqrt(1/2 - 1/4) = 1/2.
    # (to within the alternating sum of the sampled, truncated kernel, ~1e-5)
    np.testing.assert_allclose(maps["mean"][0][:, 20:-20], 0.5, atol=1e-4)
    np.testing.assert_allclose(maps["std"][0][:, 20:-20], 0.5, atol=1e-4)


def test_intensity_descriptors_are_the_pixel_moments_and_quantiles() -> None:
    image = np.random.default_rng(0).uniform(0, 1, (32, 32))
    named = _named(extract_descriptors(image[None], size=32, scales=SCALES)[0], 32)
    assert named["intensity-mean"] == pytest.approx(image.mean())
    assert named["intensity-std"] == pytest.approx(image.std())
    assert named["intensity-q0.5"] == pytest.approx(np.median(image))
    assert named["intensity-q0.99"] == pytest.approx(np.sort(image.ravel())[int(0.99 * 1023)], abs=2e-3)


def test_images_of_any_size_and_colour_give_one_vector_each_batched_or_not() -> None:
    rng = np.random.default_rng(1)
    images = [rng.uniform(0, 1, (3, 40, 56)), rng.uniform(0, 1, (1, 70, 30)), rng.uniform(0, 1, (50, 50))]
    together = extract_descriptors(images, size=32, scales=SCALES)
    one_by_one = extract_descriptors(iter(images), size=32, scales=SCALES, batch_size=1)
    assert together.shape == (3, len(descriptor_names(32, SCALES)))
    np.testing.assert_allclose(together, one_by_one)
    # Colour becomes the mean of the channels.
    np.testing.assert_allclose(prepare_image(images[0], 32), prepare_image(images[0].mean(0), 32), atol=1e-6)
    assert extract_descriptors([], size=32, scales=SCALES).shape == (0, len(descriptor_names(32, SCALES)))


def _gaussian(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = np.array([1.0, -2.0, 0.5])
    a = rng.normal(size=(3, 3))
    covariance = a @ a.T + 0.5 * np.eye(3)
    return rng.multivariate_normal(mean, covariance, n), mean, covariance


@pytest.mark.parametrize(("estimator", "rtol"), [("ledoit-wolf", 0.03), ("mcd", 0.06)])
def test_mahalanobis_score_matches_scipy_under_the_true_gaussian(estimator: str, rtol: float) -> None:
    samples, mean, covariance = _gaussian(20000, 0)
    fit = GlobalDescriptorModel(estimator).fit(samples)
    points = mean + np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, -3.0, 1.0], [1.0, 1.0, 1.0]])
    expected = [mahalanobis(p, mean, np.linalg.inv(covariance)) for p in points]
    np.testing.assert_allclose(fit.score(points[1:]), expected[1:], rtol=rtol)
    assert fit.score(points[:1])[0] < 0.1  # the centre is not novel


def test_knn_score_is_the_mean_distance_to_the_k_nearest_standardised_normals() -> None:
    rng = np.random.default_rng(2)
    normal = rng.normal(size=(30, 4)) * [1.0, 5.0, 0.1, 2.0]
    queries = rng.normal(size=(5, 4))
    fit = GlobalDescriptorModel("knn", k=3).fit(normal)
    center = np.median(normal, axis=0)
    scale = 1.4826 * np.median(np.abs(normal - center), axis=0)
    expected = []
    for q in queries:
        distances = sorted(np.sqrt((((q - center) / scale - (x - center) / scale) ** 2).sum()) for x in normal)
        expected.append(np.mean(distances[:3]))
    np.testing.assert_allclose(fit.score(queries), expected)


def test_a_descriptor_constant_on_normal_images_still_counts_without_dividing_by_zero() -> None:
    normal = np.column_stack([np.random.default_rng(3).normal(size=50), np.zeros(50)])
    for estimator in ("ledoit-wolf", "knn"):
        fit = GlobalDescriptorModel(estimator).fit(normal)
        scores = fit.score(np.array([[0.0, 0.0], [0.0, 1.0]]))
        assert np.isfinite(scores).all() and scores[1] > 10 * scores[0] + 1


def test_bad_model_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="estimator"):
        GlobalDescriptorModel("svm")
    with pytest.raises(ValueError, match="two normal"):
        GlobalDescriptorModel().fit(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="finite"):
        GlobalDescriptorModel().fit(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_calibration_is_the_z_score_against_normal_scores_and_fusion_takes_max_or_mean() -> None:
    normal = np.array([1.0, 2.0, 3.0, 4.0])
    calibration = NormalCalibration.fit(normal)
    std = np.sqrt(((normal - 2.5) ** 2).sum() / 3)
    np.testing.assert_allclose(calibration.zscore([2.5, 2.5 + 2 * std]), [0.0, 2.0])
    a, b = np.array([0.0, 3.0, -1.0]), np.array([1.0, 1.0, -2.0])
    np.testing.assert_array_equal(fuse([a, b], "max"), [1.0, 3.0, -1.0])
    np.testing.assert_array_equal(fuse([a, b], "mean"), [0.5, 2.0, -1.5])
    assert NormalCalibration.fit([2.0, 2.0]).std > 0
    with pytest.raises(ValueError, match="rule"):
        fuse([a], "median")


def test_gaussian_normals_calibrate_to_standard_normal_quantiles() -> None:
    # Under a Gaussian null the calibrated z of the 97.5th percentile is about 1.96.
    scores = np.random.default_rng(4).normal(10.0, 3.0, 200000)
    calibration = NormalCalibration.fit(scores)
    assert calibration.zscore(10.0 + 3.0 * norm.ppf(0.975)) == pytest.approx(1.96, abs=0.02)


def _textures(n: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Normal images: a random brightness, a random left-right illumination ramp and fine speckle."""
    cols = np.linspace(-0.5, 0.5, size)[None, None, :]
    base = rng.uniform(0.3, 0.6, (n, 1, 1)) + rng.uniform(-0.1, 0.1, (n, 1, 1)) * cols
    return base + ndimage.gaussian_filter(rng.normal(0, 0.05, (n, size, size)), (0, 1, 1))


def test_a_large_soft_change_is_novel_where_normal_images_vary_only_in_brightness_and_ramp() -> None:
    """A soft bump over a quarter of the image, a third of the images' brightness range, changes no single
    pixel much, but changes the image: the descriptors' model must rank bumped images above normal ones."""
    rng = np.random.default_rng(5)
    size = 64
    fit = GlobalDescriptorModel().fit(extract_descriptors(_textures(300, rng), size=size, scales=SCALES))
    held_back = _textures(60, rng)
    rows, cols = np.mgrid[0:size, 0:size]
    radius = np.sqrt(0.25 * size * size / np.pi)  # the blob's half-maximum region covers a quarter of the image
    blob = np.exp(-np.log(2) * ((rows - 30) ** 2 + (cols - 36) ** 2) / radius**2)
    normal_scores = fit.score(extract_descriptors(held_back, size=size, scales=SCALES))
    bumped_scores = fit.score(extract_descriptors(held_back + 0.1 * blob, size=size, scales=SCALES))
    assert (bumped_scores[:, None] > normal_scores[None, :]).mean() > 0.95


def test_descriptors_of_real_tiles_are_finite_and_fast() -> None:
    root = SHARED_DATA / "magnetic_tile" / "train" / "good"
    if not root.is_dir():
        pytest.skip("shared magnetic_tile data absent")
    from anomri.io.images import read_image

    images = [read_image(p) for p in sorted(root.iterdir())[:40]]
    start = time.perf_counter()
    descriptors = extract_descriptors(images, size=128)
    per_image = (time.perf_counter() - start) / len(images)
    assert descriptors.shape == (40, len(descriptor_names(128, (2.0, 4.0, 8.0)))) and np.isfinite(descriptors).all()
    assert per_image < 0.1  # a few ms on one core; generous for a loaded machine
