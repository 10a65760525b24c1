"""Per-pixel normalisation of anomaly maps by normal validation maps, and the robust image score map-top."""

from __future__ import annotations

import numpy as np
import pytest

from anomri.errors import InputError
from anomri.images.normalization import NormalMapStatistics, top_fraction_mean
from anomri.images.settings import ImageSettings


def _maps_with_bright_edges(n: int, rng: np.random.Generator) -> np.ndarray:
    """Normal maps (n, 16, 16): noise, plus a large error on the top and bottom rows of every image."""
    maps = rng.uniform(0.0, 0.1, (n, 16, 16))
    maps[:, :2] += rng.uniform(2.0, 4.0, (n, 1, 1))
    maps[:, -2:] += rng.uniform(2.0, 4.0, (n, 1, 1))
    return maps


def test_systematic_edge_errors_cancel_and_the_defect_stands_out() -> None:
    rng = np.random.default_rng(0)
    statistics = NormalMapStatistics.fit(_maps_with_bright_edges(40, rng))
    normal = _maps_with_bright_edges(1, rng)[0]
    defective = normal.copy()
    defective[7:9, 7:9] += 1.0  # weaker than the edges, but where normal maps are quiet
    assert np.unravel_index(defective.argmax(), defective.shape)[0] in (0, 1, 14, 15)
    z_normal, z_defective = statistics.normalize(np.stack([normal, defective]))
    assert np.unravel_index(z_defective.argmax(), z_defective.shape) in {(7, 7), (7, 8), (8, 7), (8, 8)}
    # Raw, the defect changes the top of the map not at all; normalised, it dominates it.
    assert top_fraction_mean(defective, 0.01) == top_fraction_mean(normal, 0.01)
    assert top_fraction_mean(z_defective, 0.01) > 5 * top_fraction_mean(z_normal, 0.01)


def test_leave_one_out_equals_fitting_on_the_others() -> None:
    maps = np.random.default_rng(1).gamma(2.0, 1.0, (6, 5, 5))
    statistics = NormalMapStatistics.fit(maps, floor=0.2)
    left_out = statistics.normalize_left_out(maps)
    floor = 0.2 * np.median(maps.std(0))  # the floor comes from all the maps
    for i in range(len(maps)):
        others = np.delete(maps, i, axis=0)
        expected = (maps[i] - others.mean(0)) / (others.std(0) + floor)
        np.testing.assert_allclose(left_out[i], expected, rtol=1e-5, atol=1e-5)


def test_normalize_by_hand() -> None:
    maps = np.array([[[1.0, 0.0]], [[3.0, 0.0]]])  # pixel 0: mean 2, std 1; pixel 1: mean 0, std 0
    statistics = NormalMapStatistics.fit(maps, floor=1.0)  # floor = 1 * median(1, 0) = 0.5
    np.testing.assert_allclose(statistics.normalize(np.array([[[4.0, 1.0]]])), [[[2.0 / 1.5, 1.0 / 0.5]]])


def test_top_fraction_mean_by_hand() -> None:
    values = np.arange(1.0, 11.0).reshape(2, 5)
    assert top_fraction_mean(values, 0.2) == pytest.approx(9.5)
    assert top_fraction_mean(values, 1e-6) == 10.0  # at least one pixel: the maximum
    assert top_fraction_mean(values, 1.0) == pytest.approx(5.5)
    with pytest.raises(ValueError):
        top_fraction_mean(values, 0.0)


def test_statistics_need_two_maps_and_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        NormalMapStatistics.fit(np.zeros((1, 4, 4)))
    with pytest.raises(InputError):
        ImageSettings(score_normalization="median")
    with pytest.raises(InputError):
        ImageSettings(top_fraction=0.0)
