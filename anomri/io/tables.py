"""BIDS-style TSV tables: the evaluation tables, image scores and training histories."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from anomri.io.atomic import write_json, write_text

__all__ = ["read_table", "write_table"]


def write_table(path: str | Path, rows: Iterable[dict], columns: Sequence[str],
                descriptions: dict[str, dict[str, str]] | None = None) -> None:
    """Write rows as a BIDS-style TSV (``n/a`` for missing values) atomically.

    With ``descriptions``, also the JSON sidecar describing the columns.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, delimiter="\t", lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row.get(k)) for k in columns})
    write_text(path, buffer.getvalue())
    if descriptions is not None:
        write_json(Path(path).with_suffix(".json"), {c: descriptions[c] for c in columns})


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a TSV as dicts of strings (``n/a`` kept as is)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _format(value: object) -> object:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
