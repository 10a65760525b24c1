"""Method fusion: components' maps calibrated on their normal validation maps, fused per pixel; the score
components' primary scores as z-scores, fused per image; errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomri.errors import InputError
from anomri.images.evaluation import read_scores
from anomri.images.map_fusion import FUSED_PRIMARY, fuse_method_maps
from anomri.images.outputs import SCORE_COLUMNS, ImageOutputs, map_path
from anomri.images.settings import FUSION_METHOD, ImageSettings
from anomri.io.tables import write_table

VAL = [("good", f"v{i}") for i in range(5)]
TEST = [("good", "t0"), ("good", "t1"), ("crack", "t2"), ("crack", "t3")]


def _method(out: ImageOutputs, method: str, scale: float, seed: int, primary: str = "map-max") -> dict:
    """A fake scored method: maps on its own scale, a primary score, a pixel threshold; returns what it wrote."""
    rng = np.random.default_rng(seed)
    maps, rows = {}, []
    for split, keys, where in (("val", VAL, out.validation_maps(method)), ("test", TEST, out.maps(method))):
        for label, stem in keys:
            pixel_map = (scale * rng.gamma(2.0, size=(6, 7))).astype(np.float32)
            if label == "crack":
                pixel_map[2:4, 2:5] += 5 * scale
            path = map_path(where, label, stem)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, pixel_map)
            maps[(split, label, stem)] = pixel_map
            rows.append({"method": method, "split": split, "label": label, "stem": stem, "score": primary,
                         "value": float(rng.normal(10 * scale, scale))})
    write_table(out.scores(method), rows, SCORE_COLUMNS)
    threshold = float(np.percentile(np.concatenate([m.ravel() for k, m in maps.items() if k[0] == "val"]), 99))
    out.thresholds(method).write_text(json.dumps({"method": method, "primary_score": primary,
                                                  "pixel_threshold": threshold}))
    return {"maps": maps, "threshold": threshold}


@pytest.mark.parametrize("rule", ["mean", "max"])
def test_fused_maps_scores_and_threshold_against_brute_force(tmp_path, rule: str) -> None:
    out = ImageOutputs(tmp_path)
    a = _method(out, "draem", 0.01, 0)
    b = _method(out, "patch-memory", 30.0, 1, primary="map-top")
    # A score-only component: its maps, on yet another scale, must not reach the fused map.
    _method(out, "vae-projection", 1e4, 2, primary="map-top")
    settings = ImageSettings(map_fusion_rule=rule, map_fusion_methods=["draem", "patch-memory"],
                             score_fusion_methods=["draem", "patch-memory", "vae-projection"])
    fuse_method_maps(tmp_path, settings)
    combine = np.mean if rule == "mean" else np.max
    fused = {}
    for split, keys, where in (("val", VAL, out.validation_maps(FUSION_METHOD)), ("test", TEST, out.maps(FUSION_METHOD))):
        for label, stem in keys:
            expected = combine([a["maps"][(split, label, stem)] / a["threshold"],
                                b["maps"][(split, label, stem)] / b["threshold"]], axis=0)
            got = np.load(map_path(where, label, stem))
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, expected, rtol=1e-5)
            fused[(split, label, stem)] = expected

    def z(method: str) -> dict:
        values = {(r["split"], r["label"], r["stem"]): r["value"] for r in read_scores(out.scores(method))}
        normal = np.array([values[("val", *k)] for k in VAL])
        return {k: (v - normal.mean()) / normal.std(ddof=1) for k, v in values.items()}

    za, zb, zc = z("draem"), z("patch-memory"), z("vae-projection")
    rows = read_scores(out.scores(FUSION_METHOD))
    assert {r["score"] for r in rows} == {FUSED_PRIMARY, "map-max"} and len(rows) == 2 * (len(VAL) + len(TEST))
    for r in rows:
        key = (r["split"], r["label"], r["stem"])
        expected = combine([za[key], zb[key], zc[key]]) if r["score"] == FUSED_PRIMARY else fused[key].max()
        assert r["value"] == pytest.approx(expected, rel=1e-6)
    record = json.loads(out.thresholds(FUSION_METHOD).read_text())
    normal_pixels = np.sort(np.concatenate([fused[("val", *k)].ravel() for k in VAL]))
    # The 99th-percentile threshold flags at most 1 % of the normal validation pixels, and only just.
    assert np.mean(normal_pixels >= record["pixel_threshold"]) <= 0.01
    assert np.mean(normal_pixels >= np.nextafter(record["pixel_threshold"], -np.inf)) > 0.0
    assert record["primary_score"] == FUSED_PRIMARY and record["rule"] == rule
    assert record["components"]["draem"]["pixel_threshold"] == pytest.approx(a["threshold"])
    assert record["map_components"] == ["draem", "patch-memory"]
    assert record["score_components"] == ["draem", "patch-memory", "vae-projection"]
    # The defect shows in the fused map though the two components' raw maps differ by 3000x in scale.
    crack = np.mean([fused[("test", *k)][2:4, 2:5].mean() for k in TEST if k[0] == "crack"])
    assert crack > 2 * np.mean([fused[("test", *k)].mean() for k in TEST if k[0] == "good"])


def test_a_missing_component_or_other_images_is_one_clear_error(tmp_path) -> None:
    out = ImageOutputs(tmp_path)
    _method(out, "draem", 1.0, 0)
    with pytest.raises(InputError, match="patch-memory") as error:
        fuse_method_maps(tmp_path, ImageSettings(map_fusion_methods=["draem", "patch-memory"]))
    assert "images-score" in str(error.value)
    _method(out, "patch-memory", 1.0, 1)
    with pytest.raises(InputError, match="vae-projection"):  # a score component is needed as much
        fuse_method_maps(tmp_path, ImageSettings(map_fusion_methods=["draem", "patch-memory"],
                                                 score_fusion_methods=["draem", "vae-projection"]))
    rows = [r for r in read_scores(out.scores("patch-memory")) if r["stem"] != "t3"]
    write_table(out.scores("patch-memory"), rows, SCORE_COLUMNS)
    with pytest.raises(InputError, match="other images"):
        fuse_method_maps(tmp_path, ImageSettings(map_fusion_methods=["draem", "patch-memory"],
                                                 score_fusion_methods=["draem", "patch-memory"]))
    assert not out.scores(FUSION_METHOD).exists()


@pytest.mark.parametrize("methods", [["draem"], ["draem", "draem"], ["draem", "fusion"], ["draem", "unknown"]])
def test_map_fusion_methods_are_checked(methods: list[str]) -> None:
    with pytest.raises(InputError, match="map_fusion_methods"):
        ImageSettings(map_fusion_methods=methods)


@pytest.mark.parametrize("methods", [[], ["draem", "draem"], ["fusion"], ["unknown"]])
def test_score_fusion_methods_are_checked(methods: list[str]) -> None:
    with pytest.raises(InputError, match="score_fusion_methods"):
        ImageSettings(score_fusion_methods=methods)
    # The map methods, then the score methods not among them.
    assert ImageSettings(map_fusion_methods=["vae-projection", "patch-memory"],
                         score_fusion_methods=["draem", "patch-memory"]).fused_methods == (
        "vae-projection", "patch-memory", "draem")
