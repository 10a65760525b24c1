"""One source of settings: config.yaml, the packaged defaults, the schema, the CLI flags and the Python API agree."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from anomri.cli import build_parser
from anomri.dmri.scan import preprocess_scan
from anomri.images.settings import ImageSettings
from anomri.maps.calibration import calibrate
from anomri.maps.novelty import NoveltyModel
from anomri.maps.postprocess import PostProcessing
from anomri.models.training import TrainingConfig
from anomri.settings import default, defaults

from conftest import REPO

#: Required arguments of each subcommand checked below.
REQUIRED = {
    "demo-cohort": ["out"],
    "preprocess": ["--dwi", "d", "--bval", "b", "--bvec", "v", "--output-dir", "o", "--prefix", "sub-1"],
    "pool": ["--derivatives-dir", "d", "--scans", "sub-1", "--out", "o"],
    "train": ["--pool", "p", "--out", "o", "--history", "h"],
    "reference": ["--derivatives-dir", "d", "--scans", "sub-1", "--model", "m", "--out", "o"],
    "score": ["--model", "m", "--derivatives-dir", "d", "--prefix", "sub-1"],
    "calibrate": ["--derivatives-dir", "d", "--scans", "sub-1", "--out", "o", "--scores", "s"],
    "learn-combination": ["--derivatives-dir", "d", "--calibration", "sub-1", "--scan", "sub-2", "l", "--out", "o",
                          "--scores", "s"],
    "probability": ["--derivatives-dir", "d", "--prefix", "sub-1", "--null", "n"],
    "quality": ["--derivatives-dir", "d", "--scans", "sub-1", "--out", "o"],
    "evaluate": ["--derivatives-dir", "d", "--scan", "sub-2", "l", "--scores", "s", "--calibration", "sub-1",
                 "--out", "o", "--summary", "s", "--curves", "c", "--healthy-out", "h"],
    "demo-images": ["out"],
    "images-train": ["--root", "r", "--model", "conv-vae", "--out", "o", "--history", "h"],
}

#: (subcommand, flag destination, config.yaml key) of every CLI flag that has a pipeline setting.
CLI_SETTINGS = [
    ("demo-cohort", "n_controls", "demo.n_controls"),
    ("demo-cohort", "n_patients", "demo.n_patients"),
    ("demo-cohort", "seed", "demo.seed"),
    *[("preprocess", dest, f"preprocessing.{key}") for dest, key in [
        ("b0_threshold", "b0_threshold"), ("denoise", "denoise"), ("features", "features"), ("context", "context"),
        ("context_radius", "context_radius"), ("gibbs_removal", "gibbs_removal"),
        ("motion_correction", "motion_correction")]],
    ("pool", "max_voxels_per_scan", "training.max_voxels_per_scan"),
    ("pool", "max_training_voxels", "training.max_training_voxels"),
    ("pool", "seed", "training.seed"),
    ("train", "device", "training.device"),
    ("reference", "size", "scoring.reference_size"),
    ("reference", "seed", "scoring.seed"),
    ("reference", "device", "scoring.device"),
    *[("score", dest, f"scoring.{dest}") for dest in ("n_samples", "seed", "batch_size", "device")],
    *[(command, key, f"probability.{key}") for command in ("calibrate", "learn-combination")
      for key in ("erosion_voxels", "median_filter_voxels", "smoothing_fwhm_mm", "centring", "tail_fraction",
                  "combination", "tissue_classes", "seed")],
    ("learn-combination", "C", "probability.learned_combination.C"),
    ("probability", "levels", "probability.levels"),
    ("probability", "min_component_voxels", "probability.min_component_voxels"),
    ("probability", "ood_margin", "probability.ood_margin"),
    ("quality", "levels", "probability.levels"),
    *[("evaluate", key, f"evaluation.{key}") for key in ("fpr", "bootstrap", "seed", "min_lesion_overlap")],
    ("evaluate", "levels", "probability.levels"),
    *[("demo-images", key, f"images.demo.{key}") for key in ("n_train", "n_test_good", "n_test_per_defect",
                                                               "height", "seed")],
    ("images-train", "device", "images.device"),
]


def config_yaml() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_packaged_defaults_are_config_yaml() -> None:
    """anomri/data/defaults.yaml ships config.yaml's values: change both together."""
    assert defaults() == config_yaml()


def test_schema_defaults_are_config_yaml() -> None:
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    found = []

    def walk(node: dict, values: dict, key: str) -> None:
        for name, sub in node.get("properties", {}).items():
            if "default" in sub:
                found.append(name)
                assert sub["default"] == values[name], f"{key}{name}"
            if isinstance(values.get(name), dict):
                walk(sub, values[name], f"{key}{name}.")

    walk(schema, config_yaml(), "")
    assert found  # the schema holds a few defaults (images_root, ...)


@pytest.mark.parametrize(("command", "dest", "key"), CLI_SETTINGS)
def test_cli_flag_defaults_are_the_config(command: str, dest: str, key: str) -> None:
    args = build_parser().parse_args([command, *REQUIRED[command]])
    assert getattr(args, dest) == default(key)


def test_training_config_defaults_are_the_config() -> None:
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    training = default("training")
    assert dataclasses.asdict(TrainingConfig()) == {k: training[k] for k in fields}
    # train --settings '{}' trains with exactly these.
    assert build_parser().parse_args(["train", *REQUIRED["train"]]).settings == "{}"


def test_image_settings_defaults_are_the_config() -> None:
    images = default("images")
    shared = {f.name for f in dataclasses.fields(ImageSettings)} & set(images)
    assert len(shared) > 40
    assert {k: getattr(ImageSettings(), k) for k in shared} == {k: images[k] for k in shared}


def keyword_defaults(func) -> dict:
    return {k: p.default for k, p in inspect.signature(func).parameters.items() if p.default is not p.empty}


def test_python_api_defaults_are_the_config() -> None:
    pre, prob, scoring = default("preprocessing"), default("probability"), default("scoring")
    scan = keyword_defaults(preprocess_scan)
    assert {k: scan[k] for k in ("b0_threshold", "context", "context_radius", "motion_correction")} == {
        k: pre[k] for k in ("b0_threshold", "context", "context_radius", "motion_correction")}
    assert (scan["denoising"], scan["representation"], scan["gibbs"]) == (
        pre["denoise"], pre["features"], pre["gibbs_removal"])
    assert dataclasses.asdict(PostProcessing()) == {
        k: prob[k] for k in ("erosion_voxels", "median_filter_voxels", "smoothing_fwhm_mm", "centring")}
    cal = keyword_defaults(calibrate)
    assert {k: cal[k] for k in ("tail_fraction", "combination", "tissue_classes", "seed")} == {
        k: prob[k] for k in ("tail_fraction", "combination", "tissue_classes", "seed")}
    novelty = keyword_defaults(NoveltyModel.__init__)
    assert {k: novelty[k] for k in ("n_samples", "seed", "batch_size")} == {
        k: scoring[k] for k in ("n_samples", "seed", "batch_size")}


def test_default_returns_a_copy() -> None:
    default("training.hidden_channels").append(1)
    assert default("training.hidden_channels") == config_yaml()["training"]["hidden_channels"]
