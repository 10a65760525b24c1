"""The dMRI subcommands: preprocess, pool, train, reference, score, calibrate, learn-combination,
probability, quality, evaluate, the figures and the dataset description."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from anomri.cli.registry import command
from anomri.errors import InputError
from anomri.settings import default

logger = logging.getLogger("anomri")


@command("preprocess")
def run_preprocess(args: argparse.Namespace) -> None:
    from anomri.dmri.scan import preprocess_with_copies
    from anomri.io.derivatives import ScanDerivatives

    if args.context_radius < 1:
        raise InputError("--context-radius", f"must be positive; got {args.context_radius}")
    preprocess_with_copies(args.dwi, args.bval, args.bvec, ScanDerivatives(args.output_dir, args.prefix),
                           args.copies, args.copies_dir, mask=args.mask, lesion_mask=args.lesion_mask,
                           b0_threshold=args.b0_threshold, denoising=args.denoise, representation=args.features,
                           context=args.context, context_radius=args.context_radius,
                           harmonisation=args.harmonisation, gibbs=args.gibbs_removal,
                           motion_correction=args.motion_correction, noise_factor=args.noise_factor,
                           noise_seed=args.noise_seed, diffusivity_scale=args.diffusivity_scale,
                           anisotropy_scale=args.anisotropy_scale, source_dir=args.source_dir)


@command("pool")
def run_pool(args: argparse.Namespace) -> None:
    from anomri.dmri.features import pool_training_voxels

    pool_training_voxels(args.derivatives_dir, args.scans, args.out, augmented=args.augmented,
                         max_voxels_per_scan=args.max_voxels_per_scan, max_training_voxels=args.max_training_voxels,
                         seed=args.seed)


@command("train")
def run_train(args: argparse.Namespace) -> None:
    # `train --threads N` (kept for older scripts) sets the global --threads: main() applies it before this.
    from anomri.models.training import TrainingConfig, train_from_pool

    train_from_pool(args.pool, args.out, args.history, TrainingConfig(**json.loads(args.settings)), args.device)


@command("reference")
def run_reference(args: argparse.Namespace) -> None:
    from anomri.scores.reference import build_reference_set

    build_reference_set(args.model, args.derivatives_dir, args.scans, args.out, size=args.size, seed=args.seed,
                        device=args.device)


@command("score")
def run_score(args: argparse.Namespace) -> None:
    from anomri.maps.scoring import score_scan

    score_scan(args.model, args.derivatives_dir, args.prefix, args.scores, reference=args.reference,
               fold_maps=args.fold_maps, fold_scores=args.fold_scores, copies=args.copies,
               copy_scores=args.copy_scores, n_samples=args.n_samples, seed=args.seed, batch_size=args.batch_size,
               device=args.device)


def _postprocessing(args: argparse.Namespace):
    from anomri.maps.postprocess import PostProcessing

    if args.tissue_classes < 1:
        raise InputError("--tissue-classes", f"must be at least 1; got {args.tissue_classes}")
    return PostProcessing(args.erosion_voxels, args.median_filter_voxels, args.smoothing_fwhm_mm, args.centring)


@command("calibrate")
def run_calibrate(args: argparse.Namespace) -> None:
    from anomri.maps.calibration import calibrate

    calibrate(args.derivatives_dir, args.scans, args.scores, _postprocessing(args), tail_fraction=args.tail_fraction,
              combination=args.combination, tissue_classes=args.tissue_classes, seed=args.seed,
              unit=args.calibration_unit, augmented=args.augmented).save(args.out)


@command("learn-combination")
def run_learn_combination(args: argparse.Namespace) -> None:
    from anomri.evaluate.learned import cross_validate

    if args.C <= 0:
        raise InputError("--C", f"must be positive; got {args.C}")
    cross_validate(args.derivatives_dir, args.calibration, args.scan, args.scores, _postprocessing(args), C=args.C,
                   tissue_classes=args.tissue_classes, seed=args.seed, tail_fraction=args.tail_fraction,
                   combination=args.combination, apply=args.apply, out=args.out)


@command("probability")
def run_probability(args: argparse.Namespace) -> None:
    from anomri.io.derivatives import ScanDerivatives
    from anomri.maps.probability import HealthyNull
    from anomri.maps.writing import write_probability_map

    if not all(0.0 < level < 1.0 for level in args.levels):
        raise InputError("--levels", f"false-positive levels must lie in (0, 1); got {args.levels}")
    if args.ood_margin < 0:
        raise InputError("--ood-margin", f"must be >= 0; got {args.ood_margin}")
    write_probability_map(ScanDerivatives(args.derivatives_dir, args.prefix), HealthyNull.load(args.null),
                          args.null, tuple(args.levels), args.min_component_voxels, args.fold_maps, args.ood_margin)


@command("quality")
def run_quality(args: argparse.Namespace) -> None:
    from anomri.evaluate.quality import write_quality_table

    write_quality_table(args.derivatives_dir, args.scans, args.controls, args.levels, args.out)


@command("evaluate")
def run_evaluate(args: argparse.Namespace) -> None:
    from anomri.evaluate.cohort import write_evaluation

    if not 0.0 < args.fpr < 1.0:
        raise InputError("--fpr", f"must lie in (0, 1); got {args.fpr}")
    if args.bootstrap < 1:
        raise InputError("--bootstrap", f"must be positive; got {args.bootstrap}")
    if not 0.0 <= args.min_lesion_overlap <= 1.0:
        raise InputError("--min-lesion-overlap", f"must lie in [0, 1]; got {args.min_lesion_overlap}")
    write_evaluation(args.derivatives_dir, args.scan, args.scores, args.calibration, fpr=args.fpr,
                     bootstrap=args.bootstrap, seed=args.seed, min_lesion_overlap=args.min_lesion_overlap,
                     healthy_scans=args.healthy, levels=args.levels, out=args.out, summary=args.summary,
                     curves=args.curves, healthy_out=args.healthy_out)


@command("plot-curves")
def run_plot_curves(args: argparse.Namespace) -> None:
    from anomri.report.figures import FigurePaths, plot_curves

    written = plot_curves(args.curves, FigurePaths(Path(args.figures_dir)))
    logger.info("wrote %d ROC/PR figures", len(written))


@command("plot-overlay")
def run_plot_overlay(args: argparse.Namespace) -> None:
    from anomri.report.figures import plot_overlay

    if args.n_lesions < 1:
        raise InputError("--n-lesions", f"must be positive; got {args.n_lesions}")
    plot_overlay(args.derivatives_dir, args.prefix, args.lesion_mask, args.evaluation, args.out, args.n_lesions)


@command("plot-training")
def run_plot_training(args: argparse.Namespace) -> None:
    from anomri.report.figures import plot_training

    plot_training(args.history, args.out)


@command("dataset-description")
def run_dataset_description(args: argparse.Namespace) -> None:
    from anomri.io.derivatives import write_dataset_description
    from anomri.scores import get_scores

    write_dataset_description(args.derivatives_dir, args.source, get_scores(args.scores), args.levels, args.learned)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The parsers of the dMRI subcommands."""
    p = sub.add_parser("preprocess", help="validate and preprocess one scan")
    p.add_argument("--dwi", required=True)
    p.add_argument("--bval", required=True)
    p.add_argument("--bvec", required=True)
    p.add_argument("--output-dir", required=True, help="derivatives root")
    p.add_argument("--prefix", required=True, help="sub-<label>[_ses-<label>]")
    p.add_argument("--mask", help="provided brain mask (else median_otsu)")
    p.add_argument("--lesion-mask", help="lesion mask, checked against the DWI grid")
    p.add_argument("--b0-threshold", type=float, default=default("preprocessing.b0_threshold"))
    p.add_argument("--denoise", default=default("preprocessing.denoise"), choices=["none", "mppca", "patch2self"])
    p.add_argument("--features", default=default("preprocessing.features"), choices=["raw", "sh-invariant"],
                   help="feature representation")
    p.add_argument("--context", default=default("preprocessing.context"), choices=["none", "stats"],
                   help="spatial context: append the in-mask neighbourhood mean and std of every feature")
    p.add_argument("--context-radius", type=int, default=default("preprocessing.context_radius"),
                   help="neighbourhood half-width, voxels (1: 3x3x3)")
    p.add_argument("--harmonisation", default=default("preprocessing.harmonisation"), choices=["none", "median"],
                   help="per-subject harmonisation: divide every feature by its brain median")
    p.add_argument("--gibbs-removal", action=argparse.BooleanOptionalAction,
                   default=default("preprocessing.gibbs_removal"),
                   help="remove Gibbs ringing (dipy, slice by slice along the third axis)")
    p.add_argument("--motion-correction", action=argparse.BooleanOptionalAction,
                   default=default("preprocessing.motion_correction"),
                   help="register every volume to the mean b0 (dipy) and rotate the b-vectors")
    p.add_argument("--noise-factor", type=float, default=1.0,
                   help="first raise the scan's noise standard deviation this many times (training augmentation)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the added noise")
    p.add_argument("--diffusivity-scale", type=float, default=1.0,
                   help="scale every diffusivity of the scan, S/S0 -> (S/S0)^s (training augmentation)")
    p.add_argument("--anisotropy-scale", type=float, default=1.0,
                   help="scale the directional contrast of log S/S0 on every shell around its mean (augmentation)")
    p.add_argument("--copies", nargs="*", default=[], metavar="COPY",
                   help="then preprocess these copies of the scan, within its brain mask: noise-150 (noise std x 1.5), "
                        "diffusivity-92 (every diffusivity x 0.92), anisotropy-105 (training augmentation)")
    p.add_argument("--copies-dir", help="folder of the copies' derivatives trees (<copies-dir>/<copy>)")
    p.add_argument("--source-dir", help="the input BIDS dataset: sidecars name its files bids:raw:<path>")

    p = sub.add_parser("pool", help="pool healthy training voxels")
    _add_scans(p)
    p.add_argument("--augmented", nargs="*", default=[], metavar="DIR",
                   help="derivatives trees of noisier copies of the same scans (preprocess --noise-factor)")
    p.add_argument("--out", required=True, help=".npz file")
    p.add_argument("--max-voxels-per-scan", type=int, default=default("training.max_voxels_per_scan"))
    p.add_argument("--max-training-voxels", type=int, default=default("training.max_training_voxels"),
                   help="cap on the pool: above it each scan's quota is an equal share of it")
    p.add_argument("--seed", type=int, default=default("training.seed"))

    p = sub.add_parser("train", help="train the VAE on pooled healthy voxels")
    p.add_argument("--pool", required=True)
    p.add_argument("--out", required=True, help="model checkpoint (.pt)")
    p.add_argument("--history", required=True, help="training curve (.tsv)")
    p.add_argument("--settings", default="{}", help="JSON object of TrainingConfig fields (others: their defaults)")
    p.add_argument("--device", default=default("training.device"))
    # The global `anomri --threads N` does the same; SUPPRESS keeps its value when this one is left out.
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="the same as `anomri --threads N train` (kept for older scripts)")

    p = sub.add_parser("reference", help="build the healthy reference set of the reference-based scores")
    _add_scans(p)
    p.add_argument("--model", required=True)
    p.add_argument("--size", type=int, default=default("scoring.reference_size"),
                   help="reference samples, stratified across scans")
    p.add_argument("--seed", type=int, default=default("scoring.seed"))
    p.add_argument("--out", required=True, help=".pt file")
    p.add_argument("--device", default=default("scoring.device"))

    p = sub.add_parser("score", help="write the novelty maps of one scan")
    p.add_argument("--model", required=True, nargs="+",
                   help="model checkpoint that gives the scan its maps; then the other fold models that never trained "
                        "on it, which write only their maps of --fold-scores (into --fold-maps)")
    p.add_argument("--reference", nargs="+", help="reference set (.pt) of each model, needed by reference-based scores")
    p.add_argument("--fold-maps", nargs="*", default=[], metavar="DIR",
                   help="one derivatives tree per model: each model's own maps of --fold-scores are written there")
    p.add_argument("--fold-scores", nargs="*", default=[], metavar="SCORE", help="scores written per model")
    p.add_argument("--copies", nargs="*", default=[], metavar="DIR",
                   help="derivatives trees of copies of the scan (same prefix), scored with the first model")
    p.add_argument("--copy-scores", nargs="*", default=[], metavar="SCORE", help="scores written per copy")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--scores", nargs="+", default=["all"])
    p.add_argument("--n-samples", type=int, default=default("scoring.n_samples"), help="Monte Carlo samples")
    p.add_argument("--seed", type=int, default=default("scoring.seed"))
    p.add_argument("--batch-size", type=int, default=default("scoring.batch_size"))
    p.add_argument("--device", default=default("scoring.device"))

    p = sub.add_parser("calibrate", help="healthy null distributions from the controls' out-of-fold maps")
    _add_scans(p)
    p.add_argument("--out", required=True, help=".npz file")
    p.add_argument("--augmented", nargs="*", default=[], metavar="DIR",
                   help="derivative trees of the scans' noisier copies: each scan's null is then noise-matched")
    p.add_argument("--calibration-unit", choices=["voxel", "subject"], default=default("probability.calibration_unit"),
                   help="what p counts: the controls' voxels pooled, or the worst control's own voxels")
    _add_calibration_options(p)

    p = sub.add_parser("learn-combination",
                       help="opt-in: logistic combination of every score, learned on labelled patients (LOPO CV)")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--calibration", nargs="+", required=True, metavar="PREFIX", help="the controls")
    p.add_argument("--scan", nargs=2, action="append", required=True, metavar=("PREFIX", "LESION_MASK"),
                   help="a labelled patient (repeat; at least 2)")
    p.add_argument("--apply", nargs="*", default=[], metavar="PREFIX", help="other scans: all-patient model")
    p.add_argument("--C", type=float, default=default("probability.learned_combination.C"), help="inverse L2 penalty strength of the logistic model")
    p.add_argument("--out", required=True, help=".json file: models and cross-validated metrics")
    _add_calibration_options(p)

    p = sub.add_parser("probability", help="lesion probability map of one scan")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--null", required=True)
    p.add_argument("--levels", type=float, nargs="+", default=default("probability.levels"),
                   help="healthy false-positive rates of the lesion masks")
    p.add_argument("--min-component-voxels", type=int, default=default("probability.min_component_voxels"),
                   help="drop smaller lesion-mask components")
    p.add_argument("--fold-maps", nargs="*", default=[], metavar="DIR",
                   help="derivative trees of the fold models' maps of this scan: p is the mean of their p "
                        "(cross-conformal); none: the maps beside the scan (a control's out-of-fold maps)")
    p.add_argument("--ood-margin", type=float, default=default("probability.ood_margin"),
                   help="tolerance beyond the controls' out-of-fold shifts before a scan is out of distribution")

    p = sub.add_parser("quality", help="the cohort's quality table: SNR, flagged fraction and shift check per scan")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--scans", nargs="+", required=True, metavar="PREFIX", help="every scan with a probability map")
    p.add_argument("--controls", nargs="*", default=[], metavar="PREFIX", help="the control scans among them")
    p.add_argument("--levels", type=float, nargs="+", default=default("probability.levels"),
                   help="levels of the lesion masks whose flagged fraction is reported")
    p.add_argument("--out", required=True, help="quality.tsv (a .json sidecar is written beside it)")

    p = sub.add_parser("evaluate", help="score every map against lesion masks")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--scan", nargs=2, action="append", required=True, metavar=("PREFIX", "LESION_MASK"))
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--calibration", nargs="+", required=True, metavar="PREFIX",
                   help="the controls: their out-of-fold maps set each map kind's healthy-FPR threshold")
    p.add_argument("--fpr", type=float, default=default("evaluation.fpr"),
                   help="fraction of calibration brain voxels flagged")
    p.add_argument("--bootstrap", type=int, default=default("evaluation.bootstrap"),
                   help="bootstrap resamples of the cohort summary")
    p.add_argument("--seed", type=int, default=default("evaluation.seed"), help="seed of the bootstrap")
    p.add_argument("--min-lesion-overlap", type=float, default=default("evaluation.min_lesion_overlap"),
                   help="share of a lesion's voxels to flag for it to count as detected")
    p.add_argument("--healthy", nargs="*", default=[], metavar="PREFIX",
                   help="controls: their out-of-fold, leave-subject-out realised false-positive rate (patients "
                        "with empty masks join)")
    p.add_argument("--levels", type=float, nargs="+", default=default("probability.levels"),
                   help="levels of the lesion masks whose realised false-positive rate is reported")
    p.add_argument("--out", required=True, help="per-patient and pooled table (.tsv)")
    p.add_argument("--summary", required=True, help="cohort summary table (.tsv)")
    p.add_argument("--curves", required=True, help="ROC and PR points for the figures (.json)")
    p.add_argument("--healthy-out", required=True, help="realised false-positive rate of unseen healthy scans (.tsv)")

    p = sub.add_parser("plot-curves", help="ROC and PR curves of every map kind, from the evaluation")
    p.add_argument("--curves", required=True, help="evaluation_curves.json from evaluate")
    p.add_argument("--figures-dir", required=True, help="writes score-<id>_curves.png here")

    p = sub.add_parser("plot-overlay", help="lesion probability and lesion contour over the b0 of one patient")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--lesion-mask", required=True)
    p.add_argument("--evaluation", required=True, help="evaluation.tsv (the probability map's threshold)")
    p.add_argument("--n-lesions", type=int, default=2, help="slice through this many of the largest lesions")
    p.add_argument("--out", required=True, help=".png file")

    p = sub.add_parser("plot-training", help="training curves of the VAE")
    p.add_argument("--history", required=True, nargs="+",
                   help="training_history.tsv from train (several: the fold models', overlaid)")
    p.add_argument("--out", required=True, help=".png file")

    p = sub.add_parser("dataset-description",
                       help="write dataset_description.json, descriptions.tsv, .bidsignore and README.md")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--source", required=True, help="the input BIDS dataset")
    p.add_argument("--scores", nargs="+", default=[], help="the scores whose maps the run writes")
    p.add_argument("--levels", nargs="*", type=float, default=[], help="the false-positive levels of the lesion masks")
    p.add_argument("--learned", action="store_true", help="the run writes the learned lesion probability")


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    """Scores, post-processing and calibration settings shared by ``calibrate`` and ``learn-combination``."""
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--erosion-voxels", type=int, default=default("probability.erosion_voxels"),
                   help="brain-mask erosion before calibration")
    p.add_argument("--median-filter-voxels", type=int, default=default("probability.median_filter_voxels"),
                   help="side of an in-mask median filter (odd; 0 = off)")
    p.add_argument("--smoothing-fwhm-mm", type=float, default=default("probability.smoothing_fwhm_mm"),
                   help="Gaussian smoothing within the mask")
    p.add_argument("--centring", choices=["none", "median", "median-iqr"], default=default("probability.centring"),
                   help="subtract each scan's own median score (per-subject centring)")
    p.add_argument("--tail-fraction", type=float, default=default("probability.tail_fraction"),
                   help="fraction of the healthy null modelled by the generalised Pareto tail")
    p.add_argument("--combination", choices=["fisher", "tippett"], default=default("probability.combination"),
                   help="how several scores' tail probabilities combine")
    p.add_argument("--tissue-classes", type=int, default=default("probability.tissue_classes"),
                   help="calibrate each of K tissue classes (Gaussian mixture of log features) on its own; 1 = one null")
    p.add_argument("--seed", type=int, default=default("probability.seed"), help="seed of the tissue-class mixture")


def _add_scans(p: argparse.ArgumentParser) -> None:
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--scans", nargs="+", required=True, metavar="PREFIX")

