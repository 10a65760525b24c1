"""Detection baselines against the VAE maps of a finished anomri run (issue #4).

A script, not a test. On the run's own features and calibration it fits three
classical novelty detectors on exactly the pooled healthy voxels the VAE was
trained on (``<output_dir>/models/training_voxels.npz``), after the same
per-feature standardisation the VAE applies:

* kNN distance: mean Euclidean distance to the ``k`` nearest training voxels
  (scikit-learn ``NearestNeighbors``);
* IsolationForest: minus scikit-learn's ``score_samples``;
* PCA reconstruction error: squared distance to the principal subspace that
  keeps ``--pca-variance`` of the training variance;
* DTI (dipy ``TensorModel``, weighted least squares, shells up to
  ``--dti-max-b``) on each scan's source DWI: mean diffusivity (lesions raise
  it) and 1 - FA (lesions lower it), the dMRI analogue of the plain-FLAIR
  threshold that beat most unsupervised brain-MRI methods on MS (Meissen et
  al. 2021). No training: only the healthy null below sees controls.

Every patient's and every calibration control's brain voxels are scored. Each
map (a baseline's, or a VAE novelty map read from the run's NIfTI outputs) is
reported twice: raw, and as a calibrated lesion probability 1 - p built the way
``anomri calibrate`` / ``anomri probability`` build it: the post-processing of
the config's ``probability`` section (or ``--erosion-voxels``,
``--median-filter-voxels``, ``--smoothing-fwhm-mm``), then the tail
probability p among the calibration controls' post-processed voxels
(:class:`anomri.maps.probability.HealthyNull`, same tail fraction and tissue classes). The run's
own probability map (``label-L_probseg``) is read as well and, as a check, is
recomputed from its novelty maps with the config's scores and combination.

One table is printed: mean per-patient voxel AUROC, AUPRC and best Dice, each
computed over the brain mask as ``anomri evaluate`` does, and for probability
maps the Dice of the mask p <= 0.01 (the healthy-calibrated 1 % level). Deterministic for a
given ``--seed``.

Usage::

    python benchmarks/bench_detection.py                          # results/anomri, config.yaml
    python benchmarks/bench_detection.py --output-dir /tmp/heldout_out --bids-dir /tmp/heldout --knn-k 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import yaml
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomri.dmri.features import check_compatible  # noqa: E402
from anomri.dmri.gradients import load_gradient_table  # noqa: E402
from anomri.evaluate.metrics import auprc, auroc, best_dice  # noqa: E402
from anomri.demo.plan import planned_scans  # noqa: E402
from anomri.io.cohort import plan_from_config  # noqa: E402
from anomri.io.derivatives import ScanDerivatives  # noqa: E402
from anomri.io.nifti import load_mask, load_nifti, read_data  # noqa: E402
from anomri.io.voxels import read_feature_description  # noqa: E402
from anomri.maps.postprocess import PostProcessing  # noqa: E402
from anomri.maps.probability import HealthyNull  # noqa: E402
from anomri.maps.tissue import TissueModel  # noqa: E402
from anomri.maps.writing import masked_features  # noqa: E402
from anomri.scores import score_ids  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Voxels scored per call, bounding the kNN distance matrices.
CHUNK = 50_000
#: Healthy false-positive level of the lesion masks whose Dice is reported.
LEVEL = 0.01

Scorer = Callable[[np.ndarray], np.ndarray]


#: Floor of the features before a log (SH powers can be 0 at a lone voxel's neighbourhood std).
LOG_FLOOR = 1e-6
SCALINGS = ("standard", "log-standard")


def fit_baselines(train: np.ndarray, k: int, pca_variance: float, n_trees: int, seed: int,
                  scaling: str = "standard") -> dict[str, Scorer]:
    """Fit every baseline on scaled training voxels; return name -> scorer (higher = more novel).

    ``scaling`` is ``"standard"`` (each feature minus its training mean, over
    its training std: what the VAE sees) or ``"log-standard"`` (the same on
    log features: SH powers are positive and right-skewed over decades, and
    the log makes relative changes comparable across tissues).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; choose one of {SCALINGS}")

    def transform(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return np.log(np.maximum(x, LOG_FLOOR)) if scaling == "log-standard" else x

    # Standardising with the training mean and std, as the VAE does, keeps
    # any feature from dominating the distances by its scale alone.
    t = transform(train)
    mean, std = t.mean(0), np.where(t.std(0) > 0, t.std(0), 1.0)

    def standardise(x: np.ndarray) -> np.ndarray:
        return (transform(x) - mean) / std

    z = standardise(train)
    knn = NearestNeighbors(n_neighbors=k).fit(z)
    forest = IsolationForest(n_estimators=n_trees, random_state=seed).fit(z)
    pca = PCA(n_components=pca_variance, svd_solver="full").fit(z)

    def knn_score(x: np.ndarray) -> np.ndarray:
        return knn.kneighbors(standardise(x))[0].mean(1)

    def forest_score(x: np.ndarray) -> np.ndarray:
        return -forest.score_samples(standardise(x))

    def pca_score(x: np.ndarray) -> np.ndarray:
        zx = standardise(x)
        return ((zx - pca.inverse_transform(pca.transform(zx))) ** 2).sum(1)

    print(f"PCA keeps {pca.n_components_} of {train.shape[1]} components ({pca_variance:.0%} of the variance)")
    return {f"kNN (k={k}, {scaling})": knn_score, f"IsolationForest ({scaling})": forest_score,
            f"PCA ({pca.n_components_} comp., {scaling})": pca_score}


def score_volume(scorer: Scorer, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A scorer's map of one scan: float32, 0 outside ``mask``."""
    x = features[mask]
    values = np.concatenate([scorer(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])
    volume = np.zeros(mask.shape, np.float32)
    volume[mask] = values
    return volume


def dti_maps(dwi: Path, bval: Path, bvec: Path, mask: np.ndarray, max_b: float) -> dict[str, np.ndarray]:
    """Mean diffusivity and 1 - FA of a source scan (dipy WLS tensor fit, shells b <= ``max_b``)."""
    img = load_nifti(dwi, ndim=4)
    gtab = load_gradient_table(bval, bvec, img.shape[3])
    keep = gtab.bvals <= max_b
    data = read_data(img, dwi)[..., keep]
    shells = gradient_table(gtab.bvals[keep], bvecs=gtab.bvecs[keep], b0_threshold=gtab.b0_threshold)
    fit = TensorModel(shells, fit_method="WLS").fit(data, mask=mask)
    return {"DTI mean diffusivity": np.where(mask, fit.md, 0).astype(np.float32),
            "DTI 1 - FA": np.where(mask, 1.0 - fit.fa, 0).astype(np.float32)}


def patient_metrics(volume: np.ndarray, mask: np.ndarray, lesion: np.ndarray,
                    flagged: np.ndarray | None = None) -> tuple[float, float, float, float]:
    """AUROC, AUPRC, best Dice and (given a flagged mask) its Dice, over the brain (as ``anomri evaluate``)."""
    x, y = volume[mask], lesion[mask]
    dice = np.nan if flagged is None else 2 * (flagged & lesion).sum() / max(flagged.sum() + lesion.sum(), 1)
    return auroc(x, y), auprc(x, y), best_dice(x, y)[0], dice


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "config.yaml"), help="workflow config of the run")
    p.add_argument("--output-dir", help="finished anomri run (default: the config's output_dir)")
    p.add_argument("--bids-dir", help="its input dataset (default: from the run's dataset_description.json)")
    p.add_argument("--knn-k", type=int, default=5)
    p.add_argument("--pca-variance", type=float, default=0.95, help="training variance the PCA subspace keeps")
    p.add_argument("--n-trees", type=int, default=200, help="IsolationForest trees")
    p.add_argument("--scaling", choices=SCALINGS, default="standard", help="feature scaling of the baselines")
    p.add_argument("--dti-max-b", type=float, default=1500.0, help="highest b-value of the DTI fit, s/mm^2")
    p.add_argument("--erosion-voxels", type=int, help="default: the config's probability section")
    p.add_argument("--median-filter-voxels", type=int, help="default: the config's probability section")
    p.add_argument("--smoothing-fwhm-mm", type=float, help="default: the config's probability section")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    config = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.output_dir or config["output_dir"])
    if args.bids_dir:
        config["bids_dir"] = args.bids_dir
    else:
        source = json.loads((out / "dataset_description.json").read_text())["SourceDatasets"][0]["URL"]
        config["bids_dir"] = urlparse(source).path
        if Path(config["bids_dir"]) == (out / "sourcedata" / "demo").resolve():
            config["bids_dir"] = "demo"  # the demo's plan is built from its settings
    config["output_dir"] = str(out)
    plan = plan_from_config(config, planned_scans(config))

    with np.load(out / "models" / "training_voxels.npz") as pool:
        train, pooled_scans = pool["samples"], pool["scans"].tolist()
        description = json.loads(str(pool["description"]))
    # Noisier copies of the training controls are pooled as "<prefix> (noise-<level>)": the baselines train on them too.
    if [s for s in pooled_scans if " (" not in s] != [s.prefix for s in plan.training]:
        raise SystemExit(f"the run trained on {pooled_scans}, the config's split gives "
                         f"{[s.prefix for s in plan.training]}: pass the run's --config")
    prob = config["probability"]
    post = PostProcessing(*(prob[k] if getattr(args, k) is None else getattr(args, k)
                            for k in ("erosion_voxels", "median_filter_voxels", "smoothing_fwhm_mm")))
    first = ScanDerivatives(out, plan.calibration[0].prefix)
    vae_scores = [score for score in score_ids() if first.novelty(score).exists()]
    print(f"run {out}: {len(train)} training voxels x {train.shape[1]} features from {pooled_scans}; "
          f"calibration {[s.prefix for s in plan.calibration]}; patients {[s.prefix for s in plan.evaluable]}; "
          f"post-processing {post.record()}, tail fraction {prob['tail_fraction']}")

    t0 = time.perf_counter()
    scorers = fit_baselines(train, args.knn_k, args.pca_variance, args.n_trees, args.seed, args.scaling)
    print(f"fitted baselines in {time.perf_counter() - t0:.0f} s")

    def maps(scan: ScanDerivatives, source) -> tuple[dict[str, np.ndarray], np.ndarray, tuple]:
        """Every method's raw map of one scan, its brain mask and voxel size."""
        check_compatible(description, read_feature_description(scan.features), scan.features)
        img = load_nifti(scan.features, ndim=4)
        mask = load_mask(scan.mask, img, scan.features)
        features = read_data(img, scan.features)
        volumes = {name: score_volume(f, features, mask) for name, f in scorers.items()}
        volumes.update(dti_maps(source.dwi, source.bval, source.bvec, mask, args.dti_max_b))
        for score in vae_scores:
            volumes[f"VAE {score}"] = read_data(load_nifti(scan.novelty(score), ndim=3), scan.novelty(score))
        return volumes, mask, img.header.get_zooms()[:3]

    # The healthy null of every method, from the calibration controls' post-processed maps, with the
    # config's tissue classes (fitted to the calibration voxels' features, as `anomri calibrate` does).
    null_values: dict[str, list[np.ndarray]] = {}
    null_features = []
    for scan in plan.calibration:
        derivatives = ScanDerivatives(out, scan.prefix)
        volumes, mask, zooms = maps(derivatives, scan)
        for name, volume in volumes.items():
            processed, valid = post.apply(volume, mask, zooms)
            null_values.setdefault(name, []).append(processed[valid])
        null_features.append(masked_features(derivatives, valid))
    features = np.concatenate(null_features)
    # One tissue model for every method's null: they all list the same calibration voxels.
    tissue = {"features": features, "postprocessing": post, "tail_fraction": prob["tail_fraction"],
              "tissue": TissueModel.fit(features, prob["tissue_classes"], prob["seed"])
              if prob["tissue_classes"] > 1 else None}
    nulls = {k: HealthyNull.fit({k: np.concatenate(v)}, **tissue) for k, v in null_values.items()}
    # The run's lesion probability, recomputed: same scores and combination as the config.
    run_null = HealthyNull.fit({k: np.concatenate(null_values[f"VAE {k}"]) for k in prob["scores"]},
                               combination=prob["combination"], **tissue)

    def probability(null: HealthyNull, processed: dict[str, np.ndarray], valid: np.ndarray,
                    features: np.ndarray) -> np.ndarray:
        """1 - p inside the post-processed mask, 0 outside (as ``label-L_probseg``)."""
        volume = np.zeros(valid.shape, np.float32)
        volume[valid] = 1.0 - null.tail_probability({k: v[valid] for k, v in processed.items()}, features)
        return volume

    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    max_probseg_diff = 0.0
    for scan in plan.evaluable:
        derivatives = ScanDerivatives(out, scan.prefix)
        volumes, mask, zooms = maps(derivatives, scan)
        lesion = load_mask(scan.lesion_mask, load_nifti(derivatives.mask, ndim=3), derivatives.mask)
        processed = {}
        valid = post.apply(mask.astype(np.float32), mask, zooms)[1]
        features = masked_features(derivatives, valid)
        for name, volume in volumes.items():
            # Every map of a scan comes back with the same post-processed mask, ``valid``.
            processed[name], _ = post.apply(volume, mask, zooms)
            rows.setdefault((name, "raw score"), []).append(patient_metrics(volume, mask, lesion))
            calibrated = probability(nulls[name], {name: processed[name]}, valid, features)
            rows.setdefault((name, "probability"), []).append(
                patient_metrics(calibrated, mask, lesion, calibrated >= 1 - LEVEL))
        written = read_data(load_nifti(derivatives.probseg, ndim=3), derivatives.probseg)
        recomputed = probability(run_null, {k: processed[f"VAE {k}"] for k in prob["scores"]}, valid, features)
        max_probseg_diff = max(max_probseg_diff, float(np.abs(written - recomputed).max()))
        rows.setdefault(("VAE run's label-L_probseg", "+".join(prob["scores"])), []).append(
            patient_metrics(written, mask, lesion, written >= 1 - LEVEL))

    print(f"\n{len(plan.evaluable)} patients; max |run's label-L_probseg - recomputed| = {max_probseg_diff:.2g} "
          "(0 when the config matches the run)\n")
    print("| method | map | AUROC | AUPRC | best Dice | Dice at p <= 0.01 |\n|---|---|---|---|---|---|")
    for (name, kind), values in rows.items():
        a, p_, d, d1 = np.mean(values, axis=0)
        print(f"| {name} | {kind} | {a:.4f} | {p_:.3f} | {d:.3f} | {'' if np.isnan(d1) else f'{d1:.3f}'} |")


if __name__ == "__main__":
    main()
