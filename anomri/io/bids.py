"""Index a BIDS diffusion cohort: who is a control, where each scan, its gradients and its masks live.

A small indexer of its own rather than pybids, snakebids or bids2table
(``benchmarks/bench_indexing.py`` measures them): anomri reads one fixed
layout, ``sub-*/[ses-*/]dwi``, so indexing lists only the folders on the paths
from the dataset root to each ``dwi`` folder, one ``os.scandir`` each. It
applies the BIDS inheritance principle to the ``.bval``, ``.bvec`` and
``.json`` files of every DWI (a top-level ``dwi.bval`` serves every subject),
accepts ``.nii`` and ``.nii.gz``, and makes every ``acq-``/``rec-``/``dir-``/
``run-``/``part-`` variant its own scan.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from anomri.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_LESION_TEMPLATE = "derivatives/lesions/{subdir}/dwi/{prefix}_space-dwi_desc-lesion_mask.nii.gz"

#: A BIDS label: letters and digits only (the specification's "alphanumeric"; ASCII).
LABEL = re.compile(r"[A-Za-z0-9]+")
#: The entities between ``sub-<label>[_ses-<label>]`` and the suffix of a file name, e.g. ``_acq-b1000_run-1``.
ENTITIES = re.compile(r"(_[A-Za-z0-9]+-[A-Za-z0-9]+)*")
#: Entities that tell the DWI scans of one session apart, in the BIDS order of a file name. They join
#: ``sub-``/``ses-`` in a scan's prefix (``sub-01_ses-1_acq-b1000_run-2``), and so in its outputs' names;
#: the others (QSIPrep's ``space-``/``desc-``) describe a file, not a scan.
SCAN_ENTITIES = ("acq", "rec", "dir", "run", "part")
#: A scan prefix, as the workflow's wildcard constraint.
PREFIX_PATTERN = r"sub-[A-Za-z0-9]+(_ses-[A-Za-z0-9]+)?" + "".join(rf"(_{e}-[A-Za-z0-9]+)?" for e in SCAN_ENTITIES)
#: Image extensions of a DWI, ``.nii.gz`` first.
DWI_EXTENSIONS = (".nii.gz", ".nii")
#: Extensions of the metadata files that the inheritance principle finds for a DWI.
METADATA_EXTENSIONS = (".bval", ".bvec", ".json")
_LABEL_RULE = "BIDS labels are letters and digits only (A-Z, a-z, 0-9)"


class SelectionError(InputError):
    """A participant or scan selection (``participant_label``, ``dwi_filters``...) that selects nothing."""


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
    """One diffusion scan of one participant (and session, and acquisition or run).

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
        The 4-D image and its FSL gradient files (found by the inheritance principle).
    lesion_mask : Path or None
        Ground-truth lesion mask, when one exists.
    brain_mask : Path or None
        A provided brain mask, when the layout has one.
    entities : tuple of (key, label)
        The :data:`SCAN_ENTITIES` of the DWI's name, e.g. ``(("acq", "b1000"), ("run", "2"))``.
    sidecars : tuple of Path
        The JSON files that apply to the DWI, the most general (dataset root) first.
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
    entities: tuple[tuple[str, str], ...] = ()
    sidecars: tuple[Path, ...] = ()

    @property
    def prefix(self) -> str:
        """File-name entities, ``sub-<label>[_ses-<label>][_acq-<label>]...[_run-<label>]``: a plain string."""
        return _prefix(self.participant_id, self.session, self.entities)

    @property
    def subdir(self) -> str:
        """Folder below the dataset root, ``sub-<label>[/ses-<label>]``."""
        return self.participant_id + (f"/{self.session}" if self.session else "")

    def metadata(self) -> dict:
        """The DWI's JSON metadata: its sidecars merged, a more specific file's keys winning."""
        merged: dict = {}
        for path in self.sidecars:
            try:
                merged.update(json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, OSError) as exc:
                raise InputError(path, f"unreadable JSON sidecar ({exc})") from exc
        return merged


