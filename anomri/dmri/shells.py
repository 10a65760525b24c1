"""Grouping diffusion-weighted volumes into b-value shells.

Measured b-values scatter around the protocol's nominal ones (995, 1000,
1005 ... in one shell; b0 volumes stored as b = 5 or 15), so shells are found
by clustering, and each is named by its nominal b-value.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Shell", "detect_shells", "assign_shells"]


@dataclass(frozen=True, eq=False)
class Shell:
    """One b-value shell.

    Attributes
    ----------
    bval : float
        Nominal b-value (s/mm²), used in feature names.
    indices : ndarray of int
        Increasing indices of the shell's volumes in the acquisition.
    """

    bval: float
    indices: np.ndarray


def _checked_bvals(bvals: np.ndarray) -> np.ndarray:
    bvals = np.asarray(bvals, dtype=np.float64)
    if bvals.ndim != 1 or not np.isfinite(bvals).all() or (bvals < 0).any():
        raise ValueError("bvals must be a 1-D array of finite, non-negative b-values")
    return bvals


def detect_shells(
    bvals: np.ndarray, b0_threshold: float = 50.0, tolerance: float = 100.0, round_to: float = 50.0
) -> list[Shell]:
    """Cluster the diffusion-weighted b-values into shells.

    Volumes with ``b <= b0_threshold`` are b0 and belong to no shell. The
    others are sorted and split wherever two consecutive b-values differ by
    more than ``tolerance``; closer values chain into one shell, so a shell's
    spread is not bounded by ``tolerance`` (a continuum of b-values, as in
    some DSI schemes, becomes one shell). A shell's b-value is the mean of its
    volumes' b-values rounded to a multiple of ``round_to``: protocols use
    multiples of 50 s/mm², so 994.6 is reported as 1000 and feature names
    agree across scans of the same protocol.

    Parameters
    ----------
    bvals : ndarray (N,)
        b-values of the N volumes, s/mm².
    b0_threshold : float
        Largest b-value still treated as b0.
    tolerance : float
        Largest gap between consecutive b-values of one shell.
    round_to : float
        Rounding step of the shell b-values; at most ``tolerance``, which keeps
        the rounded b-values of different shells distinct (their means differ
        by more than ``tolerance``).

    Returns
    -------
    list of Shell
        Sorted by b-value; empty when every volume is b0.
    """
    bvals = _checked_bvals(bvals)
    if not 0.0 < round_to <= tolerance:
        raise ValueError(f"round_to must lie in (0, tolerance={tolerance:g}]; got {round_to:g}")
    weighted = np.flatnonzero(bvals > b0_threshold)
    order = weighted[np.argsort(bvals[weighted], kind="stable")]
    splits = np.flatnonzero(np.diff(bvals[order]) > tolerance) + 1
    shells = []
    for members in np.split(order, splits):
        if members.size:
            nominal = round_to * np.round(bvals[members].mean() / round_to)
            shells.append(Shell(bval=float(nominal), indices=np.sort(members)))
    logger.debug("detected shells %s", [(s.bval, s.indices.size) for s in shells])
    return shells


def assign_shells(
    bvals: np.ndarray, shell_bvals: Sequence[float], b0_threshold: float = 50.0, tolerance: float = 100.0
) -> list[Shell]:
    """Assign volumes to given nominal shells, e.g. to use the same shells for every subject.

    A diffusion-weighted volume joins the nearest of ``shell_bvals`` if within
    ``tolerance`` of it; other volumes (and b0 volumes) are left out.

    Returns
    -------
    list of Shell
        One per entry of ``shell_bvals``, in the order given.

    Raises
    ------
    ValueError
        If a requested shell receives no volume.
    """
    bvals = _checked_bvals(bvals)
    nominal = np.asarray(shell_bvals, dtype=np.float64)
    if nominal.ndim != 1 or nominal.size == 0 or (nominal <= b0_threshold).any():
        raise ValueError(f"shell b-values must be a non-empty list above b0_threshold={b0_threshold:g}")
    distance = np.abs(bvals[:, None] - nominal[None, :])
    nearest = np.argmin(distance, axis=1)
    member = (bvals > b0_threshold) & (distance[np.arange(bvals.size), nearest] <= tolerance)
    shells = []
    for k, b in enumerate(nominal):
        indices = np.flatnonzero(member & (nearest == k))
        if indices.size == 0:
            raise ValueError(f"no volume has a b-value within {tolerance:g} of shell b={b:g}")
        shells.append(Shell(bval=float(b), indices=indices))
    left_out = int((bvals > b0_threshold).sum() - member.sum())
    if left_out:
        logger.info("%d diffusion-weighted volume(s) match none of the shells %s", left_out, list(nominal))
    return shells
