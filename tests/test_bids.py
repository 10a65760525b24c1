"""Cohort indexing of BIDS / QSIPrep trees and the control split.

The trees are empty placeholder files made here: indexing reads names only.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from anomri.errors import InputError
from anomri.io.bids import Scan, SelectionError, index_cohort
from anomri.io.cohort import cross_fitting_folds, plan_cohort, plan_from_config
from anomri.settings import defaults


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
    scans = index_cohort(tmp_path, dwi_suffix="_desc-preproc_dwi",
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
    # 200 subjects x 2 sessions x 2 runs, half of them with the top-level gradients; a slow (quadratic)
    # indexer would show up as a slow test, but speed itself is measured by benchmarks/bench_indexing.py.
    labels = [f"{i:03d}" for i in range(200)]
    write_participants(tmp_path, {label: "control" if i % 3 else "patient" for i, label in enumerate(labels)})
    top = [touch(tmp_path / "dwi.bval"), touch(tmp_path / "dwi.bvec")]
    for (i, label), session, run in itertools.product(enumerate(labels), ("1", "2"), ("1", "2")):
        dwi = add_dwi(tmp_path, label, session, stem_entities=f"_run-{run}")
        if i % 2:
            for ext in (".bval", ".bvec"):
                dwi.with_name(dwi.name.replace(".nii.gz", ext)).unlink()
    scans = index_cohort(tmp_path)
    assert [s.prefix for s in scans] == [f"sub-{label}_ses-{s}_run-{r}" for label in labels for s in ("1", "2")
                                         for r in ("1", "2")]
    assert sum(s.is_control for s in scans) == 4 * sum(1 for i in range(200) if i % 3)
    assert sum([s.bval, s.bvec] == top for s in scans) == 4 * 100


# --------------------------------------------------------------------------- control split


def controls(n_participants: int, n_sessions: int = 2) -> list[Scan]:
    """Placeholder control scans, ``n_sessions`` per participant."""
    return [Scan(f"sub-{p:02d}", f"ses-{s}", "control", True, Path(f"{p}_{s}.nii.gz"), Path("b"), Path("v"))
            for p in range(n_participants) for s in range(n_sessions)]


def participants_of(scans: list[Scan]) -> set[str]:
    return {s.participant_id for s in scans}


def test_folds_are_deterministic_for_a_seed_and_depend_on_it() -> None:
    scans = controls(10)
    assert cross_fitting_folds(scans, 3, seed=4) == cross_fitting_folds(scans, 3, seed=4)
    first_folds = {frozenset(participants_of(cross_fitting_folds(scans, 3, seed)[0])) for seed in range(10)}
    assert len(first_folds) > 1


@pytest.mark.parametrize("n_participants", [2, 3, 7, 20])
@pytest.mark.parametrize("n_folds", [2, 3, 5, 40])
def test_folds_partition_the_controls_and_keep_sessions_together(n_participants: int, n_folds: int) -> None:
    scans = controls(n_participants, n_sessions=3)
    folds = cross_fitting_folds(scans, n_folds, seed=0)
    # At most one fold per participant: no fold model is left with nobody to score.
    assert len(folds) == min(n_folds, n_participants)
    # Every control in exactly one fold, all sessions of a participant in the same one.
    assert sorted((s for fold in folds for s in fold), key=scans.index) == scans
    ids = [participants_of(fold) for fold in folds]
    assert all(not (a & b) for a, b in itertools.combinations(ids, 2))
    sizes = [len(i) for i in ids]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_every_fold_model_trains_on_the_other_folds_only(tmp_path: Path) -> None:
    scans = controls(7, n_sessions=2) + [Scan("sub-P1", None, "patient", False, Path("p.nii.gz"), Path("b"),
                                              Path("v"))]
    plan = plan_cohort(scans, tmp_path, n_folds=3, seed=1)
    assert plan.others == scans[-1:] and plan.fold_of(scans[-1]) is None
    for k, fold in enumerate(plan.folds):
        training = plan.training(k)
        # Fold k's model never sees a scan of the participants it scores out of fold...
        assert not participants_of(training) & participants_of(fold)
        # ...and sees every other control.
        assert sorted(training + fold, key=scans.index) == scans[:-1]
        assert all(plan.fold_of(s) == k for s in fold)


def test_patients_are_dealt_to_folds_evenly_and_deterministically(tmp_path: Path) -> None:
    patients = [Scan(f"sub-P{i}", None, "patient", False, Path(f"p{i}.nii.gz"), Path("b"), Path("v")) for i in range(7)]
    scans = controls(4, n_sessions=1) + patients
    plan = plan_cohort(scans, tmp_path, n_folds=3, seed=1)
    dealt = [plan.scoring_fold(p) for p in patients]
    assert sorted(np.bincount(dealt, minlength=3)) == [2, 2, 3]  # round robin over the 3 folds
    assert dealt == [plan_cohort(scans, tmp_path, n_folds=3, seed=1).scoring_fold(p) for p in patients]
    # Shuffled by split.seed, not dealt in name order.
    assert any(dealt != [plan_cohort(scans, tmp_path, n_folds=3, seed=s).scoring_fold(p) for p in patients]
               for s in range(2, 7))
    assert all(plan.scoring_fold(c) == plan.fold_of(c) for c in plan.controls)


def test_cross_fitting_needs_two_control_participants_and_two_folds() -> None:
    with pytest.raises(ValueError, match="at least 2 control participants"):
        cross_fitting_folds(controls(1, n_sessions=2), 3, seed=0)
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_fitting_folds(controls(5), 1, seed=0)
    # Three controls, the smallest clinical cohort the defaults must take: one fold each (leave one out).
    assert [len(f) for f in cross_fitting_folds(controls(3, n_sessions=1), 3, seed=0)] == [1, 1, 1]


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
    assert [s.prefix for s in scans] == ["sub-A1_ses-Pre1_acq-b1000_run-1", "sub-b2_ses-pre"]
    assert [s.subdir for s in scans] == ["sub-A1/ses-Pre1", "sub-b2/ses-pre"]
    assert scans[0].dwi.name == "sub-A1_ses-Pre1_acq-b1000_run-1_dwi.nii.gz"


# --------------------------------------------------------------------------- inheritance, runs, .nii


def test_top_level_gradients_are_inherited(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    dwis = [touch(tmp_path / f"sub-{label}" / "dwi" / f"sub-{label}_dwi.nii.gz") for label in ("01", "02")]
    bval, bvec = touch(tmp_path / "dwi.bval"), touch(tmp_path / "dwi.bvec")
    # sub-02's own b-vectors are closer than the top-level ones, and win.
    own_bvec = touch(dwis[1].with_name("sub-02_dwi.bvec"))
    scans = index_cohort(tmp_path)
    assert [(s.dwi, s.bval, s.bvec) for s in scans] == [(dwis[0], bval, bvec), (dwis[1], bval, own_bvec)]


def test_session_and_subject_level_files_are_inherited(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control"})
    dwi = touch(tmp_path / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_acq-b1000_dwi.nii.gz")
    touch(tmp_path / "dwi.bval")
    bval = touch(tmp_path / "sub-01" / "ses-1" / "sub-01_ses-1_dwi.bval")  # deeper: wins over the top level
    bvec = touch(tmp_path / "sub-01" / "sub-01_acq-b1000_dwi.bvec")
    touch(tmp_path / "sub-01" / "sub-01_acq-b3000_dwi.bvec")  # another acquisition's: does not apply
    (scan,) = index_cohort(tmp_path)
    assert (scan.dwi, scan.bval, scan.bvec) == (dwi, bval, bvec)


def test_json_sidecars_merge_from_the_top(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control"})
    add_dwi(tmp_path, "01", session="1")
    top = tmp_path / "dwi.json"
    top.write_text('{"PhaseEncodingDirection": "j", "TotalReadoutTime": 0.05}')
    own = tmp_path / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_dwi.json"
    own.write_text('{"PhaseEncodingDirection": "j-"}')
    touch(tmp_path / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.json")  # another suffix
    (scan,) = index_cohort(tmp_path)
    assert scan.sidecars == (top, own)
    assert scan.metadata() == {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05}


def test_two_applicable_files_in_one_folder_are_ambiguous(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control"})
    add_dwi(tmp_path, "01", stem_entities="_run-1")
    folder = tmp_path / "sub-01" / "dwi"
    touch(folder / "sub-01_dwi.bval")  # applies to run 1 as well as its own sub-01_run-1_dwi.bval
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(folder)
    assert "sub-01_dwi.bval and sub-01_run-1_dwi.bval" in info.value.problem


def test_missing_gradients_name_the_scan(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control"})
    dwi = touch(tmp_path / "sub-01" / "dwi" / "sub-01_dwi.nii.gz")
    touch(tmp_path / "sub-01" / "dwi" / "sub-01_dwi.bvec")
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(dwi) and info.value.problem.startswith("no .bval file applies")


def test_each_run_is_its_own_scan(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "control"})
    runs = [add_dwi(tmp_path, "01", session="1", stem_entities=f"_dir-AP_run-{run}") for run in (1, 2)]
    add_dwi(tmp_path, "02", session="1")
    scans = index_cohort(tmp_path)
    assert [s.prefix for s in scans] == ["sub-01_ses-1_dir-AP_run-1", "sub-01_ses-1_dir-AP_run-2", "sub-02_ses-1"]
    assert [s.subdir for s in scans] == ["sub-01/ses-1"] * 2 + ["sub-02/ses-1"]
    assert [s.dwi for s in scans[:2]] == runs
    assert [s.bval.name for s in scans[:2]] == ["sub-01_ses-1_dir-AP_run-1_dwi.bval",
                                               "sub-01_ses-1_dir-AP_run-2_dwi.bval"]
    # Both runs of a participant fall in one cross-fitting fold.
    assert sorted(len(fold) for fold in cross_fitting_folds(scans, 2, seed=0)) == [1, 2]


def test_run_outputs_share_the_session_folder(tmp_path: Path) -> None:
    from anomri.io.bids import PREFIX_PATTERN
    from anomri.io.derivatives import ScanDerivatives

    assert ScanDerivatives(tmp_path, "sub-01_ses-1_acq-b1000_run-2").dir == tmp_path / "sub-01" / "ses-1" / "dwi"
    assert ScanDerivatives(tmp_path, "sub-01_run-2").dir == tmp_path / "sub-01" / "dwi"
    for prefix in ("sub-01", "sub-01_ses-1", "sub-01_ses-1_acq-b1000_dir-AP_run-2", "sub-01_run-1"):
        assert re.fullmatch(PREFIX_PATTERN, prefix), prefix
    for other in ("sub-01_space-dwi", "sub-01_run-2_acq-b1000", "sub-01/ses-1", "sub-0 1"):
        assert not re.fullmatch(PREFIX_PATTERN, other), other


def test_dwi_filters_choose_among_runs(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    for label in ("01", "02"):
        for direction in ("AP", "PA"):
            add_dwi(tmp_path, label, stem_entities=f"_dir-{direction}")
    scans = index_cohort(tmp_path, dwi_filters={"dir": ["AP"]})
    assert [s.prefix for s in scans] == ["sub-01_dir-AP", "sub-02_dir-AP"]
    with pytest.raises(SelectionError) as info:
        index_cohort(tmp_path, dwi_filters={"dir": ["LR"]})
    assert "select no DWI file" in info.value.problem


def test_uncompressed_nifti(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control", "02": "patient"})
    folder = tmp_path / "sub-01" / "dwi"
    dwi = touch(folder / "sub-01_dwi.nii")
    touch(folder / "sub-01_dwi.bval")
    touch(folder / "sub-01_dwi.bvec")
    add_dwi(tmp_path, "02")
    scans = index_cohort(tmp_path)
    assert (scans[0].dwi, scans[0].bval, scans[0].prefix) == (dwi, folder / "sub-01_dwi.bval", "sub-01")
    # The same scan twice, compressed and not, is ambiguous.
    touch(folder / "sub-01_dwi.nii.gz")
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path)
    assert info.value.path == str(folder)
    assert info.value.problem.startswith("several DWI files make scan sub-01 (sub-01_dwi.nii, sub-01_dwi.nii.gz)")


def test_qsiprep_brain_mask_must_exist(tmp_path: Path) -> None:
    write_participants(tmp_path, {"01": "control"})
    dwi = add_dwi(tmp_path, "01", suffix="_desc-preproc_dwi")
    with pytest.raises(InputError) as info:
        index_cohort(tmp_path, dwi_suffix="_desc-preproc_dwi", brain_mask_suffix="_desc-brain_mask.nii.gz")
    assert info.value.path == str(dwi) and "sub-01_desc-brain_mask.nii.gz is missing" in info.value.problem


# --------------------------------------------------------------------------- participant selection


def selection_cohort(root: Path) -> None:
    """sub-01..04 with a DWI scan (01, 02 controls), sub-05 listed without one."""
    write_participants(root, {"01": "control", "02": "control", "03": "patient", "04": "patient", "05": "patient"})
    for label in ("01", "02", "03", "04"):
        add_dwi(root, label)


def test_participant_label_selects(tmp_path: Path) -> None:
    selection_cohort(tmp_path)
    # sub-05 has no scan, but it is not selected: no error.
    scans = index_cohort(tmp_path, participant_label=["01", "sub-02", "03"])
    assert [s.participant_id for s in scans] == ["sub-01", "sub-02", "sub-03"]


def test_excluded_participant_is_left_out(tmp_path: Path) -> None:
    selection_cohort(tmp_path)
    scans = index_cohort(tmp_path, exclude_participant_label=["04", "05"])
    assert [s.participant_id for s in scans] == ["sub-01", "sub-02", "sub-03"]


@pytest.mark.parametrize(("key", "labels"), [("participant_label", ["01", "09"]),
                                             ("exclude_participant_label", ["sub-09"])])
def test_label_matching_nobody_is_an_error(tmp_path: Path, key: str, labels: list[str]) -> None:
    selection_cohort(tmp_path)
    with pytest.raises(SelectionError) as info:
        index_cohort(tmp_path, **{key: labels, "exclude_participant_label": ["05"]} if key == "participant_label"
                     else {key: labels})
    assert info.value.path == str(tmp_path / "participants.tsv")
    assert info.value.problem.startswith(f"{key} {labels[-1]!r} matches no participant")


def test_selection_without_controls_or_anybody(tmp_path: Path) -> None:
    selection_cohort(tmp_path)
    with pytest.raises(SelectionError, match="no controls among the selected participants"):
        index_cohort(tmp_path, participant_label=["03"])
    with pytest.raises(SelectionError, match="leave no participant"):
        index_cohort(tmp_path, participant_label=["03"], exclude_participant_label=["03"])
    with pytest.raises(InputError, match="not a participant label"):
        index_cohort(tmp_path, participant_label=["0 1"])


def test_models_train_on_the_selected_controls(tmp_path: Path) -> None:
    labels = [f"C{i}" for i in range(6)] + ["P1", "P2"]
    write_participants(tmp_path, {label: "control" if label[0] == "C" else "patient" for label in labels})
    for label in labels:
        add_dwi(tmp_path, label)
    config = defaults()
    config.update(bids_dir=str(tmp_path), participant_label=["C0", "C1", "C2", "P1"],
                  split={"folds": 3, "seed": 0})
    plan = plan_from_config(config)
    assert [s.participant_id for s in plan.scans] == ["sub-C0", "sub-C1", "sub-C2", "sub-P1"]
    assert {s.participant_id for k in range(len(plan.folds)) for s in plan.training(k)} == {"sub-C0", "sub-C1",
                                                                                             "sub-C2"}


def test_demo_plan_honours_the_selection(tmp_path: Path) -> None:
    from anomri.demo.plan import planned_scans

    config = defaults()
    n_controls, n_patients = config["demo"]["n_controls"], config["demo"]["n_patients"]
    # Leave out the last control and the last patient of the demo cohort.
    config.update(output_dir=str(tmp_path), exclude_participant_label=[f"C{n_controls:02d}", f"P{n_patients:02d}"])
    plan = plan_from_config(config, planned_scans(config))
    assert [s.participant_id for s in plan.scans] == [f"sub-C{i:02d}" for i in range(1, n_controls)] + [
        f"sub-P{i:02d}" for i in range(1, n_patients)]
