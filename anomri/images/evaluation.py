"""Evaluating every method's image scores and pixel maps against the test labels and masks, by defect type."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from anomri.evaluate.image_metrics import image_metrics, pixel_metrics_by_subset
from anomri.images.global_scores import fused_score_rows
from anomri.images.outputs import SCORE_COLUMNS, map_path
from anomri.io.atomic import write_json
from anomri.io.images import ImageRecord, read_mask, scan_mvtec
from anomri.io.tables import write_table

logger = logging.getLogger(__name__)

__all__ = ["EVALUATION_COLUMNS", "read_scores", "evaluate_methods"]

EVALUATION_COLUMNS = [
    "method", "score", "primary", "defect_type", "n_normal", "n_anomalous",
    "image_auroc", "image_auprc", "image_best_f1", "image_threshold", "image_f1_at_threshold",
    "image_fpr_at_threshold", "pixel_auroc", "aupro", "pixel_best_dice", "pixel_threshold",
    "pixel_dice_at_threshold",
]
#: Curves are thinned to about this many points for the report.
MAX_CURVE_POINTS = 400


def read_scores(path: str | Path) -> list[dict]:
    """Rows of a scores TSV written by :func:`anomri.images.scoring.score_folder`, values as float."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for row in rows:
        row["value"] = float(row["value"])
    return rows


def _thin(x: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), MAX_CURVE_POINTS)).round().astype(int))
    return {"fpr": x[keep].round(5).tolist(), "tpr": y[keep].round(5).tolist()}


def _values(rows: list[dict], split: str, score: str, keys: list[tuple[str, str]]) -> np.ndarray:
    by_key = {(r["label"], r["stem"]): r["value"] for r in rows if r["split"] == split and r["score"] == score}
    return np.array([by_key[k] for k in keys], np.float64)


def evaluate_methods(
    root: str | Path,
    scores_paths: dict[str, str | Path],
    thresholds_paths: dict[str, str | Path],
    maps_dirs: dict[str, str | Path],
    image_scores_out: str | Path,
    evaluation_out: str | Path,
    curves_out: str | Path,
    threshold_percentile: float = 99.0,
    fpr_limit: float = 0.3,
    pooled: dict[str, Sequence[str]] | None = None,
    descriptor_rows: list[dict] | None = None,
    fusion: str = "max",
) -> list[dict]:
    """Evaluate each method on the test images of ``root``; write the pooled scores, the table and ROC curves.

    Rows: one per method, score and defect type (``all`` pools every test
    image; a defect type pools it with the normal test images; each entry
    ``name: types`` of ``pooled`` adds a row ``name`` pooling those defect
    types, those present, with the normal test images). Image
    thresholds are the ``threshold_percentile`` of the normal validation
    scores; pixel metrics describe the method's map and fill the rows of its
    primary score only.

    ``descriptor_rows`` (:func:`anomri.images.global_scores.descriptor_score_rows`)
    add image-level rows of their own method and, for every method, rows of
    its primary score fused with them by ``fusion``
    (:func:`~anomri.images.global_scores.fused_score_rows`); neither has a
    map, so they are never primary and have no pixel metrics.
    """
    folder = scan_mvtec(root)
    test: list[ImageRecord] = folder.test
    keys = [(r.label, r.stem) for r in test]
    anomalous = np.array([r.is_anomalous for r in test])
    subsets = {"all": np.ones(len(test), bool)}
    subsets |= {d: np.array([r.label in ("good", d) for r in test]) for d in folder.defect_types}
    for name, types in (pooled or {}).items():
        if set(types) & set(folder.defect_types):
            subsets[name] = np.array([r.label == "good" or r.label in types for r in test])
    all_rows, table, curves = [], [], {}

    def image_rows(method: str, score_id: str, rows: list[dict], primary: str) -> list[dict]:
        """One row per subset with the image metrics of ``score_id``."""
        test_values = _values(rows, "test", score_id, keys)
        val_values = np.array([r["value"] for r in rows if r["split"] == "val" and r["score"] == score_id])
        return [{"method": method, "score": score_id, "primary": score_id == primary, "defect_type": subset,
                 "n_normal": int((chosen & ~anomalous).sum()), "n_anomalous": int((chosen & anomalous).sum())}
                | image_metrics(test_values[chosen], anomalous[chosen], val_values, threshold_percentile)
                for subset, chosen in subsets.items()]

    for method, scores_path in scores_paths.items():
        rows = read_scores(scores_path)
        thresholds = json.loads(Path(thresholds_paths[method]).read_text())
        primary = thresholds["primary_score"]
        if descriptor_rows:
            rows += fused_score_rows(rows, descriptor_rows, primary, fusion)
        all_rows += rows
        maps = [np.load(map_path(maps_dirs[method], r.label, r.stem)) for r in test]
        masks = [read_mask(r, m.shape) for r, m in zip(test, maps)]
        score_ids = list(dict.fromkeys(r["score"] for r in rows))
        # The map's metrics, for every subset from one sort of all test pixels.
        map_rows = pixel_metrics_by_subset(maps, masks, subsets, thresholds["pixel_threshold"], fpr_limit)
        for score_id in score_ids:
            for row in image_rows(method, score_id, rows, primary):
                table.append(row | (map_rows[row["defect_type"]] if score_id == primary else {}))
            if score_id == primary and anomalous.any() and (~anomalous).any():
                test_values = _values(rows, "test", score_id, keys)
                image_fpr, image_tpr, _ = roc_curve(anomalous, test_values)
                pixel_fpr, pixel_tpr, _ = roc_curve(np.concatenate([m.ravel() for m in masks]),
                                                    np.concatenate([m.ravel() for m in maps]))
                curves[method] = {"score": primary, "image": _thin(image_fpr, image_tpr),
                                  "pixel": _thin(pixel_fpr, pixel_tpr)}
        logger.info("evaluated %s on %d test images", method, len(test))
    if descriptor_rows:
        all_rows += descriptor_rows
        method, score_id = descriptor_rows[0]["method"], descriptor_rows[0]["score"]
        table += image_rows(method, score_id, descriptor_rows, primary="")
    write_table(image_scores_out, [r | {"value": f"{r['value']:.10g}"} for r in all_rows], SCORE_COLUMNS)
    write_table(evaluation_out, table, EVALUATION_COLUMNS)
    write_json(curves_out, curves)
    return table