def _prefix(participant_id: str, session: str | None, entities: Iterable[tuple[str, str]]) -> str:
    return "_".join([participant_id, *([session] if session else []), *(f"{k}-{v}" for k, v in entities)])


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


def select_participants(known: Iterable[str], participant_label: Iterable[str] = (),
                        exclude_participant_label: Iterable[str] = (), source: str | Path = "participants.tsv"
                        ) -> set[str]:
    """The ``sub-<label>`` ids a run analyses: ``participant_label`` (every known one when empty) less the excluded.

    Labels are given with or without ``sub-``, as BIDS Apps take them.

    Raises
    ------
    InputError
        A label that is not alphanumeric.
    SelectionError
        A label that matches no known participant (a typo would otherwise silently analyse, or keep, the
        wrong people), or a selection that leaves nobody. ``source`` is named in the message.
    """
    known = set(known)
    chosen = {}
    for key, labels in (("participant_label", participant_label), ("exclude_participant_label",
                                                                    exclude_participant_label)):
        ids = []
        for label in labels:
            bare = str(label).removeprefix("sub-")
            if not is_label(bare):
                raise InputError(key, f"{label!r} is not a participant label ({_LABEL_RULE})")
            if f"sub-{bare}" not in known:
                raise SelectionError(source, f"{key} {label!r} matches no participant (sub-{bare} is neither "
                                             f"listed nor a folder)")
            ids.append(f"sub-{bare}")
        chosen[key] = set(ids)
    selected = (chosen["participant_label"] or known) - chosen["exclude_participant_label"]
    if not selected:
        raise SelectionError(source, "participant_label and exclude_participant_label leave no participant")
    return selected


@dataclass(frozen=True)
class _Name:
    """A parsed BIDS file name: ``<key>-<label>_..._<suffix><extension>``."""

    entities: dict[str, str]
    suffix: str
    extension: str


def _parse_name(name: str) -> _Name | None:
    """The entities, suffix and extension of a BIDS file name; None for any other name."""
    stem, dot, extension = name.partition(".")
    *pairs, suffix = stem.split("_")
    if not dot or "-" in suffix:
        return None
    entities = {}
    for pair in pairs:
        key, dash, label = pair.partition("-")
        if not dash:
            return None
        entities[key] = label
    return _Name(entities, suffix, "." + extension)


