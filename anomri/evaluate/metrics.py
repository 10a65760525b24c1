"""Voxel- and lesion-level detection metrics against a lesion mask.

Voxel metrics take 1-D arrays over brain-mask voxels: ``scores`` (float,
higher = more lesion-like) and ``labels`` (bool, True = lesion voxel).
:func:`lesion_wise` takes 3-D volumes, because lesions are connected
components. :func:`roc_points` and :func:`pr_points` give the curves behind
AUROC and AUPRC, thinned for plotting. :func:`bootstrap_ci` summarises one
metric over patients.
"""

from __future__ import annotations

import logging

import numpy as np

from anomri.maps.postprocess import label_components

logger = logging.getLogger(__name__)

__all__ = [
    "auroc", "auprc", "best_dice", "dice", "threshold_at_fpr", "lesion_wise", "roc_points", "pr_points",
    "bootstrap_ci",
]

def _as_bool(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as bool, refusing values other than 0/1 (a probability map is not a mask)."""
    x = np.asarray(x)
    if x.dtype == bool:
        return x
    if not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or 0/1; found other values")
    return x.astype(bool)


def _scores_and_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of 1-D voxel arrays of equal length; scores finite."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = _as_bool(labels, "labels")
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length; got {scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores, labels


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``).

    Equals the Mann–Whitney probability P(score of a lesion voxel > score of a
    healthy voxel), ties counting one half.

    Returns
    -------
    float
        NaN (with a logged warning) when ``labels`` holds only one class.
    """
    scores, labels = _scores_and_labels(scores, labels)
    if labels.all() or not labels.any():
        logger.warning("AUROC undefined: labels hold only one class; returning NaN")
        return float("nan")
    # sklearn.metrics is imported where a metric is computed (here and below): it takes 2 s, and the figure jobs
    # that read evaluation tables through this package compute none.
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision–recall curve as average precision.

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in
    decreasing order (``sklearn.metrics.average_precision_score``); tied scores
    enter as one threshold. A random score has expected AP equal to the lesion
    prevalence, not 0.5.

    Returns
    -------
    float
        NaN (with a logged warning) when there is no lesion voxel.
    """
    scores, labels = _scores_and_labels(scores, labels)
    if not labels.any():
        logger.warning("AUPRC undefined: no lesion voxel; returning NaN")
        return float("nan")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def dice(pred: np.ndarray, labels: np.ndarray) -> float:
    """Dice overlap ``2|P ∩ L| / (|P| + |L|)`` of two binary arrays of any (equal) shape.

    Defined as 1.0 when both are empty: predicting nothing on a lesion-free
    scan is a perfect answer.
    """
    pred = _as_bool(pred, "pred")
    labels = _as_bool(labels, "labels")
    if pred.shape != labels.shape:
        raise ValueError(f"pred and labels shapes differ: {pred.shape} vs {labels.shape}")
    denominator = int(pred.sum()) + int(labels.sum())
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, labels).sum()) / denominator


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best Dice over all thresholds, predicting lesion where ``score >= t``.

    An exact sweep in O(n log n): sort the scores once in decreasing order;
    at each distinct score value ``t`` the prediction is the prefix up to the
    last voxel scoring ``t``, its true positives a cumulative sum, and
    ``Dice = 2 TP / (2 TP + FP + FN) = 2 TP / (n_predicted + n_lesion)``.

    Returns
    -------
    dice : float
        The best Dice.
    threshold : float
        The largest threshold achieving it. With no lesion voxel the best
        answer is to predict nothing: ``(1.0, inf)``, as :func:`dice` defines.
    """
    scores, labels = _scores_and_labels(scores, labels)
    n_lesion = int(labels.sum())
    if n_lesion == 0:
        return 1.0, float("inf")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_positives = np.cumsum(labels[order])
    # Last position of each run of equal scores: ties are predicted together.
    run_end = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    dices = 2.0 * true_positives[run_end] / (run_end + 1 + n_lesion)
    best = int(np.argmax(dices))  # first maximum = largest threshold
    return float(dices[best]), float(sorted_scores[run_end[best]])


def threshold_at_fpr(null_scores: np.ndarray, fpr: float) -> float:
    """Threshold flagging at most a fraction ``fpr`` of healthy (null) scores.

    With ``flagged(t) = mean(null_scores >= t)``, returns the smallest null
    score ``t`` with ``flagged(t) <= fpr``. Tied null scores are flagged
    together, so ``flagged(t)`` can fall below ``fpr``; it is the largest
    fraction ``<= fpr`` that any threshold achieves. When even the maximum is
    shared by more than ``fpr`` of the null scores (always so for
    ``fpr = 0``), returns the next float above the maximum, which flags none.

    Parameters
    ----------
    null_scores : ndarray
        Scores of healthy voxels, any shape; must be finite.
    fpr : float
        Allowed false-positive fraction, in [0, 1].
    """
    null = np.sort(np.asarray(null_scores, dtype=np.float64), axis=None)
    if null.size == 0 or not np.isfinite(null).all():
        raise ValueError("null_scores must be non-empty and finite")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1]; got {fpr}")
    candidates = np.unique(null)
    # Same float arithmetic as mean(null >= t): count / n.
    flagged = (null.size - np.searchsorted(null, candidates, side="left")) / null.size
    allowed = flagged <= fpr  # False ... False True ... True, flagged decreasing
    if not allowed.any():
        return float(np.nextafter(null[-1], np.inf))
    return float(candidates[np.argmax(allowed)])


