"""Image and pixel metrics against values computed by hand or by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from anomri.evaluate.image_metrics import (
    area_until,
    aupro,
    image_metrics,
    normal_threshold,
    pixel_auroc,
    pixel_metrics,
    pro_curve,
)

# Two images; regions: R1 = the two top-left pixels of image 1, R2 = the top-right pixel of image 2.
MAPS = [np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.4]]), np.array([[0.5, 0.6], [0.05, 0.7]])]
MASKS = [np.array([[1, 1, 0], [0, 0, 0]], bool), np.array([[0, 1], [0, 0]], bool)]


def test_pro_curve_by_hand() -> None:
    # Lowering the threshold through 0.9, 0.8, 0.7, 0.6, 0.5, ...: R1 half then fully covered
    # (PRO 0.25, 0.5), a normal pixel (FPR 1/7), R2 covered (PRO 1), then the other 6 normal pixels.
    fpr, pro = pro_curve(MAPS, MASKS)
    expected_fpr = [0, 0, 0, 1 / 7, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1]
    expected_pro = [0, 0.25, 0.5, 0.5, 1, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(fpr, expected_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, expected_pro, atol=1e-12)


def test_aupro_by_hand() -> None:
    # Area up to FPR 0.3: 0.5 * 1/7 (PRO 0.5 until 1/7) + 1 * (0.3 - 1/7), normalised by 0.3.
    expected = (0.5 / 7 + (0.3 - 1 / 7)) / 0.3
    assert aupro(MAPS, MASKS, fpr_limit=0.3) == pytest.approx(expected, abs=1e-12)
    assert aupro(MAPS, MASKS, fpr_limit=1.0) == pytest.approx(0.5 / 7 + 6 / 7, abs=1e-12)


def test_pro_weights_small_regions_like_large_ones() -> None:
    # One big region found first and one tiny region found last: PRO stays at 1/2 until the tiny one.
    big = np.zeros((10, 10), bool)
    big[:5] = True
    tiny = np.zeros((10, 10), bool)
    tiny[9, 9] = True
    scores = np.where(big, 2.0, 0.0)
    scores[9, 9] = 1.0
    scores[9, 0] = 1.5  # one normal pixel above the tiny region
    fpr, pro = pro_curve([scores], [big | tiny])
    assert pro[np.searchsorted(fpr, 1 / 49, side="left")] == pytest.approx(0.5)
    assert aupro([scores], [big | tiny], 0.3) == pytest.approx((0.5 / 49 + (0.3 - 1 / 49)) / 0.3)


def test_area_until_interpolates_at_the_limit() -> None:
    assert area_until(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5) == pytest.approx(0.125)
    assert area_until(np.array([0.0, 0.2, 0.6]), np.array([1.0, 1.0, 0.0]), 0.4) == pytest.approx(0.2 + 0.15)


def test_pixel_auroc_is_the_pairwise_probability() -> None:
    rng = np.random.default_rng(0)
    maps = [rng.random((4, 5)), rng.random((3, 3))]
    masks = [rng.random((4, 5)) < 0.3, rng.random((3, 3)) < 0.3]
    values = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([m.ravel() for m in masks])
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(values[labels], values[~labels])]
    assert pixel_auroc(maps, masks) == pytest.approx(np.mean(pairs))


def test_normal_threshold_flags_at_most_the_percentile() -> None:
    normal = np.arange(1.0, 101.0)
    t = normal_threshold(normal, 99.0)
    assert t == 100.0 and np.mean(normal >= t) == 0.01
    assert normal_threshold(normal, 95.0) == 96.0


def test_normal_threshold_never_flags_everything_on_ties() -> None:
    # All normal validation images score the same: an "adaptive" threshold at that value would flag
    # every image. Ours flags none of the normal ones.
    t = normal_threshold(np.zeros(20), 99.0)
    assert t > 0.0
    assert not np.any(np.zeros(20) >= t)


def test_image_metrics_by_hand() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    anomalous = np.array([False, False, True, True])
    # Validation normals 0.00 .. 0.99: the 90th-percentile threshold 0.9 flags 10 % of them.
    out = image_metrics(scores, anomalous, np.arange(100) / 100, 90.0)
    assert out["image_auroc"] == pytest.approx(0.75)  # 3 of 4 (anomalous, normal) pairs ordered right
    assert out["image_threshold"] == pytest.approx(0.9)
    # Threshold 0.9 flags nothing: F1 = 0, no normal test image flagged.
    assert out["image_f1_at_threshold"] == 0.0 and out["image_fpr_at_threshold"] == 0.0
    # Best F1: flag {0.8} -> 2/3; flag {0.8, 0.4, 0.35} -> 2*2/(3+2) = 0.8.
    assert out["image_best_f1"] == pytest.approx(0.8)
    low = image_metrics(scores, anomalous, np.array([0.0, 0.1, 0.2, 0.3]), 75.0)
    # Threshold 0.3 flags 0.4, 0.35, 0.8: F1 = 0.8, half of the normal test images flagged.
    assert low["image_threshold"] == pytest.approx(0.3)
    assert low["image_f1_at_threshold"] == pytest.approx(0.8) and low["image_fpr_at_threshold"] == 0.5


def test_pixel_metrics_dice_at_threshold() -> None:
    out = pixel_metrics(MAPS, MASKS, pixel_threshold=0.6)
    # >= 0.6 flags 0.9, 0.8, 0.7 (normal), 0.6: TP 3, FP 1, FN 0 -> Dice 6/7.
    assert out["pixel_dice_at_threshold"] == pytest.approx(6 / 7)
    assert out["pixel_best_dice"] == pytest.approx(6 / 7)
    assert out["aupro"] == pytest.approx(aupro(MAPS, MASKS, 0.3))
    assert out["pixel_auroc"] == pytest.approx(1 - 1 / 21)  # only 0.7 beats one anomalous pixel (0.6)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc([np.zeros((2, 2))], [np.zeros((2, 3), bool)])


def test_pixel_metrics_by_subset_match_the_reference_metrics_on_ties() -> None:
    from anomri.evaluate.image_metrics import pixel_metrics_by_subset
    from anomri.evaluate.metrics import auroc, best_dice, dice

    rng = np.random.default_rng(3)
    # Coarse values (many ties), images of different sizes, some with several regions, one with none.
    maps = [rng.integers(0, 12, size=shape).astype(np.float32) / 4 for shape in ((6, 7), (5, 5), (8, 4), (3, 9))]
    masks = [m > 2.0 for m in maps[:3]] + [np.zeros((3, 9), bool)]
    masks[1][0, :] = True
    subsets = {"all": np.ones(4, bool), "first and last": np.array([True, False, False, True]),
               "middle": np.array([False, True, True, False])}
    out = pixel_metrics_by_subset(maps, masks, subsets, pixel_threshold=1.5, fpr_limit=0.3)
    for name, chosen in subsets.items():
        m = [maps[i] for i in np.flatnonzero(chosen)]
        g = [masks[i] for i in np.flatnonzero(chosen)]
        values = np.concatenate([a.ravel() for a in m])
        labels = np.concatenate([a.ravel() for a in g])
        assert out[name]["pixel_auroc"] == pytest.approx(auroc(values, labels), abs=1e-12), name
        assert out[name]["aupro"] == pytest.approx(aupro(m, g, 0.3), abs=1e-12), name
        assert out[name]["pixel_best_dice"] == pytest.approx(best_dice(values, labels)[0], abs=1e-12), name
        assert out[name]["pixel_dice_at_threshold"] == pytest.approx(dice(values >= 1.5, labels)), name
        assert out[name] == pixel_metrics(m, g, 1.5, 0.3)
    with pytest.raises(ValueError, match="subset"):
        pixel_metrics_by_subset(maps, masks, {"bad": np.ones(3, bool)}, 1.0)
