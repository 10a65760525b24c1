"""Detection metrics against hand-computed examples and brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomri.evaluate.metrics import (
    auprc, auroc, best_dice, bootstrap_ci, dice, lesion_wise, pr_points, roc_points, threshold_at_fpr,
)

# ---------------------------------------------------------------- AUROC


def test_auroc_hand_example():
    # Lesion scores 0.35, 0.8 vs healthy 0.1, 0.4: pairs (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4.
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # With a tie: lesion 0.5, 0.9 vs healthy 0.2, 0.5: 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4 pairs.
    assert auroc(np.array([0.2, 0.5, 0.5, 0.9]), np.array([False, False, True, True])) == pytest.approx(0.875)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_mann_whitney_pair_count(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding makes many ties
    assert len(np.unique(scores)) < 100
    diff = scores[labels][:, None] - scores[~labels][None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auroc_single_class_is_nan_with_warning(caplog):
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([False, False])))
    assert "only one class" in caplog.text


# ---------------------------------------------------------------- AUPRC


def test_auprc_hand_examples():
    # Thresholds 0.9, 0.8, 0.7 give (precision, recall) (1, 1/2), (1/2, 1/2), (2/3, 1):
    # AP = Σ ΔR·P = 1/2·1 + 0·1/2 + 1/2·2/3 = 5/6 (0.6, 0.5 add no recall).
    assert auprc(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0])) == pytest.approx(5 / 6)
    # Tie at 0.7 enters as one threshold: (1, 1/3), (2/3, 2/3), (3/4, 1):
    # AP = 1/3·1 + 1/3·2/3 + 1/3·3/4 = 29/36.
    assert auprc(np.array([0.9, 0.7, 0.7, 0.2]), np.array([1, 1, 0, 1])) == pytest.approx(29 / 36)


def test_auprc_without_lesion_is_nan():
    assert math.isnan(auprc(np.array([0.1, 0.2]), np.array([0, 0])))


# ---------------------------------------------------------------- Dice


def test_dice_hand_example_and_empty_cases():
    # |P∩L| = 2 (positions 0 and 4), |P| = 3, |L| = 3 -> 2·2 / 6.
    assert dice(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])) == pytest.approx(2 / 3)
    assert dice(np.zeros((2, 3, 4), bool), np.zeros((2, 3, 4), bool)) == 1.0
    assert dice(np.zeros(4, bool), np.array([0, 1, 0, 0])) == 0.0
    with pytest.raises(ValueError, match="0/1"):
        dice(np.array([0.2, 0.9]), np.array([0, 1]))


def test_best_dice_hand_example():
    # 3 lesion voxels. Threshold -> (predicted, TP, Dice = 2TP/(predicted+3)):
    # 0.9 -> (1,1,2/4), 0.8 -> (2,1,2/5), 0.7 -> (3,2,4/6), 0.6 -> (4,3,6/7), 0.1 -> (5,3,6/8).
    value, threshold = best_dice(np.array([0.7, 0.1, 0.9, 0.6, 0.8]), np.array([1, 0, 1, 1, 0]))
    assert value == pytest.approx(6 / 7) and threshold == 0.6


def test_best_dice_ties_and_equal_maxima():
    # Tied scores are predicted together: t=0.5 -> 3 predicted, 1 TP: 2/5; t=0.2 -> 4, 2 TP: 4/6.
    assert best_dice(np.array([0.5, 0.5, 0.5, 0.2]), np.array([1, 0, 0, 1])) == pytest.approx((2 / 3, 0.2))
    # Dice 2/3 at t=0.9 (1 predicted, 1 TP) and at t=0.6 (4, 2): the larger threshold wins.
    assert best_dice(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 0, 1])) == pytest.approx((2 / 3, 0.9))
    assert best_dice(np.array([0.3, 0.1]), np.array([0, 0])) == (1.0, math.inf)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_best_dice_equals_loop_over_every_threshold(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.2
    scores = rng.integers(0, 25, 500) + 3.0 * labels * rng.random(500)
    scores[rng.random(500) < 0.5] //= 1  # half the scores on an integer grid: ties
    best, best_t = -1.0, None
    for t in np.unique(scores)[::-1]:  # decreasing, so '>' keeps the largest maximising threshold
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        value = 2 * tp / (2 * tp + np.sum(predicted & ~labels) + np.sum(~predicted & labels))
        if value > best:
            best, best_t = value, t
    value, threshold = best_dice(scores, labels)
    assert value == pytest.approx(best, abs=1e-12)
    assert threshold == best_t


# ---------------------------------------------------------------- threshold at FPR


def test_threshold_at_fpr_uniform_grid():
    grid = np.arange(1000) / 1000  # 0.000, 0.001, ..., 0.999
    null = np.random.default_rng(0).permutation(grid)
    for fpr, n_flagged in [(0.05, 50), (0.01, 10), (0.0125, 12), (0.5, 500)]:
        # The n_flagged largest values 0.999 down to (1000 - n_flagged)/1000 are flagged.
        t = threshold_at_fpr(null, fpr)
        assert t == (1000 - n_flagged) / 1000
        assert np.mean(null >= t) <= fpr < np.mean(null >= t - 0.001)  # the next lower grid value flags too many
    assert threshold_at_fpr(null, 1.0) == 0.0
    t0 = threshold_at_fpr(null, 0.0)
    assert t0 > 0.999 and np.mean(null >= t0) == 0.0


def test_threshold_at_fpr_ties():
    null = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2], float)
    # mean(null >= 2) = 0.4, mean(null >= 1) = 0.8, mean(null >= 0) = 1.
    assert threshold_at_fpr(null, 0.5) == 2.0  # achieved 0.4: ties cannot be split
    assert threshold_at_fpr(null, 0.8) == 1.0
    above = threshold_at_fpr(null, 0.3)  # even the maximum flags 0.4 > 0.3
    assert above > 2.0 and above == np.nextafter(2.0, np.inf)


def test_threshold_at_fpr_equals_brute_force_with_ties():
    rng = np.random.default_rng(5)
    null = np.round(rng.normal(size=400), 1)
    for fpr in (0.001, 0.01, 0.05, 0.1, 0.33):
        allowed = [t for t in np.unique(null) if np.mean(null >= t) <= fpr]
        # No null value qualifies at fpr = 0.001 (one voxel is 0.0025): then just above the maximum.
        assert threshold_at_fpr(null, fpr) == min(allowed, default=np.nextafter(null.max(), np.inf))


# ---------------------------------------------------------------- lesion-wise


def test_lesion_wise_two_lesions_one_missed_one_fp_blob():
    truth = np.zeros((20, 20, 20), bool)
    pred = np.zeros_like(truth)
    truth[2:5, 2:5, 2:5] = True  # lesion A: 27 voxels
    truth[10:12, 10:12, 10:12] = True  # lesion B: 8 voxels, nothing predicted there
    pred[3:6, 3:6, 3:6] = True  # overlaps A in 2·2·2 voxels: A detected
    pred[15:18, 2:4, 2:4] = True  # FP blob, 12 voxels, far from any lesion
    result = lesion_wise(pred, truth, voxel_volume_mm3=1.5)
    assert result["n_lesions"] == 2
    assert result["n_detected"] == 1
    assert result["lesion_sensitivity"] == 0.5
    assert result["n_fp_components"] == 1
    # Predicted 27 + 12 = 39 voxels, true 27 + 8 = 35: error +4 voxels = 6 mm³, +4/35.
    assert result["volume_error_voxels"] == 4
    assert result["volume_error_mm3"] == pytest.approx(6.0)
    assert result["relative_volume_error"] == pytest.approx(4 / 35)


def test_lesion_wise_connectivity():
    truth = np.zeros((4, 4, 4), bool)
    truth[0, 0, 0] = truth[1, 1, 1] = True  # touch at a corner only
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = True
    assert lesion_wise(pred, truth)["n_lesions"] == 1  # 26-connectivity: one lesion, detected
    assert lesion_wise(pred, truth)["lesion_sensitivity"] == 1.0
    six = lesion_wise(pred, truth, connectivity=6)
    assert six["n_lesions"] == 2 and six["n_detected"] == 1
    empty = lesion_wise(pred, np.zeros_like(truth))
    assert math.isnan(empty["lesion_sensitivity"]) and empty["n_fp_components"] == 1
    assert math.isnan(empty["volume_error_mm3"])


def test_lesion_wise_minimum_overlap():
    """A lesion counts as detected only when at least the required share of its voxels is flagged."""
    truth = np.zeros((20, 20, 20), bool)
    truth[1:6, 1:6, 1:5] = True  # lesion A: 100 voxels
    truth[10:12, 10:12, 10:12] = True  # lesion B: 8 voxels
    pred = np.zeros_like(truth)
    pred[1:6, 1, 1:3] = True  # 10 voxels of A: exactly 10 %
    pred[10, 10, 10] = True  # 1 voxel of B: 12.5 %
    pred[1, 2, 1] = True  # an 11th voxel of A
    assert lesion_wise(pred, truth)["n_detected"] == 2  # any voxel
    assert lesion_wise(pred, truth, min_overlap=0.1)["n_detected"] == 2  # A 11 %, B 12.5 %
    assert lesion_wise(pred, truth, min_overlap=0.12)["n_detected"] == 1  # B only
    assert lesion_wise(pred, truth, min_overlap=0.13)["n_detected"] == 0
    pred[1, 2, 1] = False  # A at exactly 10 %: the boundary counts
    assert lesion_wise(pred, truth, min_overlap=0.1)["n_detected"] == 2
    pred[1, 1, 1] = False  # A at 9 %
    assert lesion_wise(pred, truth, min_overlap=0.1)["n_detected"] == 1
    # A stray flagged voxel on a big lesion is not a detection; nothing flagged never is.
    assert lesion_wise(np.zeros_like(truth), truth, min_overlap=0.0)["n_detected"] == 0
    with pytest.raises(ValueError):
        lesion_wise(pred, truth, min_overlap=1.5)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_constant_data_collapses():
    assert bootstrap_ci(np.full(12, 0.75), n_boot=500) == (0.75, 0.75, 0.75)
    assert bootstrap_ci(np.array([0.75, np.nan, 0.75]), n_boot=500) == (0.75, 0.75, 0.75)
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([np.nan, np.nan])))


def test_bootstrap_drops_nan_and_is_deterministic():
    values = np.random.default_rng(1).normal(size=20)
    with_nan = np.insert(values, [3, 7], np.nan)
    assert bootstrap_ci(with_nan, n_boot=2000, seed=3) == bootstrap_ci(values, n_boot=2000, seed=3)
    assert bootstrap_ci(values, n_boot=2000, seed=3) != bootstrap_ci(values, n_boot=2000, seed=4)
    mean, low, high = bootstrap_ci(values, n_boot=2000)
    assert mean == pytest.approx(values.mean()) and low < mean < high


def test_bootstrap_width_matches_normal_theory():
    # For n = 400 the bootstrap distribution of the mean is close to normal with
    # sd = s_pop / sqrt(n), s_pop the plug-in (ddof=0) sd: half-width ≈ 1.96 sd.
    values = np.random.default_rng(2).normal(size=400)
    _, low, high = bootstrap_ci(values, n_boot=20000, ci=0.95)
    expected = 1.959964 * values.std() / np.sqrt(values.size)
    assert (high - low) / 2 == pytest.approx(expected, rel=0.05)


def test_bootstrap_coverage_on_normal_data():
    # 95% intervals for the mean of N(0, 1) samples of 30 patients contain 0 in
    # about 93-95% of data sets (percentile bootstrap under-covers slightly);
    # 200 data sets give a binomial sd of ~0.017.
    rng = np.random.default_rng(0)
    hits = []
    for seed in range(200):
        _, low, high = bootstrap_ci(rng.normal(size=30), n_boot=2000, seed=seed)
        hits.append(low <= 0.0 <= high)
    assert 0.88 <= np.mean(hits) <= 0.99


# ---------------------------------------------------------------- ROC and PR points


def test_roc_points_hand_example():
    # Scores 0.9 (L), 0.8 (H), 0.7 (L), 0.6 (H), 0.5 (H): 2 lesion, 3 healthy voxels. Corners
    # (FPR, TPR): (0, 0), (0, 1/2) at 0.9, (1/3, 1/2) at 0.8, (1/3, 1) at 0.7, then (1, 1) at 0.5;
    # (2/3, 1) at 0.6 lies on a straight stretch and is dropped.
    fpr, tpr = roc_points(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0]))
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 2, 1 / 2, 1, 1])
    assert roc_points(np.array([0.1, 0.2]), np.array([0, 0]))[0].size == 0


def test_pr_points_hand_example():
    # Same example, increasing recall: (R, P) = (0, 1) end point, (1/2, 1) at 0.9, (1/2, 1/2) at 0.8,
    # (1, 2/3) at 0.7, (1, 1/2) at 0.6, (1, 2/5) at 0.5.
    recall, precision = pr_points(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0]))
    np.testing.assert_allclose(recall, [0, 1 / 2, 1 / 2, 1, 1, 1])
    np.testing.assert_allclose(precision, [1, 1, 1 / 2, 2 / 3, 1 / 2, 2 / 5])
    assert pr_points(np.array([0.1, 0.2]), np.array([0, 0]))[0].size == 0


def test_curve_points_are_thinned_but_keep_ends_and_shape():
    rng = np.random.default_rng(0)
    labels = rng.random(20000) < 0.05
    scores = rng.normal(size=20000) + 2 * labels
    fpr, tpr = roc_points(scores, labels, max_points=100)
    assert fpr.size <= 160 and (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # The thinned curve's area is the full one's (trapezoids between corners).
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels), abs=2e-3)
    # Log-spaced anchors keep low-FPR corners that even spacing alone would skip.
    assert np.sum(fpr[fpr > 0] < 1e-3) >= 3
    recall, precision = pr_points(scores, labels, max_points=100)
    assert recall.size <= 160 and recall[0] == 0 and recall[-1] == 1 and np.all(np.diff(recall) >= 0)
