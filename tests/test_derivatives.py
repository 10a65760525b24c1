"""The BIDS naming of anomri's derivatives: desc labels, BIDS URIs and the dataset-level files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from anomri import __version__
from anomri.io.derivatives import ScanDerivatives, desc_label, source_uri, write_dataset_description
from anomri.scores import get_scores, score_ids


def test_every_score_has_its_own_alphanumeric_desc_label() -> None:
    labels = [desc_label(s) for s in score_ids()]
    assert all(label.isascii() and label.isalnum() for label in labels)
    assert len(set(labels)) == len(labels)
    path = ScanDerivatives(Path("out"), "sub-01").novelty("vae-reg")
    assert path.name == "sub-01_space-dwi_desc-vaereg_novelty.nii.gz"


def test_descriptions_map_every_label_to_its_score(tmp_path: Path) -> None:
    scores = get_scores(["vae-reg", "neg-elbo"])
    write_dataset_description(tmp_path, tmp_path / "raw", scores, [0.01, 0.001], learned=False)
    with open(tmp_path / "descriptions.tsv", newline="") as fh:
        rows = {row["desc_id"]: row for row in csv.DictReader(fh, delimiter="\t")}
    for score in scores:
        row = rows[f"desc-{desc_label(score.id)}"]
        assert (row["score_id"], row["formula"]) == (score.id, score.formula)
        assert row["sign_convention"].startswith("higher = more novel")
    assert set(rows) == {"desc-brain", "desc-meanb0", "desc-qspace", "desc-vaereg", "desc-negelbo", "desc-neglog10p",
                         "desc-p01", "desc-p001", "desc-clusters"}
    columns = json.loads((tmp_path / "descriptions.json").read_text())
    assert {"score_id", "formula", "sign_convention"} <= set(columns)
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "anomri" and description["GeneratedBy"][0]["Version"] == __version__
    assert description["DatasetLinks"]["raw"] == (tmp_path / "raw").resolve().as_uri()
    assert "*_novelty.*" in (tmp_path / ".bidsignore").read_text().splitlines()


def test_sources_are_bids_uris(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    assert source_uri(raw / "sub-01" / "dwi" / "sub-01_dwi.nii.gz", raw) == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    elsewhere = tmp_path / "mask.nii.gz"
    assert source_uri(elsewhere, raw) == source_uri(elsewhere, None) == elsewhere.resolve().as_uri()
    scan = ScanDerivatives(tmp_path, "sub-01_ses-2")
    assert scan.uri(scan.probseg) == "bids::sub-01/ses-2/dwi/sub-01_ses-2_space-dwi_label-L_probseg.nii.gz"