def lesion_wise(
    pred_volume: np.ndarray,
    lesion_volume: np.ndarray,
    connectivity: int = 26,
    voxel_volume_mm3: float | None = None,
    min_overlap: float = 0.0,
) -> dict[str, float]:
    """Lesion-level detection counts and volume error of a binary 3-D prediction.

    Lesions are the connected components of ``lesion_volume``; a lesion is
    detected when predicted voxels cover at least ``min_overlap`` of its
    voxels, and at least one (0: any one voxel; 0.1: at least 10 %), so a stray voxel touching a
    large lesion does not count as finding it. Lesion voxels the prediction
    cannot reach (outside the brain mask) are misses like any other.
    Predicted components (same connectivity) overlapping no lesion voxel are
    false-positive components.

    Parameters
    ----------
    pred_volume, lesion_volume : ndarray, 3-D, bool or 0/1
        Prediction and ground truth, same shape.
    connectivity : {6, 18, 26}
        Voxel neighbourhood defining a component: faces, + edges, + corners.
        26 by default, so a lesion touching itself only diagonally counts once.
    voxel_volume_mm3 : float, optional
        Volume of one voxel, to report the volume error in mm³.
    min_overlap : float
        Fraction of a lesion's voxels that must be predicted for it to count
        as detected, in [0, 1].

    Returns
    -------
    dict
        ``n_lesions``, ``n_detected``, ``lesion_sensitivity`` (n_detected /
        n_lesions; NaN without lesions), ``n_fp_components``,
        ``true_volume_voxels``, ``pred_volume_voxels``, ``volume_error_voxels``
        (predicted − true), ``volume_error_mm3`` (NaN without
        ``voxel_volume_mm3``) and ``relative_volume_error`` ((predicted − true)
        / true; NaN without lesions).
    """
    pred = _as_bool(pred_volume, "pred_volume")
    lesion = _as_bool(lesion_volume, "lesion_volume")
    if pred.ndim != 3 or pred.shape != lesion.shape:
        raise ValueError(f"need two 3-D volumes of equal shape; got {pred.shape} and {lesion.shape}")
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must lie in [0, 1]; got {min_overlap}")
    lesion_ids, n_lesions = label_components(lesion, connectivity)
    pred_ids, n_pred_components = label_components(pred, connectivity)
    overlap = pred & lesion
    covered = np.bincount(lesion_ids[overlap], minlength=n_lesions + 1)[1:]
    sizes = np.bincount(lesion_ids.ravel(), minlength=n_lesions + 1)[1:]
    n_detected = int(np.count_nonzero((covered > 0) & (covered >= min_overlap * sizes)))
    n_true_components = np.unique(pred_ids[overlap]).size
    true_volume = int(lesion.sum())
    pred_volume_voxels = int(pred.sum())
    error = pred_volume_voxels - true_volume
    return {
        "n_lesions": int(n_lesions),
        "n_detected": int(n_detected),
        "lesion_sensitivity": n_detected / n_lesions if n_lesions else float("nan"),
        "n_fp_components": int(n_pred_components - n_true_components),
        "true_volume_voxels": true_volume,
        "pred_volume_voxels": pred_volume_voxels,
        "volume_error_voxels": error,
        "volume_error_mm3": error * voxel_volume_mm3 if voxel_volume_mm3 is not None else float("nan"),
        "relative_volume_error": error / true_volume if true_volume else float("nan"),
    }


