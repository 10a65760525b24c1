"""The cohort's quality table: per scan, its SNR, how much of its brain is flagged, and its shift check.

``quality.tsv`` lists every scan with a lesion probability map, labelled or
not: what a user reads before trusting a scan's lesion masks. The values come
from the probability map's sidecar (``QualityCheck``, written by
:func:`anomri.maps.writing.write_probability_map`), so the table, the log and
the sidecar always agree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from anomri.errors import InputError
from anomri.io.derivatives import ScanDerivatives, level_label, sidecar_path
from anomri.io.tables import write_table

logger = logging.getLogger(__name__)

__all__ = ["quality_rows", "quality_columns", "quality_descriptions", "write_quality_table"]


def quality_columns(levels: Sequence[float]) -> list[str]:
    """Columns of ``quality.tsv`` for the lesion-mask ``levels``."""
    return ["participant_id", "session", "role", "snr", *[f"flagged_{level_label(a)}" for a in levels], "shift",
            "control_shift_low", "control_shift_high", "verdict"]


def quality_descriptions(levels: Sequence[float]) -> dict[str, dict[str, str]]:
    """JSON-sidecar descriptions of the columns of ``quality.tsv``."""
    return {
        "participant_id": {"Description": "Participant (sub-<label>)"},
        "session": {"Description": "The scan's entities after sub-<label> (ses-, acq-, run-...), n/a when none"},
        "role": {"Description": "control: scored by the fold model that never trained on it and calibrated against "
                                "the other controls (out of fold, leave-subject-out); patient: scored by every fold "
                                "model (cross-conformal p)"},
        "snr": {"Description": "Median brain b0 over the noise standard deviation (PIESNO), from preprocessing"},
        **{f"flagged_{level_label(a)}": {"Description": f"Fraction of the scan's scored (post-processed) brain voxels "
                                                       f"with p <= {a:g} (nominal {a:g} for a healthy brain)"}
           for a in levels},
        "shift": {"Description": "Phi^-1(1 - median p) over the scan's voxels: where its bulk sits, in healthy "
                                 "standard deviations (about 0 for a healthy scan the null describes)"},
        "control_shift_low": {"Description": "Lowest out-of-fold shift among the other controls"},
        "control_shift_high": {"Description": "Highest out-of-fold shift among the other controls"},
        "verdict": {"Description": "within: the shift lies in the controls' range (+- probability.ood_margin); above / "
                                   "below: out of distribution, the lesion masks over- / under-flag; unknown: no "
                                   "other control to compare with"},
    }


def quality_rows(derivatives_dir: str | Path, prefixes: Sequence[str], controls: Sequence[str],
                 levels: Sequence[float]) -> list[dict]:
    """One row of ``quality.tsv`` per scan, read from its probability map's sidecar."""
    rows = []
    for prefix in prefixes:
        path = sidecar_path(ScanDerivatives(Path(derivatives_dir), prefix).probseg)
        try:
            check = json.loads(path.read_text())["QualityCheck"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(path, f"no QualityCheck of `anomri probability` in it ({exc})") from exc
        low, high = check["ControlShiftRange"] or (None, None)
        participant, _, session = prefix.partition("_")
        rows.append({"participant_id": participant, "session": session or None,
                     "role": "control" if prefix in controls else "patient", "snr": check["SNR"],
                     **{f"flagged_{level_label(a)}": check["FlaggedFraction"].get(f"{a:g}") for a in levels},
                     "shift": check["Shift"], "control_shift_low": low, "control_shift_high": high,
                     "verdict": check["Verdict"]})
    return rows


def write_quality_table(derivatives_dir: str | Path, prefixes: Sequence[str], controls: Sequence[str],
                        levels: Sequence[float], out: str | Path) -> None:
    """Write ``quality.tsv`` (and its JSON sidecar) for the scans ``prefixes``; log the scans out of distribution."""
    rows = quality_rows(derivatives_dir, prefixes, controls, levels)
    write_table(out, rows, quality_columns(levels), quality_descriptions(levels))
    flagged = [f"{r['participant_id']}{'_' + r['session'] if r['session'] else ''} ({r['verdict']})"
               for r in rows if r["verdict"] in ("above", "below")]
    if flagged:
        logger.warning("out of distribution (their lesion masks are not reliable): %s", ", ".join(flagged))
    logger.info("quality of %d scans written to %s", len(rows), out)
