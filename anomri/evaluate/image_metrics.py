"""Image-level and pixel-level anomaly-detection metrics (MVTec-AD conventions).

Image metrics take one score per image; pixel metrics take lists of maps and
boolean masks of equal shapes (images may differ in size). Higher scores are
more anomalous everywhere. The generic metrics (AUROC, AUPRC, best Dice =
best F1, Dice at a threshold, a threshold from normal scores) come from
:mod:`anomri.evaluate.metrics`; this module adds the per-region overlap
(PRO) curve and its normalised area up to a false-positive rate (AUPRO), and
the evaluation of one set of scores and maps, by defect type.

Decision thresholds come from **normal validation images only**: the
threshold flags at most ``100 - percentile`` % of them (e.g. 1 % for the 99th
percentile). It never depends on the test anomalies and, unlike an "adaptive"
F1-optimal threshold computed on normal-only data, can never degenerate into
flagging everything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from anomri.evaluate.metrics import auprc, auroc, best_dice, dice, threshold_at_fpr

logger = logging.getLogger(__name__)

__all__ = [
    "normal_threshold", "pro_curve", "aupro", "area_until", "pixel_auroc", "image_metrics", "pixel_metrics",
    "pixel_metrics_by_subset",
]


def normal_threshold(normal_scores: np.ndarray, percentile: float = 99.0) -> float:
    """Threshold from normal validation scores: flags at most (100 - percentile) % of them.

    ``threshold_at_fpr(normal_scores, 1 - percentile / 100)``: the smallest
    normal score t with mean(normal >= t) <= 1 - percentile / 100; above the
    maximum (flagging none) when ties make that impossible.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100]; got {percentile}")
    # (100 - p) / 100, not 1 - p / 100: the latter rounds 90 % to 0.0999..., one image short.
    return threshold_at_fpr(np.asarray(normal_scores).ravel(), (100.0 - percentile) / 100.0)


