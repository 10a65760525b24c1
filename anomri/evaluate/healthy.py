"""Realised healthy false-positive rate on subjects that neither trained nor calibrated the model.

The lesion masks at level a flag p <= a, which by construction flags a
fraction a of the *calibration* controls' voxels. Whether that holds for a
new healthy person (another diffusivity, noise level or head) is the
question a user cares about, and only subjects the model and the
calibration never saw can answer it: held-out controls
(``split.holdout_controls``) and any patient whose lesion mask is empty.

``evaluation_healthy.tsv`` has one row per such scan and level (the fraction
of its brain flagged, beside the nominal level) and a ``pooled`` row per level.
Flagged voxels are spatially correlated (the maps are smoothed), so the
spread around the nominal level is wider than a binomial of the voxel count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomri.evaluate.table import CONNECTIVITY, POOLED
from anomri.io.derivatives import ScanDerivatives
from anomri.io.nifti import load_mask, load_nifti, read_data
from anomri.maps.postprocess import label_components

COLUMNS = ["participant_id", "session", "level", "realised_fpr", "ratio_to_level", "n_flagged_components",
           "n_flagged_voxels", "n_brain_voxels"]

DESCRIPTIONS = {
    "participant_id": {"Description": f"Unseen healthy subject (sub-<label>), or '{POOLED}' for all of them"},
    "session": {"Description": "The scan's entities after sub-<label>: ses-<label>, then acq-/dir-/run-<label> when a "
                            "participant has several runs (ses-1_run-2), n/a when there are none"},
    "level": {"Description": "Nominal healthy false-positive level a of the lesion mask (p <= a)"},
    "realised_fpr": {"Description": "Fraction of the subject's brain voxels in its lesion mask at this level "
                                    "(p <= level, components smaller than min_component_voxels removed)"},
    "ratio_to_level": {"Description": "realised_fpr / level (1 = as calibrated)"},
    "n_flagged_components": {"Description": "26-connected components of flagged voxels"},
    "n_flagged_voxels": {"Description": "Brain voxels in the lesion mask at this level"},
    "n_brain_voxels": {"Description": "Brain-mask voxels"},
}


def healthy_rows(derivatives_dir: str | Path, prefixes: Sequence[str], levels: Sequence[float]) -> list[dict]:
    """Rows of ``evaluation_healthy.tsv`` for the scans ``prefixes`` (none of them in training or calibration)."""
    rows, pooled = [], {level: [0, 0, 0] for level in levels}
    for prefix in prefixes:
        scan = ScanDerivatives(Path(derivatives_dir), prefix)
        img = load_nifti(scan.mask, ndim=3)
        brain = read_data(img, scan.mask) > 0.5
        participant, _, session = prefix.partition("_")
        for level in levels:
            # The lesion mask as shipped (p <= level, small components removed), within the brain.
            flagged = load_mask(scan.lesion_mask(level), img, scan.mask) & brain
            n_flagged, n_brain = int(flagged.sum()), int(brain.sum())
            _, n_components = label_components(flagged, CONNECTIVITY)
            rows.append({"participant_id": participant, "session": session or None, "level": level,
                         "realised_fpr": n_flagged / n_brain, "ratio_to_level": n_flagged / n_brain / level,
                         "n_flagged_components": n_components, "n_flagged_voxels": n_flagged,
                         "n_brain_voxels": n_brain})
            totals = pooled[level]
            totals[0] += n_flagged
            totals[1] += n_brain
            totals[2] += n_components
    if prefixes:
        for level, (n_flagged, n_brain, n_components) in pooled.items():
            rows.append({"participant_id": POOLED, "session": None, "level": level,
                         "realised_fpr": n_flagged / n_brain, "ratio_to_level": n_flagged / n_brain / level,
                         "n_flagged_components": n_components, "n_flagged_voxels": n_flagged,
                         "n_brain_voxels": n_brain})
    return rows
