"""Copies of a healthy scan that the fold models train and calibrate on: their names and what makes each.

A copy is named ``<kind>-<100 x factor>``, the name of its derivatives tree:
``noise-150`` is the scan with its noise standard deviation raised 1.5-fold,
``diffusivity-92`` the scan with every diffusivity times 0.92 and
``anisotropy-105`` the scan with the directional contrast of log S/S0 times
1.05 (:mod:`anomri.dmri.augmentation`). Kept free of heavy imports: the
workflow names the copies with it when it parses the Snakefile.
"""

from __future__ import annotations

import re

__all__ = ["COPY_KINDS", "copy_label", "copy_arguments"]

#: Kind of copy -> the argument of :func:`anomri.dmri.scan.preprocess_scan` that makes it.
COPY_KINDS = {"noise": "noise_factor", "diffusivity": "diffusivity_scale", "anisotropy": "anisotropy_scale"}
_LABEL = re.compile(rf"({'|'.join(COPY_KINDS)})-([0-9]+)")


def copy_label(kind: str, factor: float) -> str:
    """The name of a copy: ``copy_label("noise", 1.5)`` is ``"noise-150"``."""
    if kind not in COPY_KINDS:
        raise ValueError(f"a copy is one of {sorted(COPY_KINDS)}; got {kind!r}")
    return f"{kind}-{round(100 * factor)}"


def copy_arguments(label: str) -> dict[str, float]:
    """The :func:`~anomri.dmri.scan.preprocess_scan` argument that makes copy ``label``: ``{"noise_factor": 1.5}``
    for ``"noise-150"``. Raises ValueError for a name that is not ``<kind>-<100 x factor>``."""
    match = _LABEL.fullmatch(label)
    if match is None:
        raise ValueError(f"a copy is named <kind>-<100 x factor> with kind one of {sorted(COPY_KINDS)}, e.g. "
                         f"noise-150; got {label!r}")
    return {COPY_KINDS[match[1]]: int(match[2]) / 100}
