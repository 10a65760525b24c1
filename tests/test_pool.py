"""The training pool: every scan's quota, the cap on the whole pool (training.max_training_voxels), its file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomri.cli import main
from anomri.dmri.features import pool_samples, training_quota
from anomri.errors import InputError
from anomri.io.derivatives import ScanDerivatives, sidecar_path
from anomri.settings import default

PREFIXES = ("sub-01", "sub-02", "sub-03")
#: In-mask voxels of each scan: unequal, so an equal share is not what the scans happen to hold.
IN_MASK = (40, 70, 100)
AUGMENTED = "noise-150"


def _write_scan(tree: Path, prefix: str, n_voxels: int, tree_id: int, scan_id: int) -> None:
    """Features (tree, scan, voxel number, 1) at the first ``n_voxels`` voxels of a 6x6x6 grid, in the mask."""
    scan = ScanDerivatives(tree, prefix)
    scan.dir.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(216, bool)
    mask[:n_voxels] = True
    features = np.zeros((216, 4), np.float32)
    features[mask] = np.c_[np.full(n_voxels, tree_id), np.full(n_voxels, scan_id), np.arange(n_voxels),
                           np.ones(n_voxels)]
    nib.save(nib.Nifti1Image(features.reshape(6, 6, 6, 4), np.eye(4)), scan.features)
    nib.save(nib.Nifti1Image(mask.reshape(6, 6, 6).astype(np.uint8), np.eye(4)), scan.mask)
    sidecar_path(scan.features).write_text(json.dumps({"Representation": "sh-invariant", "Scheme": {},
                                                       "FeatureNames": ["tree", "scan", "voxel", "one"]}))


@pytest.fixture
def derivatives(tmp_path: Path) -> Path:
    """Three scans in ``derivatives/`` and their noisier copies in ``augmented/noise-150``."""
    for tree_id, tree in enumerate((tmp_path / "derivatives", tmp_path / "augmented" / AUGMENTED)):
        for scan_id, (prefix, n) in enumerate(zip(PREFIXES, IN_MASK)):
            _write_scan(tree, prefix, n, tree_id, scan_id)
    return tmp_path


def _pool(root: Path, max_per_scan: int, cap: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    out = root / f"pool-{max_per_scan}-{cap}-{seed}.npz"
    cap_flag = [] if cap is None else ["--max-training-voxels", str(cap)]
    assert main(["pool", "--derivatives-dir", str(root / "derivatives"), "--scans", *PREFIXES, "--augmented",
                 str(root / "augmented" / AUGMENTED), "--out", str(out), "--max-voxels-per-scan", str(max_per_scan),
                 "--seed", str(seed), *cap_flag]) == 0
    with np.load(out) as pool:
        return dict(pool)


def _largest_equal_share(max_per_scan: int, n_scans: int, cap: int) -> int:
    """Brute force: the largest quota q <= max_per_scan with n_scans * q <= cap."""
    return max(q for q in range(max_per_scan + 1) if n_scans * q <= cap)


@pytest.mark.parametrize("cap", [50, 100, 181, 240, 299, 300, 10**6])
def test_capped_pool_is_an_equal_share_of_every_scan_within_the_cap(derivatives: Path, cap: int) -> None:
    pool = _pool(derivatives, max_per_scan=50, cap=cap)
    samples, index = pool["samples"], pool["scan_index"]
    n_scans = 2 * len(PREFIXES)
    quota = _largest_equal_share(50, n_scans, cap)
    expected = [min(quota, n) for _ in range(2) for n in IN_MASK]
    assert np.bincount(index, minlength=n_scans).tolist() == expected
    assert len(samples) <= cap
    # Every sample is an in-mask voxel of the scan it is filed under, none twice.
    tree, scan, voxel = samples[:, 0].astype(int), samples[:, 1].astype(int), samples[:, 2].astype(int)
    assert (tree * len(PREFIXES) + scan == index).all()
    assert (voxel < np.array(IN_MASK)[scan]).all()
    assert len({(t, s, v) for t, s, v in zip(tree, scan, voxel)}) == len(samples)
    assert pool["scans"].tolist() == [*PREFIXES, *[f"{p} ({AUGMENTED})" for p in PREFIXES]]


def test_pool_under_the_cap_is_the_uncapped_pool(derivatives: Path) -> None:
    """At or under the cap (6 scans x 50 = 300 voxels), the pool is the per-scan sub-sample it always was."""
    scans = [ScanDerivatives(derivatives / tree, p) for tree in ("derivatives", f"augmented/{AUGMENTED}")
             for p in PREFIXES]
    uncapped, index, _ = pool_samples([s.features for s in scans], [s.mask for s in scans], 50, seed=4)
    for cap in (300, None):  # None: the default cap, far above
        pool = _pool(derivatives, max_per_scan=50, cap=cap, seed=4)
        assert np.array_equal(pool["samples"], uncapped) and np.array_equal(pool["scan_index"], index)


@pytest.mark.parametrize(("max_per_scan", "n_scans", "cap"),
                         [(20000, 12, 10**6), (20000, 60, 10**6), (20000, 300, 10**6), (7, 3, 20), (7, 3, 21),
                          (1, 5, 5), (10, 1, 3)])
def test_quota_is_the_largest_equal_share_within_the_cap(max_per_scan: int, n_scans: int, cap: int) -> None:
    assert training_quota(max_per_scan, n_scans, cap) == _largest_equal_share(max_per_scan, n_scans, cap)


def test_default_demo_pool_is_not_capped() -> None:
    """4 training controls x 3 trees (the scans and 2 noisier copies) keep their 20000 voxels each."""
    per_scan, cap = default("training.max_voxels_per_scan"), default("training.max_training_voxels")
    assert 4 * 3 * per_scan <= cap
    assert training_quota(per_scan, 4 * 3, cap) == per_scan == 20000


def test_cap_below_one_voxel_per_scan_is_an_input_error() -> None:
    with pytest.raises(InputError, match="--max-training-voxels"):
        training_quota(10, 6, 5)
