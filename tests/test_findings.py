"""Findings of every scan, labelled or not: the clusters table, the findings figure and the cohort page.

The clusters table is checked against brute force on a synthetic volume with known blobs on a rotated,
anisotropic, flipped grid: voxel counts, volumes, probabilities and centroids computed independently of
the code under test (voxel lists, the affine multiplied by hand).
"""

from __future__ import annotations

import csv
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from anomri.cli import main
from anomri.evaluate.quality import quality_columns
from anomri.io.derivatives import BIDSIGNORE, ScanDerivatives, sidecar_path, write_dataset_description
from anomri.io.nifti import save_volume
from anomri.maps.clusters import CLUSTER_COLUMNS, find_clusters
from anomri.maps.writing import remove_small_components
from anomri.report.figures import FigurePaths, _canonical, _canonical_index

LEVELS = (0.01, 0.001)
SHAPE = (20, 18, 12)
ZOOMS = (1.5, 2.0, 3.0)


def _affine() -> np.ndarray:
    """A grid that is neither RAS nor isotropic: rotated 30 degrees about z, first axis flipped, shifted."""
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-ZOOMS[0], ZOOMS[1], ZOOMS[2]])
    affine[:3, 3] = [40.0, -25.0, 12.5]
    return affine


#: The blobs of the synthetic lesion mask (voxel lists), with the 26-connected components they form.
BLOBS = {
    "cube": [(i, j, k) for i in range(2, 5) for j in range(2, 5) for k in range(2, 5)],  # 27 voxels
    # Four voxels touching only at corners: one 26-connected component (four 6-connected ones).
    "diagonal": [(10, 10, 4), (11, 11, 5), (12, 12, 6), (13, 13, 7)],
    "pair": [(16, 3, 3), (17, 3, 3)],
    # Two single voxels: equal sizes, in the order of their first voxel in C order ("single_a" first).
    "single_a": [(6, 14, 9)],
    "single_b": [(15, 15, 1)],
}
ORDER = ["cube", "diagonal", "pair", "single_a", "single_b"]
#: The stricter level's mask: the cube and one single voxel.
STRICT = ["cube", "single_b"]


