"""Detection baselines against the VAE maps of a finished anomri run, cross-fitted like the workflow (issue 25).

A script, not a test. On the run's own features, folds and calibration it scores every control and patient with:

* plain, training-free maps: DTI (dipy ``TensorModel``, weighted least squares, shells up to ``--dti-max-b``)
  mean diffusivity (lesions raise it) and 1 - FA (lesions lower it), the dMRI analogue of the plain-FLAIR
  threshold that beat most unsupervised brain-MRI methods on MS (Meissen et al. 2021); and the lowest-order
  rotation-invariant (RISH) feature of every shell, -log P_0 (lesions' freer water lowers the mean signal),
  each shell alone and all shells Fisher-combined;
* three classical novelty detectors fitted, per cross-fitting fold, on exactly the pooled healthy voxels that
  fold's VAE trained on (``<output_dir>/models/fold-<k>/training_voxels.npz``), after the same per-feature
  standardisation the VAE applies: kNN distance (scikit-learn ``NearestNeighbors``), IsolationForest (minus
  ``score_samples``) and PCA reconstruction error (``--pca-variance`` of the training variance kept);
* the run's own VAE novelty maps (a control's out-of-fold map; a patient's per fold model, where written).

As in the workflow, a control is scored by the fold that never trained on it and a patient by every fold. Each
map is reported raw (patients only; the mean over folds) and as a calibrated lesion probability built the way
``anomri calibrate`` / ``anomri probability`` build it: the post-processing of the config's ``probability``
section (or ``--erosion-voxels``, ``--median-filter-voxels``, ``--smoothing-fwhm-mm``), then the tail
probability p among every control's post-processed out-of-fold voxels, per tissue class; a patient's p is the
mean of its fold models' p, a control's p comes from the null of the *other* controls. These nulls are not
noise-matched; the run's own map (``label-L_probseg``, noise-matched) is read as well.

One table is printed: mean per-patient voxel AUROC, AUPRC and best Dice, computed over the brain mask as
``anomri evaluate`` does, and for probability maps the Dice of the mask p <= 0.01 and the controls' out-of-fold
flagged fraction at p <= 0.01 (mean and worst). Deterministic for a given ``--seed``.

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
from anomri.maps.probability import CalibrationCopy, HealthyNull  # noqa: E402
from anomri.maps.tissue import TissueModel  # noqa: E402
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


def rish0_maps(features: np.ndarray, names: list[str], mask: np.ndarray) -> dict[str, np.ndarray]:
    """The lowest-order rotation-invariant feature of every shell, as a novelty map: -log of its SH power P_0.

    P_0 = 4 pi mean(S/S0)^2 on the shell: a lesion's freer water lowers the mean signal, so -log P_0 rises
    (2 b times the shell's apparent diffusivity, up to a constant). No training: a plain baseline.
    """
    return {f"RISH-0 {name.split('_')[0]}": np.where(mask, -np.log(np.maximum(features[..., k], LOG_FLOOR)), 0)
            .astype(np.float32) for k, name in enumerate(names) if name.endswith("_l0")}


class CrossFitted:
    """Every method's maps of every scan, the way the workflow scores a cohort (cross-fitting, anomri.io.cohort):
    a control's from the fold model that never trained on it, anyone else's from every fold model; training-free
    maps are the same for every fold."""

    def __init__(self, out: Path, plan, args, description: dict) -> None:
        self.out, self.plan, self.args, self.description = out, plan, args, description
        self.fold_scorers = []
        for k in range(len(plan.folds)):
            with np.load(out / "models" / f"fold-{k + 1}" / "training_voxels.npz") as pool:
                train = pool["samples"]
            t0 = time.perf_counter()
            self.fold_scorers.append(fit_baselines(train, args.knn_k, args.pca_variance, args.n_trees, args.seed,
                                                   args.scaling))
            print(f"fold {k + 1}: fitted baselines on {len(train)} voxels in {time.perf_counter() - t0:.0f} s")
        self.vae_scores = [k for k in score_ids()
                           if ScanDerivatives(out, plan.controls[0].prefix).novelty(k).exists()]

    def maps(self, scan) -> tuple[list[dict[str, np.ndarray]], np.ndarray, tuple, np.ndarray]:
        """Per fold model that never trained on ``scan``, every method's raw map; its brain mask, voxel size and
        features."""
        derivatives = ScanDerivatives(self.out, scan.prefix)
        check_compatible(self.description, read_feature_description(derivatives.features), derivatives.features)
        img = load_nifti(derivatives.features, ndim=4)
        mask = load_mask(derivatives.mask, img, derivatives.features)
        features = read_data(img, derivatives.features)
        fixed = dti_maps(scan.dwi, scan.bval, scan.bvec, mask, self.args.dti_max_b)
        fixed |= rish0_maps(features, self.description["FeatureNames"], mask)
        fold = self.plan.fold_of(scan)
        folds = [fold] if fold is not None else range(len(self.plan.folds))
        per_fold = []
        for k in folds:
            volumes = dict(fixed) | {name: score_volume(f, features, mask)
                                     for name, f in self.fold_scorers[k].items()}
            # The run's VAE maps: a control's own (out of fold); anyone else's per fold model where the run wrote
            # them (the probability scores), else the mean over the fold models that the run wrote beside the scan.
            for score in self.vae_scores:
                path = ScanDerivatives(self.out / "models" / f"fold-{k + 1}" / "maps", scan.prefix).novelty(score)
                if fold is not None or not path.exists():
                    path = derivatives.novelty(score)
                volumes[f"VAE {score}"] = read_data(load_nifti(path, ndim=3), path)
            per_fold.append(volumes)
        return per_fold, mask, img.header.get_zooms()[:3], features


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
    for k in range(len(plan.folds)):
        with np.load(out / "models" / f"fold-{k + 1}" / "training_voxels.npz") as pool:
            pooled = {s for s in pool["scans"].tolist() if " (" not in s}
            description = json.loads(str(pool["description"]))
        if pooled != {s.prefix for s in plan.training(k)}:
            raise SystemExit(f"fold {k + 1} trained on {sorted(pooled)}, the config's folds give "
                             f"{[s.prefix for s in plan.training(k)]}: pass the run's --config")
    prob = config["probability"]
    post = PostProcessing(*(prob[k] if getattr(args, k) is None else getattr(args, k)
                            for k in ("erosion_voxels", "median_filter_voxels", "smoothing_fwhm_mm")),
                          prob.get("centring", "none"))
    print(f"run {out}: {len(plan.folds)} folds; controls {[s.prefix for s in plan.controls]}; patients "
          f"{[s.prefix for s in plan.evaluable]}; post-processing {post.record()}, tail fraction {prob['tail_fraction']}")
    methods = CrossFitted(out, plan, args, description)

    # The healthy null of every method: every control's out-of-fold post-processed map, with the config's tissue
    # classes (fitted to the controls' features, as `anomri calibrate` does); no noise matching.
    null_values: dict[str, list[np.ndarray]] = {}
    null_features, copies, index = [], [], []
    for scan in plan.controls:
        (volumes,), mask, zooms, features = methods.maps(scan)
        for name, volume in volumes.items():
            processed, valid = post.apply(volume, mask, zooms)
            null_values.setdefault(name, []).append(processed[valid])
        null_features.append(features[valid])
        index.append(np.full(int(valid.sum()), len(copies)))
        copies.append(CalibrationCopy(scan.prefix, 1.0, None))
    features = np.concatenate(null_features)
    tissue = {"postprocessing": post, "tail_fraction": prob["tail_fraction"], "copies": copies,
              "copy_index": np.concatenate(index), "scans": [s.prefix for s in plan.controls],
              "tissue": TissueModel.fit(features, prob["tissue_classes"], prob["seed"])
              if prob["tissue_classes"] > 1 else None}
    nulls = {k: HealthyNull.fit({k: np.concatenate(v)}, features, **tissue) for k, v in null_values.items()}
    rish = [k for k in null_values if k.startswith("RISH-0")]
    nulls["RISH-0, every shell (Fisher)"] = HealthyNull.fit({k: np.concatenate(null_values[k]) for k in rish},
                                                            features, combination="fisher", **tissue)

    def log_p(name: str, per_fold: list[dict], mask, zooms, features_of, left_out: list[str]) -> tuple:
        """log p of one method on one scan (the mean of the fold models' p) and the post-processed mask."""
        null = nulls[name].matched(None, left_out)
        scores = null.scores
        logs = []
        for volumes in per_fold:
            processed = {k: post.apply(volumes[k], mask, zooms) for k in scores}
            valid = processed[scores[0]][1]
            logs.append(null.log_tail_probability({k: v[valid] for k, (v, _) in processed.items()},
                                                  features_of[valid]))
        return np.logaddexp.reduce(logs, axis=0) - np.log(len(logs)), valid

    rows: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    healthy: dict[str, list[float]] = {}
    for scan in plan.controls + plan.evaluable:
        per_fold, mask, zooms, features = methods.maps(scan)
        control = scan.is_control
        lesion = None if control else load_mask(scan.lesion_mask, load_nifti(ScanDerivatives(out, scan.prefix).mask,
                                                                               ndim=3), scan.lesion_mask)
        for name in nulls:
            lp, valid = log_p(name, per_fold, mask, zooms, features, [scan.participant_id] if control else [])
            flagged = np.zeros(mask.shape, bool)
            flagged[valid] = lp <= np.log(LEVEL)
            if control:
                healthy.setdefault(name, []).append(float(flagged[valid].mean()))
                continue
            volume = np.zeros(mask.shape, np.float32)
            volume[valid] = -lp
            rows.setdefault((name, "probability"), []).append(patient_metrics(volume, mask, lesion, flagged))
            if name in per_fold[0]:
                raw = np.mean([v[name] for v in per_fold], axis=0)
                rows.setdefault((name, "raw score"), []).append(patient_metrics(raw, mask, lesion))
        if not control:
            written = ScanDerivatives(out, scan.prefix)
            evidence = read_data(load_nifti(written.neglog10p, ndim=3), written.neglog10p)
            flagged = np.asarray(load_nifti(written.lesion_mask(LEVEL), ndim=3).dataobj) > 0
            rows.setdefault(("VAE run's label-L_probseg", "+".join(prob["scores"])), []).append(
                patient_metrics(evidence, mask, lesion, flagged))

    print(f"\n{len(plan.evaluable)} patients, {len(plan.controls)} controls (their out-of-fold, leave-subject-out "
          f"flagged fraction at p <= {LEVEL})\n")
    print("| method | map | AUROC | AUPRC | best Dice | Dice at p <= 0.01 | controls flagged at p <= 0.01: mean, max |"
          "\n|---|---|---|---|---|---|---|")
    for (name, kind), values in sorted(rows.items(), key=lambda item: item[0][1] != "probability"):
        a, p_, d, d1 = np.mean(values, axis=0)
        fpr = healthy.get(name) if kind == "probability" else None
        print(f"| {name} | {kind} | {a:.4f} | {p_:.3f} | {d:.3f} | {'' if np.isnan(d1) else f'{d1:.3f}'} | "
              f"{'' if not fpr else f'{100 * np.mean(fpr):.2f} %, {100 * np.max(fpr):.2f} %'} |")


if __name__ == "__main__":
    main()
