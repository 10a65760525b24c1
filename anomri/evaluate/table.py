"""Per-patient evaluation of novelty and probability maps against lesion masks."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

import numpy as np

from anomri.evaluate.metrics import auprc, auroc, best_dice
from anomri.io.atomic import write_text

COLUMNS = ["participant_id", "session", "score", "auroc", "auprc", "best_dice", "n_lesion_voxels", "n_brain_voxels"]


def evaluate_maps(
    participant_id: str, session: str | None, maps: dict[str, np.ndarray], lesion: np.ndarray
) -> list[dict]:
    """One row per map of a patient; maps and lesion are the brain-mask voxels (1-D)."""
    rows = []
    for score_id, values in maps.items():
        dice, _ = best_dice(values, lesion)
        rows.append({
            "participant_id": participant_id, "session": session or "n/a", "score": score_id,
            "auroc": auroc(values, lesion), "auprc": auprc(values, lesion), "best_dice": dice,
            "n_lesion_voxels": int(lesion.sum()), "n_brain_voxels": int(lesion.size),
        })
    return rows


def write_table(path: str, rows: Iterable[dict], columns: list[str] = COLUMNS) -> None:
    """Write rows as a BIDS-style TSV (``n/a`` for missing values) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, delimiter="\t", lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row.get(k)) for k in columns})
    write_text(path, buffer.getvalue())


def _format(value: object) -> object:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