def _flatten(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    for m, g in zip(maps, masks):
        if np.shape(m) != np.shape(g):
            raise ValueError(f"map shape {np.shape(m)} differs from mask shape {np.shape(g)}")
    return (np.concatenate([np.asarray(m, np.float32).ravel() for m in maps]),
            np.concatenate([np.asarray(g, bool).ravel() for g in masks]))


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """AUROC over all pixels of all images pooled (:func:`anomri.evaluate.metrics.auroc`)."""
    return auroc(*_flatten(maps, masks))


def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap against false-positive rate, over every distinct threshold.

    The ground-truth regions are the connected components (4-connectivity) of
    every mask. Predicting ``map >= t``:

    * PRO(t) = mean over regions k of |{p in k : map(p) >= t}| / |k|,
    * FPR(t) = |{p normal : map(p) >= t}| / |{p normal}|, pooled over all images.

    Both are computed exactly for every distinct map value in one sort:
    each region pixel adds 1 / (K |k|) to PRO and each normal pixel
    1 / n_normal to FPR once the threshold drops to its value.

    Returns
    -------
    fpr, pro : ndarray
        Non-decreasing, starting at (0, 0) and ending at (1, 1).
    """
    values, _ = _flatten(maps, masks)
    weights_pro = np.zeros(values.size, np.float64)
    offset, n_regions = 0, 0
    region_weights = []
    for m, g in zip(maps, masks):
        labels, count = ndimage.label(np.asarray(g, bool))
        if count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
            w = np.zeros_like(sizes)
            w[1:] = 1.0 / sizes[1:]
            region_weights.append((offset, w[labels.ravel()]))
        n_regions += count
        offset += labels.size
    if n_regions == 0:
        raise ValueError("no anomalous region: the PRO curve is undefined")
    for start, w in region_weights:
        weights_pro[start:start + w.size] = w / n_regions
    normal = weights_pro == 0.0
    weights_fp = normal / normal.sum()
    order = np.argsort(-values, kind="stable")
    sorted_values = values[order]
    fpr = np.cumsum(weights_fp[order])
    pro = np.cumsum(weights_pro[order])
    # One point per distinct value: tied pixels are predicted together.
    last_of_run = np.append(sorted_values[1:] != sorted_values[:-1], True)
    fpr = np.concatenate([[0.0], np.minimum(fpr[last_of_run], 1.0)])
    pro = np.concatenate([[0.0], np.minimum(pro[last_of_run], 1.0)])
    return fpr, pro


def area_until(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) for x in [0, x_max], y interpolated linearly at x_max.

    ``x`` must be non-decreasing from 0.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and inside.sum() < x.size:
        nxt = int(np.argmax(~inside))
        # Linear interpolation between the last point inside and the first outside.
        t = (x_max - x[nxt - 1]) / (x[nxt] - x[nxt - 1])
        xs = np.append(xs, x_max)
        ys = np.append(ys, y[nxt - 1] + t * (y[nxt] - y[nxt - 1]))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (1 = perfect).

    The standard MVTec-AD segmentation metric (Bergmann et al. 2021), which
    weights small defects as much as large ones. NaN when no mask has an
    anomalous pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1]; got {fpr_limit}")
    if not any(np.any(g) for g in masks):
        logger.warning("AUPRO undefined: no anomalous pixel; returning NaN")
        return float("nan")
    fpr, pro = pro_curve(maps, masks)
    return area_until(fpr, pro, fpr_limit) / fpr_limit


def image_metrics(test_scores: np.ndarray, test_anomalous: np.ndarray, normal_validation_scores: np.ndarray,
                  percentile: float = 99.0) -> dict[str, float]:
    """Image-level detection metrics of one score.

    Returns
    -------
    dict
        ``image_auroc``, ``image_auprc``, ``image_best_f1`` (best over all
        thresholds: an optimistic bound, it looks at the test labels),
        ``image_threshold`` (from the normal validation scores only),
        ``image_f1_at_threshold`` and ``image_fpr_at_threshold`` (fraction of
        normal *test* images flagged at that threshold).
    """
    scores = np.asarray(test_scores, np.float64)
    labels = np.asarray(test_anomalous, bool)
    threshold = normal_threshold(normal_validation_scores, percentile)
    flagged = scores >= threshold
    best_f1 = best_dice(scores, labels)[0] if labels.any() else float("nan")
    return {
        "image_auroc": auroc(scores, labels),
        "image_auprc": auprc(scores, labels),
        "image_best_f1": best_f1,
        "image_threshold": threshold,
        "image_f1_at_threshold": dice(flagged, labels) if labels.any() else float("nan"),
        "image_fpr_at_threshold": float(flagged[~labels].mean()) if (~labels).any() else float("nan"),
    }


def _sorted_pixels(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel of ``maps`` in decreasing map value, with what the pixel metrics need of it.

    Returns the sorted values (float32), their mask labels, 1 / |region| of
    their ground-truth region (0 outside every region), the index of the image
    each came from, and the number of regions of each image.
    """
    values, labels = _flatten(maps, masks)
    inverse_size = np.zeros(values.size, np.float64)
    image = np.empty(values.size, np.int32)
    regions = np.zeros(len(maps), np.int64)
    offset = 0
    for i, g in enumerate(masks):
        components, count = ndimage.label(np.asarray(g, bool))
        size = components.size
        if count:
            sizes = np.bincount(components.ravel(), minlength=count + 1).astype(np.float64)
            weight = np.zeros_like(sizes)
            weight[1:] = 1.0 / sizes[1:]
            inverse_size[offset:offset + size] = weight[components.ravel()]
        image[offset:offset + size] = i
        regions[i] = count
        offset += size
    order = np.argsort(-values, kind="stable")
    return values[order], labels[order], inverse_size[order], image[order], regions


def _metrics_of_sorted(values: np.ndarray, labels: np.ndarray, inverse_size: np.ndarray, n_regions: int,
                       pixel_threshold: float, fpr_limit: float) -> dict[str, float]:
    """:func:`pixel_metrics` of pixels already in decreasing value (:func:`_sorted_pixels`): no sort.

    At each distinct value t (the end of a run of ties, predicted together)
    the prediction ``map >= t`` is a prefix, so true and false positives and
    the PRO are cumulative sums, and every metric is exact: AUROC the
    trapezoidal area of the ROC through those points (ties count one half),
    AUPRO as :func:`aupro`, best Dice as :func:`~anomri.evaluate.metrics.best_dice`.
    """
    n_anomalous = int(labels.sum())
    n_normal = labels.size - n_anomalous
    nan = float("nan")
    if not n_anomalous:
        return {"pixel_auroc": nan, "aupro": nan, "pixel_best_dice": nan, "pixel_threshold": float(pixel_threshold),
                "pixel_dice_at_threshold": nan}
    run_end = np.flatnonzero(np.append(values[1:] != values[:-1], True))
    true_positives = np.cumsum(labels)[run_end]
    false_positives = run_end + 1 - true_positives
    if n_normal:
        fpr = np.concatenate([[0.0], false_positives / n_normal])
        tpr = np.concatenate([[0.0], true_positives / n_anomalous])
        pro = np.concatenate([[0.0], np.minimum(np.cumsum(inverse_size)[run_end] / n_regions, 1.0)])
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
        pro_area = area_until(fpr, pro, fpr_limit) / fpr_limit
    else:
        logger.warning("pixel AUROC and AUPRO undefined: no normal pixel; returning NaN")
        area = pro_area = nan
    n_flagged = int(np.count_nonzero(values >= pixel_threshold))
    return {
        "pixel_auroc": area,
        "aupro": pro_area,
        "pixel_best_dice": float(np.max(2.0 * true_positives / (run_end + 1 + n_anomalous))),
        "pixel_threshold": float(pixel_threshold),
        "pixel_dice_at_threshold": 2.0 * int(labels[:n_flagged].sum()) / (n_flagged + n_anomalous),
    }


def pixel_metrics(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], pixel_threshold: float,
                  fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel-level segmentation metrics of maps against masks.

    Returns
    -------
    dict
        ``pixel_auroc``, ``aupro`` (up to ``fpr_limit``), ``pixel_best_dice``
        (best over all thresholds, optimistic), ``pixel_threshold`` (from
        normal validation maps, given) and ``pixel_dice_at_threshold``.
        All from one sort of the pixels.
    """
    return pixel_metrics_by_subset(maps, masks, {"all": np.ones(len(maps), bool)}, pixel_threshold,
                                   fpr_limit)["all"]


def pixel_metrics_by_subset(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                            subsets: dict[str, np.ndarray], pixel_threshold: float, fpr_limit: float = 0.3
                            ) -> dict[str, dict[str, float]]:
    """:func:`pixel_metrics` of several subsets of the images (boolean selections), from one sort of all pixels.

    Keeping the pixels of a subset keeps their order, so the subsets (e.g. each
    defect type with the normal images) need no sort of their own.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1]; got {fpr_limit}")
    values, labels, inverse_size, image, regions = _sorted_pixels(maps, masks)
    out = {}
    for name, chosen in subsets.items():
        chosen = np.asarray(chosen, bool)
        if chosen.shape != (len(maps),):
            raise ValueError(f"subset {name!r} selects from {chosen.shape} images, not {len(maps)}")
        if chosen.all():
            out[name] = _metrics_of_sorted(values, labels, inverse_size, int(regions.sum()), pixel_threshold,
                                           fpr_limit)
        else:
            keep = chosen[image]
            out[name] = _metrics_of_sorted(values[keep], labels[keep], inverse_size[keep],
                                           int(regions[chosen].sum()), pixel_threshold, fpr_limit)
    return out
