"""The descriptor novelty and its fusion in the images evaluation: rows of evaluation.tsv and image_scores.tsv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomri.cli import main
from anomri.images.geometry import split_validation
from anomri.images.global_scores import DESCRIPTOR_METHOD, DESCRIPTOR_SCORE, descriptor_score_rows, fused_score_rows
from anomri.images.outputs import SCORE_COLUMNS, ImageOutputs, map_path
from anomri.images.settings import ImageSettings
from anomri.io.images import scan_mvtec
from anomri.io.tables import write_table

SIZE = 32
SETTINGS = {"descriptor_size": SIZE, "descriptor_scales": [2.0], "validation_fraction": 0.25}


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Speckled normal images; defective ones carry a bright disc over a quarter of the image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "category"
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    disc = (rows - 16) ** 2 + (cols - 16) ** 2 < 0.25 * SIZE * SIZE / np.pi
    normal = lambda: rng.uniform(0.4, 0.5) + rng.normal(0, 0.03, (SIZE, SIZE))  # noqa: E731
    for i in range(16):
        _save(root / "train" / "good" / f"{i:02d}.png", normal())
    for i in range(3):
        _save(root / "test" / "good" / f"g{i}.png", normal())
        _save(root / "test" / "disc" / f"d{i}.png", normal() + 0.3 * disc)
        _save(root / "ground_truth" / "disc" / f"d{i}_mask.png", disc.astype(float))
    return root


def _method_outputs(root: Path, images_dir: Path, settings: ImageSettings) -> None:
    """Scores, thresholds and maps of a stand-in method "vae" whose primary score is the image's index."""
    out = ImageOutputs(images_dir)
    found = scan_mvtec(root)
    _, validation = split_validation(found.train, settings.validation_fraction, settings.seed)
    rows = [{"method": "vae", "split": split, "label": r.label, "stem": r.stem, "score": "det-rec-err",
             "value": float(i)} for split, records in (("val", validation), ("test", found.test))
            for i, r in enumerate(records)]
    write_table(out.scores("vae"), rows, SCORE_COLUMNS)
    out.thresholds("vae").write_text(json.dumps({"primary_score": "det-rec-err", "pixel_threshold": 0.5}))
    for r in found.test:
        path = map_path(out.maps("vae"), r.label, r.stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.zeros((SIZE, SIZE), np.float32))


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_descriptor_rows_score_the_held_back_normals_and_the_test_images(folder: Path) -> None:
    settings = ImageSettings(**SETTINGS)
    rows = descriptor_score_rows(folder, settings)
    assert {r["split"] for r in rows} == {"val", "test"}
    assert sum(r["split"] == "val" for r in rows) == 4 and sum(r["split"] == "test" for r in rows) == 6
    assert all(r["method"] == DESCRIPTOR_METHOD and r["score"] == DESCRIPTOR_SCORE for r in rows)
    test = {r["stem"]: r["value"] for r in rows if r["split"] == "test"}
    # The discs are far from every normal image.
    assert min(test[f"d{i}"] for i in range(3)) > max(test[f"g{i}"] for i in range(3))


def test_fusion_is_the_max_of_z_scores_against_the_held_back_normals() -> None:
    keys = [("val", "good", "a"), ("val", "good", "b"), ("val", "good", "c"), ("test", "x", "d")]
    method = [{"method": "m", "split": s, "label": lab, "stem": st, "score": "p", "value": v}
              for (s, lab, st), v in zip(keys, [1.0, 2.0, 3.0, 5.0])]
    descriptors = [{"method": DESCRIPTOR_METHOD, "split": s, "label": lab, "stem": st, "score": DESCRIPTOR_SCORE,
                    "value": v} for (s, lab, st), v in zip(keys, [10.0, 10.0, 16.0, 13.0])]
    fused = {r["stem"]: r["value"] for r in fused_score_rows(method, descriptors, "p", "max")}
    # Method: mean 2, sd 1, so d is 3. Descriptors: mean 12, sd sqrt(12), so d is 1 / sqrt(12).
    assert fused["d"] == pytest.approx(3.0)
    assert fused["a"] == pytest.approx(max(-1.0, -2 / np.sqrt(12)))
    mean = {r["stem"]: r["value"] for r in fused_score_rows(method, descriptors, "p", "mean")}
    assert mean["d"] == pytest.approx((3.0 + 1 / np.sqrt(12)) / 2)
    # Too few held-back normal scores for a spread: nothing fused.
    assert fused_score_rows(method[2:], descriptors, "p", "max") == []


@pytest.mark.parametrize("enabled", [True, False])
def test_images_evaluate_adds_descriptor_and_fused_rows(folder: Path, tmp_path: Path, enabled: bool) -> None:
    images_dir = tmp_path / "images"
    settings = ImageSettings(**SETTINGS, descriptor_score=enabled)
    _method_outputs(folder, images_dir, settings)
    assert main(["images-evaluate", "--root", str(folder), "--methods", "vae", "--images-dir", str(images_dir),
                 "--settings", settings.to_json()]) == 0
    out = ImageOutputs(images_dir)
    table = _read(out.evaluation)
    descriptor = [r for r in table if r["method"] == DESCRIPTOR_METHOD]
    fused = [r for r in table if r["score"] == "det-rec-err+descriptors"]
    scores = _read(out.image_scores)
    if not enabled:
        assert not descriptor and not fused and {r["method"] for r in scores} == {"vae"}
        return
    assert {r["defect_type"] for r in descriptor} == {"all", "disc"} == {r["defect_type"] for r in fused}
    for row in descriptor + fused:
        assert row["primary"] == "False" and row["pixel_auroc"] == "n/a"
    assert float(next(r for r in descriptor if r["defect_type"] == "disc")["image_auroc"]) == 1.0
    assert sum(r["method"] == DESCRIPTOR_METHOD for r in scores) == 10
    assert sum(r["score"] == "det-rec-err+descriptors" for r in scores) == 10
    # The method's own rows are unchanged: its primary row still carries the pixel metrics.
    primary = [r for r in table if r["method"] == "vae" and r["primary"] == "True"]
    assert len(primary) == 2 and all(r["pixel_auroc"] != "n/a" for r in primary)
