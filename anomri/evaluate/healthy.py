"""Realised healthy false-positive rate on healthy subjects that nothing they are judged by ever saw.

The lesion masks at level a flag p <= a. Whether that flags a fraction a of a
*new* healthy person's brain (another diffusivity, noise level or head) is the
question a user cares about. With cross-fitting every control can answer it:
its maps come from the fold model that never trained on it, and its p from
the null of the *other* controls (:func:`anomri.maps.writing.write_probability_map`
leaves its own scans out), so its flagged fraction is a leave-subject-out
estimate of the realised false-positive rate. Patients whose lesion mask is
empty join as well.

``evaluation_healthy.tsv`` has one row per such scan and level (the fraction
of its scored brain flagged, beside the nominal level) and a ``pooled`` row
per level. The denominator is the voxels that could have been flagged: the
brain mask eroded by ``probability.erosion_voxels``, the lesion probability's
domain. Flagged voxels are spatially correlated (the maps are smoothed) and
come in people, so the spread around the nominal level is much wider than a
binomial of the voxel count. With the pooled calibration unit (``voxel``) the
guarantee is on the mean over people; with ``subject`` (the default) on each
person, up to a chance of 1 / (n + 1) (docs/method.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from scipy import ndimage

from anomri.errors import InputError
from anomri.evaluate.table import CONNECTIVITY, POOLED
from anomri.io.derivatives import ScanDerivatives, sidecar_path
from anomri.io.nifti import load_mask, load_nifti, read_data
from anomri.maps.postprocess import label_components

COLUMNS = ["participant_id", "session", "role", "level", "realised_fpr", "ratio_to_level", "n_flagged_components",
           "n_flagged_voxels", "n_scored_voxels", "n_brain_voxels"]

DESCRIPTIONS = {
    "participant_id": {"Description": f"Healthy subject (sub-<label>), or '{POOLED}' for all of them"},
    "session": {"Description": "The scan's entities after sub-<label>: ses-<label>, then acq-/dir-/run-<label> when a "
                            "participant has several runs (ses-1_run-2), n/a when there are none"},
    "role": {"Description": "control: maps from the fold model that never trained on it, p from the null of the "
                            "other controls (out of fold, leave-subject-out); patient-without-lesions: a patient "
                            "whose lesion mask is empty, p from every fold model"},
    "level": {"Description": "Nominal healthy false-positive level a of the lesion mask (p <= a)"},
    "realised_fpr": {"Description": "n_flagged_voxels / n_scored_voxels: the fraction of the voxels that could be "
                                    "flagged that are in the lesion mask at this level (p <= level, components "
                                    "smaller than min_component_voxels removed)"},
    "ratio_to_level": {"Description": "realised_fpr / level (1 = as calibrated)"},
    "n_flagged_components": {"Description": "26-connected components of flagged voxels"},
    "n_flagged_voxels": {"Description": "Voxels in the lesion mask at this level"},
    "n_scored_voxels": {"Description": "Voxels that could be flagged: the brain mask eroded by "
                                       "probability.erosion_voxels (the lesion probability's domain)"},
    "n_brain_voxels": {"Description": "Brain-mask voxels"},
}


def scored_voxels(scan: ScanDerivatives, brain):
    """The voxels a scan's lesion masks could flag: its brain mask eroded as its probability map's was."""
    path = sidecar_path(scan.probseg)
    try:
        erosion = json.loads(path.read_text())["Calibration"]["postprocessing"]["erosion_voxels"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(path, f"no post-processing record of `anomri probability` in it ({exc})") from exc
    return ndimage.binary_erosion(brain, iterations=erosion) if erosion else brain


def healthy_rows(derivatives_dir: str | Path, prefixes: Sequence[str], levels: Sequence[float],
                 controls: Sequence[str] = ()) -> list[dict]:
    """Rows of ``evaluation_healthy.tsv`` for the healthy scans ``prefixes`` (``controls`` among them)."""
    rows, pooled = [], {level: [0, 0, 0, 0] for level in levels}
    for prefix in prefixes:
        scan = ScanDerivatives(Path(derivatives_dir), prefix)
        img = load_nifti(scan.mask, ndim=3)
        brain = read_data(img, scan.mask) > 0.5
        scored = scored_voxels(scan, brain)
        participant, _, session = prefix.partition("_")
        role = "control" if prefix in controls else "patient-without-lesions"
        for level in levels:
            # The lesion mask as shipped (p <= level, small components removed), within the scored voxels.
            flagged = load_mask(scan.lesion_mask(level), img, scan.mask) & scored
            counts = [int(flagged.sum()), int(scored.sum()), label_components(flagged, CONNECTIVITY)[1],
                      int(brain.sum())]
            rows.append(_row(participant, session or None, role, level, *counts))
            pooled[level] = [a + b for a, b in zip(pooled[level], counts)]
    if prefixes:
        rows += [_row(POOLED, None, None, level, *counts) for level, counts in pooled.items()]
    return rows


def _row(participant: str, session: str | None, role: str | None, level: float, n_flagged: int, n_scored: int,
         n_components: int, n_brain: int) -> dict:
    return {"participant_id": participant, "session": session, "role": role, "level": level,
            "realised_fpr": n_flagged / n_scored, "ratio_to_level": n_flagged / n_scored / level,
            "n_flagged_components": n_components, "n_flagged_voxels": n_flagged, "n_scored_voxels": n_scored,
            "n_brain_voxels": n_brain}
