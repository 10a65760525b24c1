"""End to end: the real ``snakemake`` runs the `images` target on a tiny demo image set."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from anomri.errors import InputError
from anomri.images.outputs import ImageOutputs
from anomri.images.scoring import score_method
from anomri.images.settings import ALL_METHODS, FUSION_METHOD, PRIMARY_SCORE, ImageSettings
from anomri.images.training import load_image_model, save_image_model
from anomri.io.images import scan_mvtec

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "image_size": 32, "batch_size": 8, "n_samples": 2,
    "vae_channels": [4, 8], "vae_latent_size": 8, "vae_epochs": 2,
    "anogan_channels": [4, 8], "anogan_latent_size": 8, "anogan_epochs": 2, "anogan_search_steps": 5,
    "mhp_channels": [4, 8], "mhp_latent_size": 8, "mhp_epochs": 2, "mhp_hypotheses": 2,
    "draem_reconstruction_channels": [4, 8], "draem_segmentation_channels": [4, 8, 16], "draem_epochs": 2,
    "draem_geometry": "tile",  # DRAEM cuts tiles while the other models resize, in the same run
    "patch_memory_width": 4, "patch_memory_epochs": 2, "patch_memory_positions": 16, "patch_memory_coreset_size": 64,
    "projection_steps": 5,
    "validation_fraction": 0.25,  # three normal validation images: enough for the per-pixel map statistics
    "demo": {"n_train": 12, "n_test_good": 3, "n_test_per_defect": 2, "height": 48, "seed": 1},
}


#: A space, a single quote, a non-ASCII letter, and shell syntax that would create PWNED if a shell read it.
AWKWARD = "my images' ü $(touch PWNED) `touch PWNED`"


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """Run `snakemake images` on the tiny demo, written to an awkward folder; return the output dir and the
    config file."""
    tmp = tmp_path_factory.mktemp("images_workflow")
    configfile = tmp / "tiny.yaml"
    configfile.write_text(yaml.safe_dump({"output_dir": str(tmp / AWKWARD / "out"), "images": TINY},
                                         allow_unicode=True), encoding="utf-8")
    # One thread per training and scoring job, so that two of them run side by side.
    result = snakemake("--cores", "2", "images", "--configfile", str(configfile),
                       "--set-threads", "images_train=1", "images_score=1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (REPO / "PWNED").exists() and list(tmp.rglob("PWNED")) == []
    return tmp / AWKWARD / "out", configfile


def test_every_output_exists(run: tuple[Path, Path]) -> None:
    out = ImageOutputs(run[0] / "images")
    test = scan_mvtec(out.demo).test
    assert {r.label for r in test} == {"good", "fluid", "drusen"}
    for method in ALL_METHODS:
        for record in test:
            pixel_map = np.load(out.maps(method) / record.label / f"{record.stem}.npy")
            width, height = Image.open(record.path).size
            assert pixel_map.dtype == np.float32 and pixel_map.shape == (height, width)
            assert np.isfinite(pixel_map).all()
            overlay = Image.open(out.overlays(method) / record.label / f"{record.stem}.png")
            assert overlay.size[1] == height and overlay.size[0] > 3 * width
        assert out.examples_figure(method).stat().st_size > 0
        thresholds = json.loads(out.thresholds(method).read_text())
        assert np.isfinite(thresholds["pixel_threshold"])
        assert len(list(out.validation_maps(method).rglob("*.npy"))) == 3  # the normal validation images
        if method == FUSION_METHOD:
            defaults = ImageSettings()
            assert thresholds["map_components"] == defaults.map_fusion_methods
            assert set(thresholds["components"]) == set(defaults.fused_methods) == {"patch-memory", "vae-projection"}
        else:
            assert thresholds["score_normalization"] == "zscore" and thresholds["map_normalization"] == "none"
    for path in (out.roc_figure, out.curves, out.model("conv-vae"), out.history("mhp-vae"), out.model("draem")):
        assert path.stat().st_size > 0
    # The demo B-scans get the demo's band handling (config.yaml: images.demo.oct_band), not images.oct_band.
    assert load_image_model(out.model("conv-vae"))[1]["settings"]["oct_band"] == "flatten"


def test_each_model_reads_images_in_its_own_geometry(run: tuple[Path, Path], tmp_path: Path) -> None:
    out = ImageOutputs(run[0] / "images")
    draem = load_image_model(out.model("draem"))[1]
    vae = load_image_model(out.model("conv-vae"))[1]
    # Whole resized images: one input each. Tiles of 32 px from B-scans 48 px high and wider: several each.
    assert vae["n_training_inputs"] == vae["n_training_images"]
    assert draem["n_training_inputs"] >= 2 * draem["n_training_images"]
    # Scoring in a geometry the model never saw is refused, naming the model and the setting.
    settings = ImageSettings.from_json(json.dumps(draem["settings"] | {"draem_geometry": "resize"}))
    with pytest.raises(InputError, match="draem_geometry") as error:
        score_method("draem", out.model("draem"), out.demo, settings, tmp_path)
    assert str(out.model("draem")) in str(error.value)
    assert not any(tmp_path.iterdir())
    # A checkpoint from before DRAEM had its own geometry names only the shared one: still checked.
    model, metadata = load_image_model(out.model("draem"))
    legacy = {k: v for k, v in metadata["settings"].items() if k != "draem_geometry"} | {"geometry": "tile"}
    save_image_model(tmp_path / "legacy.pt", model, metadata | {"settings": legacy})
    with pytest.raises(InputError, match="draem_geometry 'tile'"):
        score_method("draem", tmp_path / "legacy.pt", out.demo, settings, tmp_path / "scored")
    assert not (tmp_path / "scored").exists()


def test_tables(run: tuple[Path, Path]) -> None:
    out = ImageOutputs(run[0] / "images")
    with open(out.image_scores) as fh:
        scores = list(csv.DictReader(fh, delimiter="\t"))
    n_test = len(scan_mvtec(out.demo).test)
    for method in ALL_METHODS:
        for score in ("map-max", PRIMARY_SCORE[method]):
            test_rows = [r for r in scores if r["method"] == method and r["split"] == "test" and r["score"] == score]
            assert len(test_rows) == n_test
    with open(out.evaluation) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    primary = [r for r in rows if r["primary"] == "True"]
    assert sorted({r["method"] for r in primary}) == sorted(ALL_METHODS)
    assert {r["defect_type"] for r in primary} == {"all", "fluid", "drusen"}
    for row in primary:
        assert 0.0 <= float(row["image_auroc"]) <= 1.0 and 0.0 <= float(row["pixel_auroc"]) <= 1.0
        assert 0.0 <= float(row["aupro"]) <= 1.0
    # The image-level descriptor novelty, and every method's primary score fused with it (image metrics only).
    descriptor = [r for r in rows if r["method"] == "global-descriptors"]
    assert {r["defect_type"] for r in descriptor} == {"all", "fluid", "drusen"}
    fused = {(r["method"], r["score"]) for r in rows if r["score"].endswith("+descriptors")}
    assert fused == {(m, f"{PRIMARY_SCORE[m]}+descriptors") for m in ALL_METHODS}
    for row in descriptor + [r for r in rows if r["score"].endswith("+descriptors")]:
        assert 0.0 <= float(row["image_auroc"]) <= 1.0 and row["pixel_auroc"] == "n/a"


def test_rerun_has_nothing_to_do(run: tuple[Path, Path]) -> None:
    result = snakemake("-n", "--cores", "1", "images", "--configfile", str(run[1]))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_users_folder_keeps_images_oct_band(run: tuple[Path, Path], tmp_path: Path) -> None:
    # The demo's flattening is for the demo B-scans only: any other folder gets images.oct_band (none).
    demo = ImageOutputs(run[0] / "images").demo
    result = snakemake("-n", "-p", "--cores", "1", "images", "--configfile", str(run[1]), "--config",
                       f"images_root={demo}", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    train = [line for line in result.stdout.splitlines() if "images-train" in line]
    assert train and all('"oct_band": "none"' in line for line in train)


def test_a_users_folder_with_awkward_names(run: tuple[Path, Path], tmp_path: Path) -> None:
    # The demo images as a user's folder whose path and file names hold spaces, quotes, non-ASCII letters
    # and shell syntax: read as they are, never by a shell. One method keeps it quick.
    root = tmp_path / AWKWARD / "category"
    shutil.copytree(ImageOutputs(run[0] / "images").demo, root)
    renamed = {"train/good/000.png": "train/good/normal scan 1.png",
               "test/fluid/000.png": "test/fluid/fluid scan 'A' ü.png",
               "ground_truth/fluid/000_mask.png": "ground_truth/fluid/fluid scan 'A' ü_mask.png"}
    for old, new in renamed.items():
        (root / old).rename(root / new)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    config = yaml.safe_load(run[1].read_text(encoding="utf-8"))
    config.update(output_dir=str(tmp_path / "out dir ü"), images_root=str(root), image_methods=["vae"])
    configfile = tmp_path / "folder.yaml"
    configfile.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    result = snakemake("--cores", "2", "images", "--configfile", str(configfile))
    assert result.returncode == 0, result.stderr[-4000:]
    out = ImageOutputs(tmp_path / "out dir ü" / "images")
    assert np.isfinite(np.load(out.maps("vae") / "fluid" / "fluid scan 'A' ü.npy")).all()
    assert (out.overlays("vae") / "fluid" / "fluid scan 'A' ü.png").stat().st_size > 0
    with open(out.image_scores, encoding="utf-8") as fh:
        stems = {r["stem"] for r in csv.DictReader(fh, delimiter="\t") if r["split"] == "test"}
    assert "fluid scan 'A' ü" in stems
    # The path reached the command intact, and every training image (the renamed one too) was read.
    metadata = load_image_model(out.model("conv-vae"))[1]
    assert metadata["root"] == str(root)
    n_train = len(list((root / "train" / "good").iterdir()))
    assert metadata["n_training_images"] + len(metadata["validation_images"]) == n_train
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (REPO / "PWNED").exists() and list(tmp_path.rglob("PWNED")) == []
