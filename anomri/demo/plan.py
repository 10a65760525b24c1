"""The scans of the demo cohort a workflow config asks for, known before the cohort is written."""

from __future__ import annotations

from pathlib import Path

from anomri.io.bids import Scan
from anomri.io.cohort import cohort_dir


def planned_scans(config: dict) -> list[Scan] | None:
    """The scans :func:`anomri.demo.cohort.make_demo_cohort` will write for ``config``; None without a demo.

    Pass them to :func:`anomri.io.cohort.plan_from_config`.
    """
    if config["bids_dir"] != "demo":
        return None
    return planned_demo_scans(cohort_dir(config), config["demo"]["n_controls"], config["demo"]["n_patients"],
                              config["lesion_mask_template"])


def planned_demo_scans(bids_dir: Path, n_controls: int, n_patients: int, lesion_template: str) -> list[Scan]:
    """The scans :func:`anomri.demo.cohort.make_demo_cohort` will write under ``bids_dir``, before it runs."""
    from anomri.demo.cohort import demo_participants  # the simulator's imports only when a demo is planned

    scans = []
    for pid, group in demo_participants(n_controls, n_patients):
        dwi = bids_dir / pid / "dwi" / f"{pid}_dwi.nii.gz"
        lesion = bids_dir / lesion_template.format(subdir=pid, prefix=pid) if group == "patient" else None
        scans.append(Scan(pid, None, group, group == "control", dwi, dwi.with_suffix("").with_suffix(".bval"),
                          dwi.with_suffix("").with_suffix(".bvec"), lesion))
    return scans
