"""Spatial context features against a brute-force loop over every voxel's neighbourhood."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CliResult, SyntheticScan

from anomri.dmri.context import add_context, neighbourhood_stats
from anomri.dmri.features import FeatureSet, check_compatible
from anomri.errors import InputError


def brute_force_stats(features: np.ndarray, mask: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over the in-mask voxels of each in-mask voxel's cube, by explicit loops."""
    mean, std = np.zeros(features.shape), np.zeros(features.shape)
    for x, y, z in zip(*np.nonzero(mask), strict=True):
        lo = np.maximum(np.array([x, y, z]) - radius, 0)
        cube = tuple(slice(a, b + radius + 1) for a, b in zip(lo, (x, y, z), strict=True))
        neighbours = features[cube][mask[cube]].astype(np.float64)
        mean[x, y, z], std[x, y, z] = neighbours.mean(0), neighbours.std(0)
    return mean, std


def random_volume(shape: tuple[int, ...], n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random features (with an offset, to exercise cancellation) and an irregular mask."""
    rng = np.random.default_rng(seed)
    features = (rng.normal(size=shape + (n_features,)) + 50.0).astype(np.float32)
    mask = rng.random(shape) < 0.6
    return features, mask


@pytest.mark.parametrize("radius", [1, 2])
def test_stats_match_brute_force(radius: int) -> None:
    features, mask = random_volume((9, 7, 6), 3, seed=radius)
    mean, std = neighbourhood_stats(features, mask, radius)
    ref_mean, ref_std = brute_force_stats(features, mask, radius)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(std, ref_std, rtol=1e-4, atol=1e-5)
    assert not mean[~mask].any() and not std[~mask].any()


def test_values_outside_the_mask_do_not_leak() -> None:
    features, mask = random_volume((8, 8, 5), 2, seed=3)
    mean, std = neighbourhood_stats(features, mask)
    changed = features.copy()
    changed[~mask] = np.random.default_rng(4).normal(1e3, 1e2, size=changed[~mask].shape)
    mean2, std2 = neighbourhood_stats(changed, mask)
    np.testing.assert_array_equal(mean2[mask], mean[mask])
    np.testing.assert_array_equal(std2[mask], std[mask])


def test_mask_corner_and_lone_voxel() -> None:
    # A 2x2x2 brain block in the corner of the field of view: each of its voxels
    # sees all 8 block voxels (and nothing beyond the field of view), so they share
    # the block's mean and std. A lone brain voxel elsewhere sees only itself.
    features = np.zeros((6, 6, 6, 1), np.float32)
    mask = np.zeros((6, 6, 6), bool)
    block = np.arange(8, dtype=np.float32).reshape(2, 2, 2) * 1.5
    features[:2, :2, :2, 0] = block
    mask[:2, :2, :2] = True
    features[4, 4, 4, 0] = 7.0
    mask[4, 4, 4] = True
    features[~mask] = 100.0  # background that must be ignored
    mean, std = neighbourhood_stats(features, mask)
    np.testing.assert_allclose(mean[:2, :2, :2, 0], block.mean(), rtol=1e-6)
    np.testing.assert_allclose(std[:2, :2, :2, 0], block.std(), rtol=1e-5)
    assert mean[4, 4, 4, 0] == pytest.approx(7.0)
    assert std[4, 4, 4, 0] == 0.0
    assert np.isfinite(mean).all() and np.isfinite(std).all()


def test_add_context_appends_named_statistics() -> None:
    features, mask = random_volume((6, 5, 4), 2, seed=5)
    base = FeatureSet(features, ["b1000_l0", "b1000_l2"], "sh-invariant", {"shells": ["b1000"]})
    assert add_context(base, mask, "none") is base
    ctx = add_context(base, mask, "stats", radius=1)
    mean, std = neighbourhood_stats(features, mask, 1)
    np.testing.assert_array_equal(ctx.data, np.concatenate([features, mean, std], -1))
    assert ctx.names == ["b1000_l0", "b1000_l2", "b1000_l0_nbmean", "b1000_l2_nbmean",
                         "b1000_l0_nbstd", "b1000_l2_nbstd"]
    assert ctx.description()["Context"] == {"Method": "stats", "Radius": 1}
    assert "Context" not in base.description()
    with pytest.raises(InputError, match="spatial context"):
        check_compatible(base.description(), ctx.description(), "scan.nii.gz")
    with pytest.raises(ValueError, match="unknown spatial context"):
        add_context(base, mask, "patch")


def test_preprocess_cli_writes_context_features(
    synthetic_scan: SyntheticScan, tmp_path: Path, run_cli: Callable[[list[str]], CliResult]
) -> None:
    plain_dir, ctx_dir = tmp_path / "plain", tmp_path / "ctx"
    assert run_cli(synthetic_scan.preprocess_argv(plain_dir)).code == 0
    assert run_cli(synthetic_scan.preprocess_argv(ctx_dir) + ["--context", "stats", "--context-radius", "1"]).code == 0
    stem = "sub-01/dwi/sub-01_space-dwi_desc-"
    plain = np.asarray(nib.load(plain_dir / f"{stem}qspace_features.nii.gz").dataobj)
    ctx = np.asarray(nib.load(ctx_dir / f"{stem}qspace_features.nii.gz").dataobj)
    mask = np.asarray(nib.load(ctx_dir / f"{stem}brain_mask.nii.gz").dataobj) > 0
    sidecar = json.loads((ctx_dir / f"{stem}qspace_features.json").read_text())
    names = json.loads((plain_dir / f"{stem}qspace_features.json").read_text())["FeatureNames"]
    mean, std = brute_force_stats(plain, mask, 1)
    np.testing.assert_array_equal(ctx[..., : plain.shape[-1]], plain)
    np.testing.assert_allclose(ctx[..., plain.shape[-1]:], np.concatenate([mean, std], -1), rtol=1e-5, atol=1e-6)
    assert sidecar["FeatureNames"] == names + [f"{n}_nbmean" for n in names] + [f"{n}_nbstd" for n in names]
    assert sidecar["Context"] == {"Method": "stats", "Radius": 1}


def test_preprocess_cli_refuses_a_radius_below_one(
    synthetic_scan: SyntheticScan, tmp_path: Path, run_cli: Callable[[list[str]], CliResult]
) -> None:
    result = run_cli(synthetic_scan.preprocess_argv(tmp_path / "out") + ["--context", "stats", "--context-radius", "0"])
    assert result.code == 2
    assert "--context-radius" in result.err
    assert not (tmp_path / "out").exists()
