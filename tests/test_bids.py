"""Cohort indexing of BIDS / QSIPrep trees and the control split.

The trees are empty placeholder files made here: indexing reads names only.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from anomri.errors import InputError
from anomri.io.bids import Scan, index_cohort
from anomri.io.cohort import split_controls


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write_participants(root: Path, rows: dict[str, str], column: str = "group", id_prefix: str = "sub-",
                       encoding: str = "utf-8", newline: str = "\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"participant_id\t{column}\tage"] + [f"{id_prefix}{label}\t{group}\t40" for label, group in rows.items()]
    path = root / "participants.tsv"
    path.write_bytes((newline.join(lines) + newline).encode(encoding))
    return path


def add_dwi(root: Path, label: str, session: str | None = None, stem_entities: str = "",
            suffix: str = "_dwi") -> Path:
    """Write a placeholder DWI with its .bval/.bvec; return the image path."""
    folder = root / f"sub-{label}" / (f"ses-{session}" if session else "") / "dwi"
    stem = f"sub-{label}" + (f"_ses-{session}" if session else "") + stem_entities + suffix
    for ext in (".bval", ".bvec"):
        touch(folder / (stem + ext))
    return touch(folder / (stem + ".nii.gz"))


def test_single_session_cohort(tmp_path: Path) -> None:
    write_participants(tmp_path, {"02": "patient", "01": "control", "03": "control"})
    dwis = {label: add_dwi(tmp_path, label) for label in ("03", "01", "02")}
    touch(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz")  # other modalities are ignored
    scans = index_cohort(tmp_path)
    assert [s.participant_id for s in scans] == ["sub-01", "sub-02", "sub-03"]
    for scan in scans:
        dwi = dwis[scan.participant_id.removeprefix("sub-")]
        assert scan.dwi == dwi
        assert scan.bval == dwi.parent / f"{scan.participant_id}_dwi.bval"
        assert scan.bvec == dwi.parent / f"{scan.participant_id}_dwi.bvec"
        assert scan.session is None
        assert scan.prefix == scan.subdir == scan.participant_id
        assert scan.lesion_mask is None and scan.brain_mask is None
    assert [(s.group, s.is_control) for s in scans] == [("control", True), ("patient", False), ("control", True)]


def test_sessions(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    for label, session in (("01", "2"), ("01", "1"), ("02", "1")):
        add_dwi(tmp_path, label, session)
    touch(tmp_path / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_T1w.nii.gz")  # a session without DWI
    scans = index_cohort(tmp_path)
    assert [(s.participant_id, s.session) for s in scans] == [("sub-01", "ses-1"), ("sub-01", "ses-2"),
                                                              ("sub-02", "ses-1")]
    assert [s.prefix for s in scans] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"]
    assert [s.subdir for s in scans] == ["sub-01/ses-1", "sub-01/ses-2", "sub-02/ses-1"]
    assert scans[1].dwi == tmp_path / "sub-01" / "ses-2" / "dwi" / "sub-01_ses-2_dwi.nii.gz"
    assert scans[1].bval == scans[1].dwi.with_name("sub-01_ses-2_dwi.bval")


def test_configurable_group_column_and_control_value(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "HC", "02": "MS", "03": "control"}, column="diagnosis")
    for label in ("01", "02", "03"):
        add_dwi(tmp_path, label)
    scans = index_cohort(tmp_path, group_column="diagnosis", control_value="HC")
    assert [(s.participant_id, s.group, s.is_control) for s in scans] == [
        ("sub-01", "HC", True), ("sub-02", "MS", False), ("sub-03", "control", False)]
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)  # the default "group" column does not exist
    assert info.value.path == str(tmp_path / "participants.tsv")
    assert "'group'" in info.value.problem


def test_participant_ids_without_sub_prefix(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"}, id_prefix="")
    add_dwi(tmp_path, "01")
    add_dwi(tmp_path, "02")
    scans = index_cohort(tmp_path)
    assert [(s.participant_id, s.is_control) for s in scans] == [("sub-01", True), ("sub-02", False)]


def test_participants_tsv_saved_by_a_spreadsheet(tmp_path: Path) -> None:
    # Spreadsheets save "UTF-8" text with a byte-order mark and CRLF line ends.
    write_participants(tmp_path, {"01": "control", "02": "patient"}, encoding="utf-8-sig", newline="\r\n")
    add_dwi(tmp_path, "01")
    add_dwi(tmp_path, "02")
    scans = index_cohort(tmp_path)
    assert [(s.participant_id, s.group) for s in scans] == [("sub-01", "control"), ("sub-02", "patient")]


def test_lesion_masks_default_template(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient", "03": "patient"})
    add_dwi(tmp_path, "01")
    add_dwi(tmp_path, "02")
    add_dwi(tmp_path, "03", session="1")
    lesions = tmp_path / "derivatives" / "lesions"
    mask_02 = touch(lesions / "sub-02" / "dwi" / "sub-02_space-dwi_desc-lesion_mask.nii.gz")
    mask_03 = touch(lesions / "sub-03" / "ses-1" / "dwi" / "sub-03_ses-1_space-dwi_desc-lesion_mask.nii.gz")
    assert [s.lesion_mask for s in index_cohort(tmp_path)] == [None, mask_02, mask_03]


def test_lesion_masks_custom_template(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    add_dwi(tmp_path, "01", session="a")
    add_dwi(tmp_path, "02", session="a")
    mask = touch(tmp_path / "sub-02" / "ses-a" / "anat" / "sub-02_ses-a_label-lesion_roi.nii.gz")
    # The default location holds nothing here; a custom template finds the mask.
    assert [s.lesion_mask for s in index_cohort(tmp_path)] == [None, None]
    scans = index_cohort(tmp_path, lesion_template="{subdir}/anat/{prefix}_label-lesion_roi.nii.gz")
    assert [s.lesion_mask for s in scans] == [None, mask]


def test_qsiprep_layout(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    for label in ("01", "02"):
        add_dwi(tmp_path, label, session="1", stem_entities="_space-T1w", suffix="_desc-preproc_dwi")
        touch(tmp_path / f"sub-{label}" / "ses-1" / "dwi" / f"sub-{label}_ses-1_space-T1w_desc-brain_mask.nii.gz")
        touch(tmp_path / f"sub-{label}" / "ses-1" / "dwi" / f"sub-{label}_ses-1_space-T1w_dwiref.nii.gz")
    scans = index_cohort(tmp_path, dwi_suffix="_desc-preproc_dwi.nii.gz",
                         brain_mask_suffix="_desc-brain_mask.nii.gz")
    assert len(scans) == 2
    for scan in scans:
        folder = tmp_path / scan.participant_id / "ses-1" / "dwi"
        stem = f"{scan.prefix}_space-T1w"
        assert scan.dwi == folder / f"{stem}_desc-preproc_dwi.nii.gz"
        assert scan.bval == folder / f"{stem}_desc-preproc_dwi.bval"
        assert scan.bvec == folder / f"{stem}_desc-preproc_dwi.bvec"
        assert scan.brain_mask == folder / f"{stem}_desc-brain_mask.nii.gz"
        assert scan.brain_mask.is_file()


def test_scan_of_unlisted_participant_is_an_input_error(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    for label in ("01", "02", "03"):
        add_dwi(tmp_path, label)
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(tmp_path / "sub-03" / "dwi" / "sub-03_dwi.nii.gz")
    assert "sub-03" in info.value.problem and "participants.tsv" in info.value.problem


def test_listed_participant_without_a_scan_is_an_input_error(tmp_path: Path) -> None:
    # sub-03 is listed but its DWI folder is missing: the run must not go on without it.
    write_participants(tmp_path, {"01": "control", "02": "patient", "03": "patient"})
    for label in ("01", "02"):
        add_dwi(tmp_path, label)
    (tmp_path / "sub-03" / "anat").mkdir(parents=True)
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(tmp_path / "participants.tsv")
    assert info.value.problem.startswith("sub-03 listed but without a diffusion scan")


def test_missing_participants_tsv_is_an_input_error(tmp_path: Path) -> None:
    add_dwi(tmp_path, "01")
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(tmp_path / "participants.tsv")


def test_large_cohort_is_indexed_completely(tmp_path: Path) -> None:
    # 150 subjects x 2 sessions; a slow (quadratic) indexer would show up as a
    # slow test, but speed itself is measured by benchmarks, not asserted here.
    labels = [f"{i:03d}" for i in range(150)]
    write_participants(tmp_path, {label: "control" if i % 3 else "patient" for i, label in enumerate(labels)})
    for label, session in itertools.product(labels, ("1", "2")):
        add_dwi(tmp_path, label, session)
    scans = index_cohort(tmp_path)
    assert [s.prefix for s in scans] == [f"sub-{label}_ses-{s}" for label in labels for s in ("1", "2")]
    assert sum(s.is_control for s in scans) == 2 * sum(1 for i in range(150) if i % 3)


# --------------------------------------------------------------------------- control split


def controls(n_participants: int, n_sessions: int = 2) -> list[Scan]:
    """Placeholder control scans, ``n_sessions`` per participant."""
    return [Scan(f"sub-{p:02d}", f"ses-{s}", "control", True, Path(f"{p}_{s}.nii.gz"), Path("b"), Path("v"))
            for p in range(n_participants) for s in range(n_sessions)]


def participants_of(scans: list[Scan]) -> set[str]:
    return {s.participant_id for s in scans}


def test_split_is_deterministic_for_a_seed_and_depends_on_it() -> None:
    scans = controls(10)
    assert split_controls(scans, 0.3, seed=4) == split_controls(scans, 0.3, seed=4)
    held_out = {frozenset(participants_of(split_controls(scans, 0.3, seed)[1])) for seed in range(10)}
    assert len(held_out) > 1


@pytest.mark.parametrize("n_participants", [2, 3, 7, 20])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.34, 0.5, 0.9, 1.0])
def test_split_keeps_sessions_together_and_honours_fraction(n_participants: int, fraction: float) -> None:
    scans = controls(n_participants, n_sessions=3)
    training, calibration, held_out = split_controls(scans, fraction, seed=0)
    assert held_out == []
    assert sorted(training + calibration, key=scans.index) == scans
    train_ids, cal_ids = participants_of(training), participants_of(calibration)
    assert not train_ids & cal_ids  # every session of a participant on one side
    assert train_ids and cal_ids
    # As close to the fraction as whole participants allow, within [1, n - 1].
    target = min(max(fraction * n_participants, 1), n_participants - 1)
    assert abs(len(cal_ids) - target) <= 0.5


def test_split_needs_two_control_participants() -> None:
    with pytest.raises(ValueError):
        split_controls(controls(1, n_sessions=2), 0.5, seed=0)
    with pytest.raises(ValueError):
        split_controls(controls(3, n_sessions=1), 0.5, seed=0, holdout=2)


@pytest.mark.parametrize("holdout", [1, 2, 3])
def test_holdout_controls_neither_train_nor_calibrate(holdout: int) -> None:
    scans = controls(8, n_sessions=2)
    training, calibration, held_out = split_controls(scans, 0.34, seed=1, holdout=holdout)
    ids = [participants_of(part) for part in (training, calibration, held_out)]
    assert len(ids[2]) == holdout
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sorted(training + calibration + held_out, key=scans.index) == scans
    assert round(0.34 * (8 - holdout)) == len(ids[1])  # the fraction applies to the controls left
    # Calibration takes the same draw as without holdout (the first of one permutation): nested splits.
    assert ids[1] <= participants_of(split_controls(scans, 0.34, seed=1)[1])


# --------------------------------------------------------------------------- labels


INJECTION = "01`touch PWNED`"


@pytest.mark.parametrize("label", [INJECTION, "01$(touch PWNED)", "01;rm", "0 1", "01'", "ü1", "01_a", "01-a", ""])
def test_participant_folder_label_must_be_alphanumeric(tmp_path: Path, label: str) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    add_dwi(tmp_path, "01")
    add_dwi(tmp_path, "02")
    bad = add_dwi(tmp_path, label).parent.parent  # a folder that participants.tsv does not list
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(bad)
    assert repr(label) in info.value.problem and "alphanumeric" in info.value.problem


@pytest.mark.parametrize("session", ["1`touch PWNED`", "1 2", "ü", "1_a"])
def test_session_folder_label_must_be_alphanumeric(tmp_path: Path, session: str) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    add_dwi(tmp_path, "01", session="1")
    bad = add_dwi(tmp_path, "02", session=session).parent.parent
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(bad)
    assert f"ses label {session!r}" in info.value.problem


@pytest.mark.parametrize(("participant_id", "id_prefix"), [(INJECTION, "sub-"), (INJECTION, ""), ("0 1", "sub-"),
                                                           ("", "sub-"), ("ü", "")])
def test_participants_tsv_row_must_hold_an_alphanumeric_label(tmp_path: Path, participant_id: str,
                                                               id_prefix: str) -> None:
    tsv = write_participants(tmp_path, {"01": "control", "02": "patient", participant_id: "patient"},
                             id_prefix=id_prefix)
    add_dwi(tmp_path, "01")
    add_dwi(tmp_path, "02")
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(tsv)
    # The header is line 1: the third participant is on line 4.
    assert info.value.problem.startswith(f"line 4: participant_id {id_prefix + participant_id!r} ")


def test_participants_tsv_row_without_a_group(tmp_path: Path) -> None:
    tsv = tmp_path / "participants.tsv"
    tsv.write_text("participant_id\tgroup\nsub-01\tcontrol\nsub-02\n")
    add_dwi(tmp_path, "01")
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(tsv) and info.value.problem == "line 3: sub-02 has no 'group' value"


@pytest.mark.parametrize("entities", ["_acq-b 1000", "_acq-x`touch PWNED`", "_run-ü", "_acq", "x"])
def test_other_entity_labels_in_dwi_names_must_be_alphanumeric(tmp_path: Path, entities: str) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    add_dwi(tmp_path, "01")
    bad = add_dwi(tmp_path, "02", stem_entities=entities)
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(bad)
    assert repr(entities) in info.value.problem


def test_alphanumeric_entities_are_accepted(tmp_path: Path) -> None:
    write_participants(tmp_path, {"A1": "control", "b2": "patient"})
    add_dwi(tmp_path, "A1", session="Pre1", stem_entities="_acq-b1000_run-1")
    add_dwi(tmp_path, "b2", session="pre")
    scans = index_cohort(tmp_path)
    assert [s.prefix for s in scans] == ["sub-A1_ses-Pre1", "sub-b2_ses-pre"]
    assert scans[0].dwi.name == "sub-A1_ses-Pre1_acq-b1000_run-1_dwi.nii.gz"
