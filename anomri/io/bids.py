"""Index a BIDS diffusion cohort: who is a control, where each scan and mask lives.

Indexing walks only ``sub-*/[ses-*/]dwi`` folders with ``os.scandir``, which
stays fast for hundreds of subjects (pybids builds a full SQL index of every
file, which is far slower and not needed for this fixed layout).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from anomri.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_LESION_TEMPLATE = "derivatives/lesions/{subdir}/dwi/{prefix}_space-dwi_desc-lesion_mask.nii.gz"

#: A BIDS label: letters and digits only (the specification's "alphanumeric"; ASCII).
LABEL = re.compile(r"[A-Za-z0-9]+")
#: The entities between ``sub-<label>[_ses-<label>]`` and the suffix of a file name, e.g. ``_acq-b1000_run-1``.
ENTITIES = re.compile(r"(_[A-Za-z0-9]+-[A-Za-z0-9]+)*")
_LABEL_RULE = "BIDS labels are letters and digits only (A-Z, a-z, 0-9)"


def is_label(text: str) -> bool:
    """Whether ``text`` is a valid BIDS label (alphanumeric, ASCII)."""
    return LABEL.fullmatch(text) is not None


def _check_folder(folder: Path, entity: str) -> None:
    """Reject a ``sub-``/``ses-`` folder whose label is not a BIDS label."""
    label = folder.name[len(entity) + 1:]
    if not is_label(label):
        raise InputError(folder, f"{entity} label {label!r} is not alphanumeric ({_LABEL_RULE}); rename the folder")


@dataclass(frozen=True)
class Scan:
    """One diffusion scan of one participant (and session).

    Attributes
    ----------
    participant_id : str
        ``sub-<label>``.
    session : str or None
        ``ses-<label>``, or None for single-session datasets.
    group : str
        The participant's value in the group column.
    is_control : bool
        Whether the participant is a healthy control.
    dwi, bval, bvec : Path
        The 4-D image and its FSL gradient files.
    lesion_mask : Path or None
        Ground-truth lesion mask, when one exists.
    brain_mask : Path or None
        A provided brain mask, when the layout has one.
    """

    participant_id: str
    session: str | None
    group: str
    is_control: bool
    dwi: Path
    bval: Path
    bvec: Path
    lesion_mask: Path | None = None
    brain_mask: Path | None = None

    @property
    def prefix(self) -> str:
        """File-name entities, ``sub-<label>[_ses-<label>]``."""
        return self.participant_id + (f"_{self.session}" if self.session else "")

    @property
    def subdir(self) -> str:
        """Folder below the dataset root, ``sub-<label>[/ses-<label>]``."""
        return self.participant_id + (f"/{self.session}" if self.session else "")


def read_participants(bids_dir: str | Path, group_column: str = "group") -> dict[str, str]:
    """Map ``participant_id`` to its group from ``participants.tsv``."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        raise InputError(path, "participants.tsv not found (required, with participant_id and group columns)")
    # utf-8-sig: spreadsheets start "UTF-8" text with a byte-order mark, which would hide participant_id.
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows, lines = [], []  # each row and the line it ends on, for error messages
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    columns = rows[0].keys() if rows else []
    for column in ("participant_id", group_column):
        if column not in columns:
            raise InputError(path, f"no '{column}' column (columns: {', '.join(columns) or 'none'})")
    groups = {}
    for line, row in zip(lines, rows):
        pid = (row["participant_id"] or "").strip()
        label = pid.removeprefix("sub-")
        if not is_label(label):
            raise InputError(path, f"line {line}: participant_id {pid!r} is not sub-<label> with an alphanumeric "
                                   f"label ({_LABEL_RULE})")
        if row[group_column] is None:
            raise InputError(path, f"line {line}: {pid} has no '{group_column}' value")
        groups[f"sub-{label}"] = row[group_column].strip()
    return groups


def _dwi_dirs(bids_dir: Path, participant_id: str) -> list[tuple[str | None, Path]]:
    """(session, dwi folder) pairs of one participant, sessions sorted."""
    subject_dir = bids_dir / participant_id
    found = []
    if (subject_dir / "dwi").is_dir():
        found.append((None, subject_dir / "dwi"))
    if subject_dir.is_dir():
        with os.scandir(subject_dir) as entries:
            sessions = sorted(e.name for e in entries if e.is_dir() and e.name.startswith("ses-"))
        for session in sessions:
            _check_folder(subject_dir / session, "ses")
        found += [(s, subject_dir / s / "dwi") for s in sessions if (subject_dir / s / "dwi").is_dir()]
    return found