class _Folder:
    """The files of one folder that may hold DWI metadata (listed once, parsed once)."""

    def __init__(self, path: Path, files: list[str]) -> None:
        self.path = path
        self.files = files
        self.metadata = [(name, parsed) for name in files if name.endswith(METADATA_EXTENSIONS)
                         and (parsed := _parse_name(name)) is not None]

    def applicable(self, dwi: _Name, extension: str) -> str | None:
        """The one metadata file here with ``extension`` whose entities are a subset of the DWI's."""
        found = [name for name, meta in self.metadata if meta.extension == extension and meta.suffix == dwi.suffix
                 and meta.entities.items() <= dwi.entities.items()]
        if len(found) > 1:
            raise InputError(self.path, f"{' and '.join(sorted(found))} all apply to the same DWI: BIDS inheritance "
                                        f"allows one {extension} per folder; keep the one meant")
        return found[0] if found else None


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of ``folder``, each sorted."""
    with os.scandir(folder) as entries:
        items = [(e.name, e.is_dir()) for e in entries]
    return sorted(n for n, is_dir in items if is_dir), sorted(n for n, is_dir in items if not is_dir)


def _inherited(chain: list[_Folder], dwi: _Name, extension: str) -> list[Path]:
    """Every file of ``extension`` that applies to the DWI, from the dataset root down to its own folder."""
    return [folder.path / name for folder in chain if (name := folder.applicable(dwi, extension))]


def index_cohort(
    bids_dir: str | Path,
    group_column: str = "group",
    control_value: str = "control",
    lesion_template: str = DEFAULT_LESION_TEMPLATE,
    dwi_suffix: str = "_dwi",
    brain_mask_suffix: str | None = None,
    participant_label: Iterable[str] = (),
    exclude_participant_label: Iterable[str] = (),
    dwi_filters: Mapping[str, Iterable[str]] | None = None,
) -> list[Scan]:
    """List every diffusion scan of the selected participants of a BIDS cohort.

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
        End of the DWI file name before ``.nii.gz`` or ``.nii``, after
        ``sub-<label>[_ses-<label>]`` and any entities. QSIPrep outputs use ``_desc-preproc_dwi``.
    brain_mask_suffix : str, optional
        When set, the brain mask beside each DWI, e.g. ``_desc-brain_mask.nii.gz``.
    participant_label, exclude_participant_label : iterable of str
        Participants to analyse (all when empty) and to leave out (see :func:`select_participants`).
    dwi_filters : mapping of str to iterable of str, optional
        Only DWI files whose entities take one of these labels, e.g. ``{"dir": ["AP"]}``
        (a file without the entity is left out too).

    Raises
    ------
    InputError
        No participants.tsv, missing columns, no controls, no scans, a scan
        whose participant is not listed, a selected participant without a scan,
        a DWI without its gradient files, or two applicable metadata files in one folder.
    SelectionError
        A participant label matching nobody, or a selection leaving no controls or no scans.
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "BIDS directory not found")
    groups = read_participants(bids_dir, group_column)
    tsv = bids_dir / "participants.tsv"
    if control_value not in groups.values():
        raise InputError(tsv, f"no controls: no participant has {group_column} == '{control_value}'")
    folders, root_files = _listing(bids_dir)
    on_disk = [name for name in folders if name.startswith("sub-")]
    for participant_id in on_disk:
        _check_folder(bids_dir / participant_id, "sub")
    selected = select_participants({*groups, *on_disk}, participant_label, exclude_participant_label, tsv)
    if not any(groups.get(p) == control_value for p in selected):
        raise SelectionError(tsv, f"no controls among the selected participants ({', '.join(sorted(selected))}); "
                                  f"the model trains on the selected controls")
    filters = {key: {str(v) for v in labels} for key, labels in (dwi_filters or {}).items()}

    root = _Folder(bids_dir, root_files)
    scans, filtered_out = [], set()
    for participant_id in sorted(selected & set(on_disk)):
        for chain, session in _dwi_folders(bids_dir / participant_id, root):
            for dwi, name in _dwi_files(chain[-1], participant_id, session, dwi_suffix):
                if any(name.entities.get(key) not in labels for key, labels in filters.items()):
                    filtered_out.add(participant_id)
                    continue
                if participant_id not in groups:
                    raise InputError(dwi, f"{participant_id} is not listed in {tsv}")
                scans.append(_make_scan(bids_dir, chain, dwi, name, participant_id, session, groups[participant_id],
                                        groups[participant_id] == control_value, lesion_template, brain_mask_suffix))
    _check_scans(scans, selected, filtered_out, filters, bids_dir, dwi_suffix)
    logger.info("indexed %d scans (%d controls) of %d participants in %s", len(scans),
                sum(s.is_control for s in scans), len(selected), bids_dir)
    return scans


def _dwi_folders(subject_dir: Path, root: _Folder) -> list[tuple[list[_Folder], str | None]]:
    """(folders from the dataset root down to a ``dwi`` folder, session) of one participant, sessions sorted."""
    folders, files = _listing(subject_dir)
    subject = [root, _Folder(subject_dir, files)]
    found = [(subject + [_Folder(subject_dir / "dwi", _listing(subject_dir / "dwi")[1])], None)] \
        if "dwi" in folders else []
    for session in (name for name in folders if name.startswith("ses-")):
        _check_folder(subject_dir / session, "ses")
        session_dirs, session_files = _listing(subject_dir / session)
        if "dwi" in session_dirs:
            dwi_dir = subject_dir / session / "dwi"
            found.append((subject + [_Folder(subject_dir / session, session_files),
                                     _Folder(dwi_dir, _listing(dwi_dir)[1])], session))
    return found