def _volumes(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(loose mask, strict mask, probability, -log10 p) with the blobs of :data:`BLOBS`."""
    rng = np.random.default_rng(seed)
    loose, strict = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    probability = rng.uniform(0.0, 0.9, SHAPE).astype(np.float32)
    evidence = rng.uniform(0.0, 1.5, SHAPE).astype(np.float32)
    for name, voxels in BLOBS.items():
        for v in voxels:
            loose[v] = True
            strict[v] = name in STRICT
            probability[v] = rng.uniform(0.99, 1.0)
            evidence[v] = rng.uniform(2.0, 6.0)
    return loose, strict, probability, evidence


def _expected(names: list[str], probability: np.ndarray, evidence: np.ndarray) -> list[dict[str, float]]:
    """The rows brute force gives: per blob, from its voxel list and the affine multiplied by hand."""
    affine = _affine()
    rows = []
    for rank, name in enumerate(names, start=1):
        voxels = np.array(BLOBS[name], float)
        centroid = voxels.mean(axis=0)
        world = affine[:3, :3] @ centroid + affine[:3, 3]
        values = np.array([probability[tuple(v)] for v in BLOBS[name]], float)
        rows.append({"cluster_id": rank, "n_voxels": len(voxels), "volume_mm3": len(voxels) * np.prod(ZOOMS),
                     "probability_peak": values.max(), "probability_mean": values.mean(),
                     "neglog10p_peak": max(float(evidence[tuple(v)]) for v in BLOBS[name]),
                     "centroid_x": world[0], "centroid_y": world[1], "centroid_z": world[2],
                     "centroid_i": centroid[0], "centroid_j": centroid[1], "centroid_k": centroid[2]})
    return rows


def _assert_rows(found: list[dict], expected: list[dict], rel: float = 1e-9) -> None:
    assert len(found) == len(expected)
    for got, want in zip(found, expected):
        for column, value in want.items():
            assert float(got[column]) == pytest.approx(value, rel=rel, abs=rel), (want["cluster_id"], column)


def test_clusters_match_brute_force_on_a_rotated_anisotropic_grid() -> None:
    loose, strict, probability, evidence = _volumes()
    _assert_rows(find_clusters(loose, probability, evidence, _affine()), _expected(ORDER, probability, evidence))
    _assert_rows(find_clusters(strict, probability, evidence, _affine()), _expected(STRICT, probability, evidence))
    assert find_clusters(np.zeros(SHAPE, bool), probability, evidence, _affine()) == []


def test_clusters_are_the_components_of_the_masks_min_component_filter() -> None:
    """The table's clusters are the components ``min_component_voxels`` counts: filtering the mask at k voxels keeps
    exactly the clusters of k voxels or more."""
    loose, _, probability, evidence = _volumes()
    sizes = [row["n_voxels"] for row in find_clusters(loose, probability, evidence, _affine())]
    for k in (2, 3, 4, 5, 28):
        kept = remove_small_components(loose, k)
        assert [row["n_voxels"] for row in find_clusters(kept, probability, evidence, _affine())] == \
            [n for n in sizes if n >= k]


def _write_scan(root: Path, prefix: str, loose: np.ndarray, strict: np.ndarray, probability: np.ndarray,
                evidence: np.ndarray) -> ScanDerivatives:
    """A scan's maps and masks as ``anomri probability`` leaves them, with its mean b0 and brain mask."""
    scan = ScanDerivatives(root, prefix)
    scan.dir.mkdir(parents=True, exist_ok=True)
    reference = nib.Nifti1Image(np.zeros(SHAPE, np.float32), _affine())
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"), -1)
    brain = ((grid / (np.array(SHAPE) / 2)) ** 2).sum(-1) <= 1.2
    save_volume(scan.b0, 100.0 * brain + 10.0, reference)
    save_volume(scan.mask, brain, reference, dtype=np.uint8)
    save_volume(scan.probseg, probability, reference)
    save_volume(scan.neglog10p, evidence, reference)
    save_volume(scan.lesion_mask(LEVELS[0]), loose, reference, dtype=np.uint8)
    save_volume(scan.lesion_mask(LEVELS[1]), strict, reference, dtype=np.uint8)
    return scan


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        return list(reader.fieldnames or []), list(reader)


def test_clusters_command_writes_the_table_and_a_sidecar_describing_every_column(tmp_path: Path) -> None:
    loose, strict, probability, evidence = _volumes()
    scan = _write_scan(tmp_path, "sub-01_ses-2", loose, strict, probability, evidence)
    assert main(["clusters", "--derivatives-dir", str(tmp_path), "--prefix", "sub-01_ses-2", "--levels",
                 *map(str, LEVELS)]) == 0
    assert scan.clusters_table == tmp_path / "sub-01/ses-2/dwi/sub-01_ses-2_space-dwi_label-L_desc-clusters_table.tsv"
    header, rows = _read(scan.clusters_table)
    assert header == list(CLUSTER_COLUMNS)
    assert [float(r["level"]) for r in rows] == [0.01] * len(ORDER) + [0.001] * len(STRICT)
    # Written with 6 significant digits; the maps hold float32.
    _assert_rows(rows[:len(ORDER)], _expected(ORDER, probability, evidence), rel=1e-5)
    _assert_rows(rows[len(ORDER):], _expected(STRICT, probability, evidence), rel=1e-5)
    sidecar = json.loads(scan.clusters_table.with_suffix(".json").read_text())
    for column in header:
        assert sidecar[column]["Description"] and sidecar[column]["LongName"], column
    assert sidecar["volume_mm3"]["Units"] == "mm^3" and sidecar["centroid_x"]["Units"] == "mm"
    assert sidecar["Connectivity"] == 26 and sidecar["FalsePositiveLevels"] == list(LEVELS)
    assert all(source.startswith("bids::sub-01/ses-2/dwi/") for source in sidecar["Sources"])


def test_a_scan_with_nothing_flagged_gets_a_header_and_no_rows(tmp_path: Path) -> None:
    _, _, probability, evidence = _volumes()
    empty = np.zeros(SHAPE, bool)
    scan = _write_scan(tmp_path, "sub-01", empty, empty, probability, evidence)
    assert main(["clusters", "--derivatives-dir", str(tmp_path), "--prefix", "sub-01", "--levels",
                 *map(str, LEVELS)]) == 0
    header, rows = _read(scan.clusters_table)
    assert header == list(CLUSTER_COLUMNS) and rows == []
    assert scan.clusters_table.read_text() == "\t".join(CLUSTER_COLUMNS) + "\n"
    assert set(CLUSTER_COLUMNS) <= set(json.loads(scan.clusters_table.with_suffix(".json").read_text()))


def test_a_missing_mask_is_one_error_line(tmp_path: Path, capsys) -> None:
    loose, strict, probability, evidence = _volumes()
    _write_scan(tmp_path, "sub-01", loose, strict, probability, evidence)
    assert main(["clusters", "--derivatives-dir", str(tmp_path), "--prefix", "sub-01", "--levels", "0.05"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anomri: error: ") and "desc-p05_mask" in err and "\n" not in err


def test_canonical_index_follows_the_reorientation_of_the_figures() -> None:
    img = nib.Nifti1Image(np.zeros(SHAPE, np.float32), _affine())
    volume = np.random.default_rng(0).random(SHAPE)
    for index in [(0, 0, 0), (3, 7, 11), (19, 17, 0), (10, 4, 6)]:
        assert _canonical(img, volume)[_canonical_index(img, index)] == volume[index]
    permuted = nib.Nifti1Image(np.zeros(SHAPE, np.float32), _affine()[:, [1, 2, 0, 3]])  # axes in another order
    for index in [(0, 0, 0), (3, 7, 11), (19, 17, 0)]:
        assert _canonical(permuted, volume)[_canonical_index(permuted, index)] == volume[index]


def _png(path: Path) -> np.ndarray:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


def test_findings_figure_with_and_without_a_lesion_mask(tmp_path: Path) -> None:
    loose, strict, probability, evidence = _volumes()
    _write_scan(tmp_path, "sub-01", loose, strict, probability, evidence)
    lesion = tmp_path / "lesion.nii.gz"
    nib.save(nib.Nifti1Image(loose.astype(np.uint8), _affine()), lesion)
    figures = FigurePaths(tmp_path / "figures")
    base = ["plot-findings", "--derivatives-dir", str(tmp_path), "--prefix", "sub-01", "--levels", *map(str, LEVELS)]
    assert main([*base, "--lesion-mask", str(lesion), "--out", str(figures.findings("sub-01"))]) == 0
    three_rows = _png(figures.findings("sub-01"))
    one = tmp_path / "one.png"
    assert main([*base, "--n-clusters", "1", "--out", str(one)]) == 0  # no lesion mask
    assert _png(one).shape[0] < three_rows.shape[0]  # one row of slices per cluster
    # Nothing flagged: one row through the brain's centre.
    empty = np.zeros(SHAPE, bool)
    _write_scan(tmp_path, "sub-02", empty, empty, probability, evidence)
    nothing = tmp_path / "nothing.png"
    assert main(["plot-findings", "--derivatives-dir", str(tmp_path), "--prefix", "sub-02", "--levels",
                 *map(str, LEVELS), "--out", str(nothing)]) == 0
    assert _png(nothing).shape[0] == pytest.approx(_png(one).shape[0], abs=5)


class _Links(HTMLParser):
    """Every href and src of a page, and the text of its cells."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.cells: list[str] = []
        self.rows: list[list[str]] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value for name, value in attrs if name in ("href", "src") and value]
        if tag == "tr":
            self.rows.append([])
        if tag == "td":
            self._in_cell = True
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False
            self.rows[-1].append(self.cells[-1])

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def page_links(page: Path) -> tuple[list[str], list[list[str]]]:
    """(every link of an HTML page, the text of its table's rows), each link checked to resolve from its folder.

    Raises AssertionError on a link that is absolute, leaves for another site or names no file.
    """
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    for link in parser.links:
        parts = urlparse(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        assert (page.parent / unquote(parts.path)).is_file(), link
    return parser.links, [row for row in parser.rows if row]


def test_cohort_page_lists_every_scan_and_every_link_resolves(tmp_path: Path) -> None:
    loose, strict, probability, evidence = _volumes()
    empty = np.zeros(SHAPE, bool)
    scans = {"sub-C01": ("control", empty, "within"), "sub-P01": ("patient", loose, "above"),
             "sub-P02_ses-1": ("patient", strict, "within")}
    columns = quality_columns(LEVELS)
    lines = ["\t".join(columns)]
    for prefix, (role, mask, verdict) in scans.items():
        _write_scan(tmp_path, prefix, mask, mask & strict, probability, evidence)
        assert main(["clusters", "--derivatives-dir", str(tmp_path), "--prefix", prefix, "--levels",
                     *map(str, LEVELS)]) == 0
        assert main(["plot-findings", "--derivatives-dir", str(tmp_path), "--prefix", prefix, "--levels",
                     *map(str, LEVELS), "--out", str(FigurePaths(tmp_path / "figures").findings(prefix))]) == 0
        participant, _, session = prefix.partition("_")
        values = {"participant_id": participant, "session": session or "n/a", "role": role, "snr": "20.5",
                  "flagged_p01": "0.012", "flagged_p001": "0.0011", "shift": "0.1", "control_shift_low": "-0.2",
                  "control_shift_high": "0.3", "verdict": verdict}
        lines.append("\t".join(values[c] for c in columns))
    (tmp_path / "quality.tsv").write_text("\n".join(lines) + "\n")
    page = tmp_path / "cohort.html"
    assert main(["cohort-page", "--derivatives-dir", str(tmp_path), "--quality", str(tmp_path / "quality.tsv"),
                 "--levels", *map(str, LEVELS), "--out", str(page)]) == 0
    links, rows = page_links(page)
    listed = {row[0]: row for row in rows}
    assert set(listed) == set(scans)
    for prefix in scans:
        scan = ScanDerivatives(tmp_path, prefix)
        assert scan.clusters_table.relative_to(tmp_path).as_posix() in links
        assert f"figures/{prefix}_findings.png" in links
    assert listed["sub-C01"][1] == "control" and listed["sub-P01"][1] == "patient"
    # Clusters and volume at p <= 0.01: the table's (5 clusters of 27 + 4 + 2 + 1 + 1 voxels of 9 mm^3).
    header = ["scan", "role", "SNR", "brain flagged, p ≤ 0.01", "brain flagged, p ≤ 0.001", "clusters, p ≤ 0.01",
              "volume, p ≤ 0.01 (mm³)"]
    assert listed["sub-P01"][header.index("clusters, p ≤ 0.01")] == "5"
    assert listed["sub-P01"][header.index("volume, p ≤ 0.01 (mm³)")] == f"{35 * np.prod(ZOOMS):.0f}"
    assert listed["sub-C01"][header.index("clusters, p ≤ 0.01")] == "0"
    assert listed["sub-P01"][header.index("brain flagged, p ≤ 0.01")] == "1.2 %"
    html = page.read_text()
    assert "quality.tsv" in links and "Out of distribution" in html and 'class="ood"' in html
    # Without a server nothing else is fetched: no script, no stylesheet link.
    assert "<script" not in html and "<link" not in html


def test_cohort_page_without_a_clusters_table_is_one_error_line(tmp_path: Path, capsys) -> None:
    columns = quality_columns(LEVELS)
    (tmp_path / "quality.tsv").write_text("\t".join(columns) + "\n" + "\t".join(
        ["sub-01", "n/a", "patient", "20", "0.01", "0.001", "0", "-1", "1", "within"]) + "\n")
    assert main(["cohort-page", "--derivatives-dir", str(tmp_path), "--quality", str(tmp_path / "quality.tsv"),
                 "--out", str(tmp_path / "cohort.html")]) == 2
    assert "clusters_table.tsv: file not found" in capsys.readouterr().err


def test_cohort_page_refuses_tables_of_other_levels(tmp_path: Path, capsys) -> None:
    loose, strict, probability, evidence = _volumes()
    _write_scan(tmp_path, "sub-01", loose, strict, probability, evidence)
    assert main(["clusters", "--derivatives-dir", str(tmp_path), "--prefix", "sub-01", "--levels", "0.01"]) == 0
    columns = quality_columns(LEVELS)
    (tmp_path / "quality.tsv").write_text("\t".join(columns) + "\n" + "\t".join(
        ["sub-01", "n/a", "patient", "20", "0.01", "0.001", "0", "-1", "1", "within"]) + "\n")
    assert main(["cohort-page", "--derivatives-dir", str(tmp_path), "--quality", str(tmp_path / "quality.tsv"),
                 "--levels", *map(str, LEVELS), "--out", str(tmp_path / "cohort.html")]) == 2
    assert "has no clusters of level 0.001" in capsys.readouterr().err


def test_bidsignore_keeps_the_findings_out_of_the_validator() -> None:
    ignored = BIDSIGNORE.splitlines()
    assert {"*_table.*", "/quality*", "/cohort.html", "/figures"} <= set(ignored)


def test_derivatives_with_clusters_tables_pass_the_bids_validator(tmp_path: Path) -> None:
    from test_workflow import bids_validator

    validator = bids_validator()
    if validator is None:
        pytest.skip("bids-validator-deno is not installed (pip install -e '.[test]')")
    loose, strict, probability, evidence = _volumes()
    write_dataset_description(tmp_path, tmp_path / "raw", levels=LEVELS)
    scan = _write_scan(tmp_path, "sub-01", loose, strict, probability, evidence)
    for image in scan.dir.glob("*.nii.gz"):  # the keys BIDS requires of the maps' sidecars (anomri writes more)
        sidecar_path(image).write_text(json.dumps({"SpatialReference": scan.uri(scan.b0), "SkullStripped": False}))
    assert main(["clusters", "--derivatives-dir", str(tmp_path), "--prefix", "sub-01", "--levels",
                 *map(str, LEVELS)]) == 0
    (tmp_path / "quality.tsv").write_text("\t".join(quality_columns(LEVELS)) + "\n")
    (tmp_path / "cohort.html").write_text("<!DOCTYPE html>\n")
    result = subprocess.run([validator, "--format", "json", str(tmp_path)], capture_output=True, text=True)
    assert result.stdout, result.stderr[-2000:]
    issues = json.loads(result.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert errors == []