def index_cohort(
    bids_dir: str | Path,
    group_column: str = "group",
    control_value: str = "control",
    lesion_template: str = DEFAULT_LESION_TEMPLATE,
    dwi_suffix: str = "_dwi.nii.gz",
    brain_mask_suffix: str | None = None,
) -> list[Scan]:
    """List every diffusion scan of a BIDS cohort.

    Parameters
    ----------
    bids_dir : str or Path
        Dataset root holding ``participants.tsv``.
    group_column, control_value : str
        Participants whose ``group_column`` equals ``control_value`` are controls.
    lesion_template : str
        Lesion-mask path relative to ``bids_dir``, with ``{subdir}`` and ``{prefix}``
        placeholders. Masks that do not exist are simply absent.
    dwi_suffix : str
        End of the DWI file name after ``sub-<label>[_ses-<label>]`` (entities
        such as ``_acq-`` may sit in between). QSIPrep outputs use
        ``_desc-preproc_dwi.nii.gz``.
    brain_mask_suffix : str, optional
        When set, the brain mask beside each DWI, e.g. ``_desc-brain_mask.nii.gz``.

    Raises
    ------
    InputError
        No participants.tsv, missing columns, no controls, no scans, a scan
        whose participant is not listed, or a listed participant without a scan.
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "BIDS directory not found")
    groups = read_participants(bids_dir, group_column)
    tsv = bids_dir / "participants.tsv"
    if control_value not in groups.values():
        raise InputError(tsv, f"no controls: no participant has {group_column} == '{control_value}'")

    scans = []
    with os.scandir(bids_dir) as entries:
        on_disk = sorted(e.name for e in entries if e.is_dir() and e.name.startswith("sub-"))
    for participant_id in on_disk:
        _check_folder(bids_dir / participant_id, "sub")
    for participant_id in on_disk:
        for session, dwi_dir in _dwi_dirs(bids_dir, participant_id):
            prefix = participant_id + (f"_{session}" if session else "")
            with os.scandir(dwi_dir) as entries:
                dwis = sorted(e.name for e in entries if e.name.startswith(prefix) and e.name.endswith(dwi_suffix))
            for name in dwis:
                entities = name[len(prefix):-len(dwi_suffix)]
                if not ENTITIES.fullmatch(entities):
                    raise InputError(dwi_dir / name, f"entities {entities!r} between {prefix} and {dwi_suffix} are "
                                                     f"not _<key>-<label> pairs ({_LABEL_RULE})")
                if participant_id not in groups:
                    raise InputError(dwi_dir / name, f"{participant_id} is not listed in {tsv}")
                scans.append(_make_scan(bids_dir, dwi_dir / name, participant_id, session, groups, control_value,
                                        lesion_template, brain_mask_suffix))
    if not scans:
        raise InputError(bids_dir, f"no diffusion scans found (expected sub-*/[ses-*/]dwi/*{dwi_suffix})")
    # A listed participant without a scan would silently leave the cohort (and a run "succeed" without it).
    missing = sorted(set(groups) - {s.participant_id for s in scans})
    if missing:
        raise InputError(tsv, f"{', '.join(missing)} listed but without a diffusion scan "
                              f"(expected {missing[0]}/[ses-*/]dwi/*{dwi_suffix}); add the scan or remove the row")
    prefixes = [s.prefix for s in scans]
    if len(set(prefixes)) != len(prefixes):
        dup = sorted({p for p in prefixes if prefixes.count(p) > 1})
        raise InputError(bids_dir, f"several DWI runs for {dup}; keep one per participant and session")
    if not any(s.is_control for s in scans):
        raise InputError(tsv, "no controls with a diffusion scan")
    logger.info("indexed %d scans (%d controls) in %s", len(scans), sum(s.is_control for s in scans), bids_dir)
    return scans


def _make_scan(
    bids_dir: Path,
    dwi: Path,
    participant_id: str,
    session: str | None,
    groups: dict[str, str],
    control_value: str,
    lesion_template: str,
    brain_mask_suffix: str | None,
) -> Scan:
    stem = dwi.name[: -len(".nii.gz")]
    prefix = participant_id + (f"_{session}" if session else "")
    subdir = participant_id + (f"/{session}" if session else "")
    lesion = bids_dir / lesion_template.format(subdir=subdir, prefix=prefix)
    brain_mask = None
    if brain_mask_suffix:
        base = stem[: -len("_dwi")] if stem.endswith("_dwi") else stem
        base = base.replace("_desc-preproc", "")
        brain_mask = dwi.with_name(base + brain_mask_suffix)
    return Scan(
        participant_id=participant_id,
        session=session,
        group=groups[participant_id],
        is_control=groups[participant_id] == control_value,
        dwi=dwi,
        bval=dwi.with_name(stem + ".bval"),
        bvec=dwi.with_name(stem + ".bvec"),
        lesion_mask=lesion if lesion.is_file() else None,
        brain_mask=brain_mask,
    )