def _dwi_files(dwi_dir: _Folder, participant_id: str, session: str | None, dwi_suffix: str
               ) -> list[tuple[Path, _Name]]:
    """The DWI images of one ``dwi`` folder and their parsed names, checking their entities."""
    start = _prefix(participant_id, session, ())
    found = []
    for file_name in dwi_dir.files:
        extension = next((e for e in DWI_EXTENSIONS if file_name.endswith(dwi_suffix + e)), None)
        if extension is None or not file_name.startswith(start):
            continue
        entities = file_name[len(start):-len(dwi_suffix + extension)]
        if not ENTITIES.fullmatch(entities):
            raise InputError(dwi_dir.path / file_name, f"entities {entities!r} between {start} and {dwi_suffix} are "
                                                  f"not _<key>-<label> pairs ({_LABEL_RULE})")
        found.append((dwi_dir.path / file_name, _parse_name(file_name)))
    return found


def _make_scan(bids_dir: Path, chain: list[_Folder], dwi: Path, name: _Name, participant_id: str,
               session: str | None, group: str, is_control: bool, lesion_template: str,
               brain_mask_suffix: str | None) -> Scan:
    gradients = []
    for extension in (".bval", ".bvec"):
        found = _inherited(chain, name, extension)
        if not found:
            stem = dwi.name.removesuffix(name.extension)
            raise InputError(dwi, f"no {extension} file applies (expected {stem}{extension} beside it, or one "
                                  f"higher up such as {name.suffix}{extension} at the dataset root)")
        gradients.append(found[-1])  # the deepest one: a non-JSON metadata file is not merged
    entities = tuple((key, name.entities[key]) for key in SCAN_ENTITIES if key in name.entities)
    prefix = _prefix(participant_id, session, entities)
    subdir = participant_id + (f"/{session}" if session else "")
    lesion = bids_dir / lesion_template.format(subdir=subdir, prefix=prefix)
    brain_mask = None
    if brain_mask_suffix:
        base = dwi.name.removesuffix(name.extension).removesuffix("_dwi").replace("_desc-preproc", "")
        brain_mask = dwi.with_name(base + brain_mask_suffix)
        if not brain_mask.is_file():
            raise InputError(dwi, f"its brain mask {brain_mask.name} is missing")
    return Scan(participant_id=participant_id, session=session, group=group, is_control=is_control, dwi=dwi,
                bval=gradients[0], bvec=gradients[1], lesion_mask=lesion if lesion.is_file() else None,
                brain_mask=brain_mask, entities=entities, sidecars=tuple(_inherited(chain, name, ".json")))


def _check_scans(scans: list[Scan], selected: set[str], filtered_out: set[str], filters: dict[str, set[str]],
                 bids_dir: Path, dwi_suffix: str) -> None:
    """Refuse a scan list that would silently leave a selected participant out or hold one scan twice."""
    tsv = bids_dir / "participants.tsv"
    expected = f"sub-*/[ses-*/]dwi/*{dwi_suffix}.nii[.gz]"
    if not scans:
        if filtered_out:
            raise SelectionError(bids_dir, f"dwi_filters {filters} select no DWI file")
        raise InputError(bids_dir, f"no diffusion scans found (expected {expected})")
    # A selected participant without a scan would silently leave the cohort (and a run "succeed" without it).
    missing = sorted(selected - {s.participant_id for s in scans})
    if missing:
        unfiltered = [p for p in missing if p not in filtered_out]
        if not unfiltered:
            raise SelectionError(tsv, f"dwi_filters {filters} leave {', '.join(missing)} without a DWI file; "
                                      f"widen the filters or exclude them (exclude_participant_label)")
        raise InputError(tsv, f"{', '.join(unfiltered)} listed but without a diffusion scan (expected "
                              f"{unfiltered[0]}/[ses-*/]dwi/*{dwi_suffix}.nii[.gz]); add the scan, remove the row "
                              f"or exclude them (exclude_participant_label)")
    by_prefix: dict[str, list[Path]] = {}
    for scan in scans:
        by_prefix.setdefault(scan.prefix, []).append(scan.dwi)
    for prefix, paths in by_prefix.items():
        if len(paths) > 1:
            raise InputError(paths[0].parent, f"several DWI files make scan {prefix} "
                                              f"({', '.join(p.name for p in paths)}); keep one or choose with "
                                              f"dwi_filters")
