"""Calibration and lesion probability: empirical CDF, post-processing, false-positive control."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from anomri.io.derivatives import ScanDerivatives, sidecar_path
from anomri.io.nifti import save_volume
from anomri.maps.postprocess import FWHM_TO_SIGMA, PostProcessing
from anomri.maps.postprocess import masked_median
from anomri.maps.probability import HealthyNull, fisher_statistic
from anomri.maps.tails import TailModel
from anomri.maps.writing import remove_small_components, write_probability_map


def test_tail_probability_matches_brute_force_count_in_the_body(tmp_path) -> None:
    rng = np.random.default_rng(0)
    null = rng.normal(size=5000)
    null[:100] = 0.5  # ties
    model = HealthyNull({"s": null})
    tail = model.final
    scores = np.concatenate([rng.normal(size=300), [0.5, -10.0]])
    scores = scores[scores <= tail.threshold]
    expected = np.array([(1 + (null >= s).sum()) / (len(null) + 1) for s in scores])
    np.testing.assert_allclose(model.tail_probability({"s": scores}), expected, rtol=1e-12)
    path = tmp_path / "null.npz"
    model.save(path)
    np.testing.assert_allclose(HealthyNull.load(path).tail_probability({"s": scores}), expected, rtol=1e-6)


def test_pareto_tail_extrapolates_an_exponential_null() -> None:
    # Exp(1): P(X >= s) = exp(-s) exactly; the fitted tail must follow it far past the healthy maximum,
    # where an empirical CDF would give every score the same value.
    null = np.random.default_rng(3).exponential(size=200_000)
    tail = TailModel.fit(null)
    scores = np.array([null.max() + 1.0, 16.0, 20.0])
    p = tail.survival(scores)
    np.testing.assert_allclose(np.log(p), -scores, rtol=0.08)
    assert np.all(np.diff(p) < 0)


def test_a_bounded_tail_falls_back_to_the_exponential_and_never_reaches_zero() -> None:
    null = np.random.default_rng(4).uniform(size=50_000)  # generalised Pareto shape -1
    tail = TailModel.fit(null)
    assert tail.shape == 0.0
    log_p = tail.log_survival(np.array([1.5, 3.0, 10.0, 1e4]))
    assert np.all(np.isfinite(log_p)) and np.all(np.diff(log_p) < 0)


def test_quantile_inverts_the_tail_probability() -> None:
    tail = TailModel.fit(np.random.default_rng(5).gamma(2.0, size=100_000))
    for level in (0.2, 0.05, 0.01, 1e-3, 1e-6):
        threshold = tail.quantile(level)
        assert tail.survival(np.array([threshold]))[0] <= level * (1 + 1e-9)
        # ... and it is the smallest such score, up to one null step.
        assert tail.survival(np.array([threshold - 1e-3 * tail.scale]))[0] > level * 0.98


def test_healthy_voxels_flagged_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(1)
    calibration, new_healthy = rng.gamma(2.0, size=200_000), rng.gamma(2.0, size=200_000)
    p = HealthyNull({"s": calibration}).tail_probability({"s": new_healthy})
    for level in (0.01, 0.001):
        flagged = (p <= level).mean()
        # Binomial standard error on 200k voxels is ~2e-4 at 1 % and ~7e-5 at 0.1 %.
        assert abs(flagged - level) < 4 * np.sqrt(level * (1 - level) / len(new_healthy)) + 1e-4


def test_fisher_combination_of_correlated_scores_is_recalibrated() -> None:
    # Two strongly correlated healthy scores: the chi-squared law of Fisher's statistic would
    # flag far too many voxels; the recalibrated combination flags the nominal fraction.
    rng = np.random.default_rng(6)

    def healthy(n: int) -> dict[str, np.ndarray]:
        shared = rng.normal(size=n)
        return {"a": shared + 0.3 * rng.normal(size=n), "b": np.exp(shared + 0.3 * rng.normal(size=n))}

    null = HealthyNull(healthy(200_000))
    new = healthy(200_000)
    p = null.tail_probability(new)
    from scipy import stats
    naive = stats.chi2.sf(2 * fisher_statistic([null.classes[0].models[k].log_survival(v) for k, v in new.items()]), df=4)
    for level in (0.01, 0.001):
        assert abs((p <= level).mean() - level) < 4 * np.sqrt(level / len(p)) + 1e-4
    assert (naive <= 0.01).mean() > 0.015  # why the recalibration is needed


def test_masked_median_matches_a_loop_and_ignores_outside_values() -> None:
    rng = np.random.default_rng(7)
    mask = rng.random((9, 8, 7)) < 0.7
    volume = rng.normal(size=mask.shape).astype(np.float32)
    got = masked_median(volume, mask, 3)
    expected = []
    for x, y, z in zip(*np.nonzero(mask), strict=True):
        box = tuple(slice(max(c - 1, 0), c + 2) for c in (x, y, z))
        expected.append(np.median(volume[box][mask[box]]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    other = np.where(mask, volume, 1e6).astype(np.float32)
    np.testing.assert_array_equal(masked_median(other, mask, 3), got)


def test_small_components_are_removed_with_26_connectivity() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # diagonal neighbours: one component of 2
    mask[6:8, 6:8, 6:8] = True  # 8 voxels
    mask[0, 9, 0] = True  # single voxel
    out = remove_small_components(mask, 2)
    assert out[1, 1, 1] and out[2, 2, 2] and out[6:8, 6:8, 6:8].all() and not out[0, 9, 0]
    assert not remove_small_components(mask, 9).any()
    np.testing.assert_array_equal(remove_small_components(mask, 1), mask)


def test_postprocessing_round_trips_through_the_null_file(tmp_path) -> None:
    post = PostProcessing(erosion_voxels=2, median_filter_voxels=3, smoothing_fwhm_mm=5.0)
    path = tmp_path / "null.npz"
    HealthyNull({"a": np.arange(300.0)}, post).save(path)
    assert HealthyNull.load(path).postprocessing == post


def test_smoothing_never_leaks_across_the_mask() -> None:
    rng = np.random.default_rng(2)
    mask = np.zeros((20, 20, 20), bool)
    mask[4:16, 4:16, 4:16] = True
    volume = rng.normal(size=mask.shape).astype(np.float32)
    other = volume.copy()
    other[~mask] = 1e6  # whatever lies outside the brain must not matter
    post = PostProcessing(erosion_voxels=0, smoothing_fwhm_mm=4.0, centring="none")
    a, mask_a = post.apply(volume, mask, (2.0, 2.0, 2.0))
    b, _ = post.apply(other, mask, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(a, b)
    assert np.all(a[~mask_a] == 0)
    # Inside, it is the normalised convolution with sigma = FWHM / 2.355 / voxel size.
    sigma = 4.0 * FWHM_TO_SIGMA / 2.0
    masked = np.where(mask, volume, 0)
    expected = ndi.gaussian_filter(masked, sigma) / ndi.gaussian_filter(mask.astype(float), sigma)
    np.testing.assert_allclose(a[mask], expected[mask], rtol=1e-4, atol=1e-5)


def test_constant_map_stays_constant_after_smoothing() -> None:
    mask = np.zeros((15, 15, 15), bool)
    mask[3:12, 2:13, 5:10] = True
    volume = np.full(mask.shape, 7.0, np.float32)
    out, _ = PostProcessing(erosion_voxels=0, smoothing_fwhm_mm=6.0, centring="none").apply(volume, mask, (3.0, 3.0, 3.0))
    np.testing.assert_allclose(out[mask], 7.0, rtol=1e-5)


def test_erosion_peels_the_brain_edge() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True
    out, eroded = PostProcessing(erosion_voxels=1, centring="none").apply(np.ones(mask.shape), mask, (1.0, 1.0, 1.0))
    assert eroded.sum() == 4**3
    assert eroded[3:7, 3:7, 3:7].all()
    assert out[2, 4, 4] == 0 and out[4, 4, 4] == 1


def _scan_with_mask(root, mask: np.ndarray) -> tuple[ScanDerivatives, nib.Nifti1Image]:
    """sub-P01's derivatives folder under ``root`` holding only its brain mask (2 mm voxels), and the grid."""
    reference = nib.Nifti1Image(np.zeros(mask.shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    scan = ScanDerivatives(root, "sub-P01")
    scan.dir.mkdir(parents=True)
    save_volume(scan.mask, mask, reference, dtype=np.uint8)
    return scan, reference


def test_probability_map_and_lesion_masks_of_a_scan(tmp_path) -> None:
    rng = np.random.default_rng(8)
    mask = np.zeros((12, 12, 12), bool)
    mask[1:11, 1:11, 1:11] = True
    scan, reference = _scan_with_mask(tmp_path, mask)
    volume = rng.normal(size=mask.shape).astype(np.float32)
    volume[5:7, 5:7, 5:7] = 50.0  # an 8-voxel lesion far above the healthy null
    volume[1:4, 1:4, 1:4] = 0.0
    volume[2, 2, 2] = 50.0  # and an isolated voxel
    save_volume(scan.novelty("s"), np.where(mask, volume, 0), reference)
    null = HealthyNull({"s": rng.normal(size=20_000)}, PostProcessing(0, 0, 0.0, "none"))
    null_path = tmp_path / "null.npz"
    null.save(null_path)

    write_probability_map(scan, HealthyNull.load(null_path), null_path, levels=(0.01,), min_component_voxels=2)
    prob = np.asarray(nib.load(scan.probseg).dataobj)
    p = null.tail_probability({"s": volume[mask]})
    np.testing.assert_allclose(prob[mask], (1 - p).astype(np.float32))
    assert np.all(prob[~mask] == 0)
    lesions = np.asarray(nib.load(scan.lesion_mask(0.01)).dataobj)
    assert lesions.dtype == np.uint8 and scan.lesion_mask(0.01).name.endswith("label-L_desc-p01_mask.nii.gz")
    expected = np.zeros(mask.shape, bool)
    expected[mask] = p <= 0.01
    expected = remove_small_components(expected, 2)
    np.testing.assert_array_equal(lesions > 0, expected)
    assert lesions[5:7, 5:7, 5:7].all() and not lesions[2, 2, 2]
    sidecar = json.loads(sidecar_path(scan.lesion_mask(0.01)).read_text())
    assert abs(null.final.survival(np.array([sidecar["Threshold"]]))[0] - 0.01) < 1e-3


def test_noise_matched_null_takes_each_controls_copy_nearest_the_scans_snr() -> None:
    """Two controls, each measured and copied at 1.5x / 2x the noise; healthy scores scale with the noise.

    Scores of a copy at noise level f are f x Exp(1). A scan at SNR s is healthy with scores
    (30 / s) x Exp(1): against the quiet controls it would be flagged wholesale, against the
    matched copies at the nominal rate.
    """
    from anomri.maps.probability import CalibrationCopy

    rng = np.random.default_rng(12)
    n, snr0 = 40_000, 30.0
    copies, values, index = [], [], []
    for scan in ("sub-C01", "sub-C02"):
        for factor in (1.0, 1.5, 2.0):
            index.append(np.full(n, len(copies)))
            copies.append(CalibrationCopy(scan, factor, snr0 / factor))
            values.append(factor * rng.exponential(size=n))
    null = HealthyNull({"s": np.concatenate(values)}, copies=copies, copy_index=np.concatenate(index))
    for snr, factor in ((30.0, 1.0), (19.0, 1.5), (14.0, 2.0), (None, 1.0), (60.0, 1.0)):
        matched = null.matched(snr)
        assert [(c.scan, c.factor) for c in matched.copies] == [("sub-C01", factor), ("sub-C02", factor)]
        assert len(matched.values["s"]) == 2 * n
        # A healthy scan at the matched noise level is flagged at the nominal 1 %.
        p = matched.tail_probability({"s": factor * rng.exponential(size=200_000)})
        assert abs((p <= 0.01).mean() - 0.01) < 0.002
    # Unmatched, the noisiest scan meets the quiet controls' null: flagged far beyond the level.
    p = null.matched(None).tail_probability({"s": 2.0 * rng.exponential(size=200_000)})
    assert (p <= 0.01).mean() > 0.08


def test_noise_matched_null_round_trips_through_its_file(tmp_path) -> None:
    from anomri.maps.probability import CalibrationCopy

    rng = np.random.default_rng(13)
    copies = [CalibrationCopy("sub-C01", 1.0, 25.0), CalibrationCopy("sub-C01", 2.0, 12.5),
              CalibrationCopy("sub-C02", 1.0, None)]
    null = HealthyNull({"s": rng.normal(size=3000)}, copies=copies, copy_index=np.repeat([0, 1, 2], 1000))
    null.save(tmp_path / "null.npz")
    loaded = HealthyNull.load(tmp_path / "null.npz")
    assert loaded.copies == copies
    np.testing.assert_array_equal(loaded.copy_index, null.copy_index)
    # sub-C02's SNR is unknown: it always contributes itself as measured.
    assert [(c.scan, c.factor) for c in loaded.matched(12.0).copies] == [("sub-C01", 2.0), ("sub-C02", 1.0)]
    np.testing.assert_array_equal(loaded.matched(12.0).values["s"], null.values["s"][1000:])


def test_leaving_a_participant_out_drops_all_its_scans_and_copies(tmp_path) -> None:
    from anomri.maps.probability import CalibrationCopy

    rng = np.random.default_rng(14)
    copies = [CalibrationCopy("sub-C01_ses-1", 1.0, 20.0), CalibrationCopy("sub-C01_ses-2", 1.0, 22.0),
              CalibrationCopy("sub-C01_ses-1", 2.0, 10.0), CalibrationCopy("sub-C02", 1.0, 21.0),
              CalibrationCopy("sub-C02", 2.0, 10.5)]
    values = rng.normal(size=5 * 1000)
    null = HealthyNull({"s": values}, copies=copies, copy_index=np.repeat(np.arange(5), 1000),
                       scans=["sub-C01_ses-1", "sub-C01_ses-2", "sub-C02"])
    left = null.matched(20.0, exclude=["sub-C01"])
    assert [(c.scan, c.factor) for c in left.copies] == [("sub-C02", 1.0)]
    assert left.scans == ["sub-C02"]
    np.testing.assert_array_equal(left.values["s"], values[3000:4000].astype(np.float32))
    # The p of a new voxel against the left-out null is the brute-force conformal count among sub-C02's voxels.
    scores = np.array([-1.0, 0.0, 0.5])
    expected = [(1 + (left.values["s"] >= s).sum()) / (1000 + 1) for s in scores]
    np.testing.assert_allclose(left.tail_probability({"s": scores}), expected, rtol=1e-9)
    with pytest.raises(ValueError, match="no calibration scan is left"):
        null.matched(20.0, exclude=["sub-C01", "sub-C02"])
    with pytest.raises(ValueError, match="cannot leave one out"):
        HealthyNull({"s": values}).matched(None, exclude=["sub-C01"])


def test_a_tied_tail_falls_back_to_a_scale_from_the_null_itself() -> None:
    """The top 1 % all tie: the exponential tail continues the body, in the null's units (not a fixed 1.0)."""
    for unit in (1e-3, 1.0, 1e3):
        null = unit * np.concatenate([np.random.default_rng(15).uniform(0, 1, 9_000), np.full(1_000, 1.0)])
        tail = TailModel.fit(null)
        assert tail.shape == 0.0
        # An exponential through the median (survival 1/2) and the tied top (survival k/n): its scale is
        # (top - median) / log(n / 2k).
        n, k = len(null), max(50, round(0.01 * len(null)))
        beta = (1.0 - np.median(null) / unit) / np.log(n / (2 * k))
        np.testing.assert_allclose(tail.scale, unit * beta, rtol=1e-3)
        # p keeps falling beyond the healthy maximum, at the same pace in every unit.
        log_p = tail.log_survival(unit * np.array([1.1, 1.5]))
        np.testing.assert_allclose(np.diff(log_p), -0.4 / beta, rtol=1e-3)


def test_cross_conformal_probability_is_the_mean_of_the_fold_models_p(tmp_path) -> None:
    """A patient scored by three fold models: p is the mean of the three p-values, each against the pooled null."""
    rng = np.random.default_rng(16)
    mask = np.ones((8, 8, 8), bool)
    scan, reference = _scan_with_mask(tmp_path, mask)
    folds = [tmp_path / "models" / f"fold-{k}" / "maps" for k in (1, 2, 3)]
    fold_maps = [rng.normal(loc=k, size=mask.shape).astype(np.float32) for k in range(3)]
    for tree, volume in zip(folds, fold_maps):
        target = ScanDerivatives(tree, "sub-P01")
        target.dir.mkdir(parents=True)
        save_volume(target.novelty("s"), volume, reference)
    null = HealthyNull({"s": rng.normal(size=20_000)}, PostProcessing(0, 0, 0.0, "none"))
    null_path = tmp_path / "null.npz"
    null.save(null_path)
    write_probability_map(scan, HealthyNull.load(null_path), null_path, levels=(0.01,), fold_maps=folds)
    expected = np.mean([null.tail_probability({"s": v.ravel()}) for v in fold_maps], axis=0)
    evidence = np.asarray(nib.load(scan.neglog10p).dataobj, np.float64).ravel()
    np.testing.assert_allclose(10.0 ** -evidence, expected, rtol=1e-4)
    record = json.loads(sidecar_path(scan.probseg).read_text())
    assert len(record["Calibration"]["FoldMaps"]) == 3 and record["Calibration"]["LeftOut"] == []
    assert record["QualityCheck"]["Verdict"] == "unknown"  # a null without controls' shifts: nothing to compare


def test_centring_subtracts_the_scans_own_median_after_smoothing() -> None:
    rng = np.random.default_rng(17)
    mask = np.zeros((12, 12, 12), bool)
    mask[2:10, 2:10, 2:10] = True
    volume = 3.0 + rng.normal(size=mask.shape)
    plain, valid = PostProcessing(1, 0, 4.0, "none").apply(volume, mask, (2.0, 2.0, 2.0))
    centred, same = PostProcessing(1, 0, 4.0, "median").apply(volume, mask, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(valid, same)
    np.testing.assert_allclose(centred[valid], plain[valid] - np.median(plain[valid]), rtol=1e-5, atol=1e-6)
    assert np.all(centred[~valid] == 0)
    with pytest.raises(ValueError, match="centring"):
        PostProcessing(centring="mean")