def _thin(n: int, anchors: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ~``max_points`` of ``n`` curve points, both ends kept.

    Half are evenly spaced along the curve, half are the given ``anchors``
    (indices where the curve first reaches a grid of x values), so that
    stretches dense in points but short in the plot do not crowd out the rest.
    """
    if n <= max_points:
        return np.arange(n)
    even = np.linspace(0, n - 1, max(2, max_points // 2)).round().astype(int)
    return np.unique(np.concatenate([even, np.clip(anchors, 0, n - 1), [0, n - 1]]))


def roc_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Corners of the ROC curve (``sklearn.metrics.roc_curve``), thinned to about ``max_points``.

    The thinned points keep the corners nearest a log-spaced grid of
    false-positive rates, so the curve stays faithful on a logarithmic FPR
    axis, where a rare-lesion detector's useful range lies.

    Returns
    -------
    fpr, tpr : ndarray
        Non-decreasing, from (0, 0) to (1, 1); empty when ``labels`` holds one class.
    """
    scores, labels = _scores_and_labels(scores, labels)
    if labels.all() or not labels.any():
        return np.empty(0), np.empty(0)
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=True)
    grid = np.geomspace(max(fpr[fpr > 0].min(), 1e-6), 1.0, max(2, max_points // 2))
    keep = _thin(fpr.size, np.searchsorted(fpr, grid), max_points)
    return fpr[keep], tpr[keep]


def pr_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Precision–recall points, one per distinct threshold, thinned to about ``max_points``.

    The points behind :func:`auprc` (``sklearn.metrics.precision_recall_curve``),
    in increasing recall, ending with sklearn's (recall 0, precision 1). The
    thinned points keep the first point reaching each of an even grid of recalls.

    Returns
    -------
    recall, precision : ndarray
        Empty when there is no lesion voxel.
    """
    scores, labels = _scores_and_labels(scores, labels)
    if not labels.any():
        return np.empty(0), np.empty(0)
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(labels, scores)
    # sklearn orders by decreasing recall; reverse so that recall increases.
    precision, recall = precision[::-1], recall[::-1]
    grid = np.linspace(0.0, 1.0, max(2, max_points // 2))
    keep = _thin(recall.size, np.searchsorted(recall, grid), max_points)
    return recall[keep], precision[keep]


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 10000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean over patients.

    Resamples the patients with replacement ``n_boot`` times in one draw of
    shape (n_boot, n) (memory grows as n_boot × n: meant for per-patient
    values) and takes the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` percentiles of
    the resampled means. NaN values (e.g. AUROC of a lesion-free patient) are
    dropped first.

    Returns
    -------
    tuple of float
        ``(mean, low, high)``; all NaN (with a logged warning) when no finite
        value remains.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1); got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive; got {n_boot}")
    kept = values[~np.isnan(values)]
    if kept.size < values.size:
        logger.info("bootstrap_ci: dropped %d NaN of %d values", values.size - kept.size, values.size)
    if kept.size == 0:
        logger.warning("bootstrap_ci: no value left after dropping NaN; returning NaN")
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = kept[rng.integers(0, kept.size, size=(n_boot, kept.size))].mean(axis=1)
    low, high = np.percentile(means, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return float(kept.mean()), float(low), float(high)
