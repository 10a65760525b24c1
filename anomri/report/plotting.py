"""Plotting helpers shared by every figure of anomri (matplotlib, no display needed).

Figures are built with the object-oriented :class:`matplotlib.figure.Figure`,
which needs no pyplot state and no display backend, and saved atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from anomri.io.atomic import atomic_path

__all__ = ["save_figure", "display_range", "roc_axes", "pr_axes"]


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> None:
    """Save ``fig`` to ``path`` (format from the suffix) atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)


def display_range(arrays: Sequence[np.ndarray], low: float = 1.0, high: float = 99.9,
                  max_values: int = 20000) -> tuple[float, float]:
    """Percentile display range of the values of ``arrays`` together.

    One range for a set of maps makes their brightness comparable. Each array
    contributes an evenly strided subsample of about ``max_values`` values,
    enough for percentiles and cheap on large volumes.
    """
    pooled = np.concatenate([np.ravel(a)[:: max(1, np.size(a) // max_values)] for a in arrays])
    vmin, vmax = np.percentile(pooled, [low, high])
    return float(vmin), float(max(vmax, vmin + 1e-12))


def roc_axes(ax: Axes, log_fpr: bool = False, min_fpr: float = 1e-4) -> None:
    """Labels, limits and chance line of a ROC panel.

    With ``log_fpr`` the false-positive rate axis is logarithmic from
    ``min_fpr``: a rare-lesion detector is used at FPRs of 1 % or less, a
    sliver of a linear axis.
    """
    chance = np.geomspace(min_fpr, 1.0, 50) if log_fpr else np.array([0.0, 1.0])
    ax.plot(chance, chance, color="0.7", lw=0.8, ls="--")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", ylim=(0, 1.01))
    if log_fpr:
        ax.set_xscale("log")
        ax.set_xlim(min_fpr, 1.0)
    else:
        ax.set(xlim=(0, 1), aspect="equal")


def pr_axes(ax: Axes, prevalence: float | None = None) -> None:
    """Labels and limits of a precision–recall panel; the chance level at ``prevalence``."""
    if prevalence is not None:
        ax.axhline(prevalence, color="0.7", lw=0.8, ls="--")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
