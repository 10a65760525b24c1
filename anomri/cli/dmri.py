"""The dMRI subcommands: preprocess, pool, train, reference, score, calibrate, learn-combination,
probability, evaluate, the figures and the dataset description."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from anomri import __version__
from anomri.cli.registry import command
from anomri.errors import InputError
from anomri.settings import default

logger = logging.getLogger("anomri")


@command("preprocess")
def run_preprocess(args: argparse.Namespace) -> None:
    from anomri.dmri.scan import preprocess_scan
    from anomri.io.derivatives import ScanDerivatives

    if args.context_radius < 1:
        raise InputError("--context-radius", f"must be positive; got {args.context_radius}")
    preprocess_scan(args.dwi, args.bval, args.bvec, ScanDerivatives(args.output_dir, args.prefix),
                    mask=args.mask, lesion_mask=args.lesion_mask, b0_threshold=args.b0_threshold,
                    denoising=args.denoise, representation=args.features, context=args.context,
                    context_radius=args.context_radius, gibbs=args.gibbs_removal,
                    motion_correction=args.motion_correction, noise_factor=args.noise_factor,
                    noise_seed=args.noise_seed)


@command("pool")
def run_pool(args: argparse.Namespace) -> None:
    from anomri.dmri.features import pool_samples
    from anomri.io.atomic import atomic_path
    from anomri.io.derivatives import ScanDerivatives

    # Every scan, then every noisier copy of every scan (one derivatives tree per noise level).
    trees = [args.derivatives_dir, *args.augmented]
    scans = [ScanDerivatives(tree, p) for tree in trees for p in args.scans]
    samples, index, description = pool_samples([s.features for s in scans], [s.mask for s in scans],
                                               args.max_voxels_per_scan, args.seed)
    names = [p if tree == args.derivatives_dir else f"{p} ({Path(tree).name})" for tree in trees for p in args.scans]
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, samples=samples, scan_index=index, scans=np.array(names), description=json.dumps(description))
    logger.info("pooled %d voxels of %d features from %d scans", *samples.shape, len(scans))


@command("train")
def run_train(args: argparse.Namespace) -> None:
    # `train --threads N` (kept for older scripts) sets the global --threads: main() applies it before this.
    from anomri.evaluate.table import write_table
    from anomri.models.checkpoint import save_vae
    from anomri.models.training import TrainingConfig, resolve_device, train_vae

    with np.load(args.pool) as pool:
        samples, description, scans = pool["samples"], json.loads(str(pool["description"])), pool["scans"].tolist()
    config = TrainingConfig(**json.loads(args.settings))
    device = resolve_device(args.device)
    model, history = train_vae(samples, config, resume_path=Path(args.out).with_suffix(".resume.pt"), device=device)
    save_vae(args.out, model.cpu(), {"features": description, "training": vars(config) | {"scans": scans},
                                      "anomri_version": __version__})
    write_table(args.history, history, list(history[0]))
    Path(args.out).with_suffix(".resume.pt").unlink(missing_ok=True)


@command("reference")
def run_reference(args: argparse.Namespace) -> None:
    from anomri.io.derivatives import ScanDerivatives
    from anomri.dmri.features import pool_samples
    from anomri.models.checkpoint import load_vae
    from anomri.models.training import resolve_device
    from anomri.scores.reference import ReferenceSet

    device = resolve_device(args.device)
    vae, _ = load_vae(args.model, device)
    scans = [ScanDerivatives(args.derivatives_dir, p) for p in args.scans]
    # Stratified: every healthy control contributes an equal share.
    samples, _, _ = pool_samples([s.features for s in scans], [s.mask for s in scans],
                                 max(1, args.size // len(scans)), args.seed)
    ReferenceSet.build(vae, samples, device=device, progress=True).save(args.out)


@command("score")
def run_score(args: argparse.Namespace) -> None:
    from anomri.dmri.features import check_compatible
    from anomri.io.derivatives import ScanDerivatives
    from anomri.io.voxels import read_feature_description
    from anomri.maps.novelty import NoveltyModel
    from anomri.maps.writing import write_novelty_maps
    from anomri.models.checkpoint import load_vae
    from anomri.models.training import resolve_device

    from anomri.scores.reference import ReferenceSet

    device = resolve_device(args.device)
    vae, metadata = load_vae(args.model, device)
    scan = ScanDerivatives(args.derivatives_dir, args.prefix)
    check_compatible(metadata["features"], read_feature_description(scan.features), scan.features)
    reference = ReferenceSet.load(args.reference, device) if args.reference else None
    model = NoveltyModel(vae, args.scores, n_samples=args.n_samples, seed=args.seed, reference=reference,
                         batch_size=args.batch_size, device=device)
    write_novelty_maps(model, scan, args.model)


def _postprocessing(args: argparse.Namespace):
    from anomri.maps.postprocess import PostProcessing

    if args.tissue_classes < 1:
        raise InputError("--tissue-classes", f"must be at least 1; got {args.tissue_classes}")
    return PostProcessing(args.erosion_voxels, args.median_filter_voxels, args.smoothing_fwhm_mm)


@command("calibrate")
def run_calibrate(args: argparse.Namespace) -> None:
    from anomri.maps.calibration import calibrate

    calibrate(args.derivatives_dir, args.scans, args.scores, _postprocessing(args), tail_fraction=args.tail_fraction,
              combination=args.combination, tissue_classes=args.tissue_classes, seed=args.seed,
              augmented=args.augmented).save(args.out)


@command("learn-combination")
def run_learn_combination(args: argparse.Namespace) -> None:
    from anomri.evaluate.metrics import auprc, auroc, best_dice
    from anomri.evaluate.table import load_patient
    from anomri.io.atomic import write_json
    from anomri.io.derivatives import ScanDerivatives
    from anomri.maps.calibration import calibration_voxels
    from anomri.maps.learned import LearnedCombination, leave_one_patient_out, score_evidence
    from anomri.maps.probability import HealthyNull
    from anomri.maps.writing import masked_features, postprocessed_scores, write_learned_probability

    if args.C <= 0:
        raise InputError("--C", f"must be positive; got {args.C}")
    post = _postprocessing(args)
    voxels = calibration_voxels(args.derivatives_dir, args.calibration, args.scores, post, args.tissue_classes > 1)
    features, nulls, tissue = voxels.features, {}, None
    for k, v in voxels.values.items():
        # Every score's null lists the same calibration voxels: one tissue model serves them all.
        try:
            nulls[k] = HealthyNull.fit({k: v}, features, tissue_classes=args.tissue_classes, seed=args.seed,
                                       tissue=tissue, postprocessing=post, tail_fraction=args.tail_fraction,
                                       combination=args.combination, scans=args.calibration)
        except ValueError as exc:
            raise InputError(args.out, f"cannot calibrate: {exc}") from exc
        tissue = nulls[k].tissue

    def evidence(scan: ScanDerivatives) -> tuple[np.ndarray, np.ndarray, object]:
        """The scan's score evidence (N, S), the post-processed mask holding its N voxels, and the image grid."""
        processed = {k: postprocessed_scores(scan, k, post) for k in args.scores}
        _, valid, img = processed[args.scores[0]]
        voxels = masked_features(scan, valid) if features is not None else None
        return score_evidence(nulls, {k: v[valid] for k, (v, _, _) in processed.items()}, voxels), valid, img

    patients = [load_patient(args.derivatives_dir, prefix, lesion) for prefix, lesion in args.scan]
    grids = [evidence(p.scan) for p in patients]
    inputs = (args.scores, [e for e, _, _ in grids], [p.lesion[valid] for p, (_, valid, _) in zip(patients, grids)],
              [p.prefix for p in patients])
    try:
        folds = leave_one_patient_out(*inputs, args.C)
        final = LearnedCombination.fit(*inputs, args.C)
    except ValueError as exc:
        raise InputError("--scan", str(exc)) from exc
    settings = {"postprocessing": post.record(), "tissue_classes": args.tissue_classes,
                "calibration_scans": args.calibration, "evidence": "-log p per score (one-score healthy nulls)"}
    cross_validation = {}
    for patient, (ev, valid, img), fold in zip(patients, grids, folds, strict=True):
        volume = write_learned_probability(patient.scan, fold.predict(ev), valid, img, fold, settings,
                                           f"leave-one-patient-out fold without {patient.prefix}")
        x, y = volume[patient.brain], patient.lesion[patient.brain]
        cross_validation[patient.prefix] = {"auroc": auroc(x, y), "auprc": auprc(x, y),
                                            "best_dice": best_dice(x, y)[0]}
        logger.info("%s: learned combination out of fold: AUROC %.4f, AUPRC %.3f, best Dice %.3f", patient.prefix,
                    *cross_validation[patient.prefix].values())
    for prefix in args.apply:
        scan = ScanDerivatives(args.derivatives_dir, prefix)
        ev, valid, img = evidence(scan)
        write_learned_probability(scan, final.predict(ev), valid, img, final, settings, "all labelled patients")
    write_json(args.out, settings | {"model": final.record(), "cross_validation": cross_validation,
                                     "folds": {p.prefix: f.record() for p, f in zip(patients, folds)}})


@command("probability")
def run_probability(args: argparse.Namespace) -> None:
    from anomri.io.derivatives import ScanDerivatives
    from anomri.maps.probability import HealthyNull
    from anomri.maps.writing import write_probability_map

    if not all(0.0 < level < 1.0 for level in args.levels):
        raise InputError("--levels", f"false-positive levels must lie in (0, 1); got {args.levels}")
    write_probability_map(ScanDerivatives(args.derivatives_dir, args.prefix), HealthyNull.load(args.null),
                          args.null, tuple(args.levels), args.min_component_voxels)


@command("evaluate")
def run_evaluate(args: argparse.Namespace) -> None:
    from anomri.evaluate import table
    from anomri.evaluate.healthy import COLUMNS as HEALTHY_COLUMNS
    from anomri.evaluate.healthy import DESCRIPTIONS as HEALTHY_DESCRIPTIONS
    from anomri.evaluate.healthy import healthy_rows
    from anomri.io.atomic import write_json

    if not 0.0 < args.fpr < 1.0:
        raise InputError("--fpr", f"must lie in (0, 1); got {args.fpr}")
    if args.bootstrap < 1:
        raise InputError("--bootstrap", f"must be positive; got {args.bootstrap}")
    if not 0.0 <= args.min_lesion_overlap <= 1.0:
        raise InputError("--min-lesion-overlap", f"must lie in [0, 1]; got {args.min_lesion_overlap}")
    map_ids = [*args.scores, table.PROBABILITY]
    thresholds = {m: table.calibration_threshold(args.derivatives_dir, args.calibration, m, args.fpr)
                  for m in map_ids}
    patients = [table.load_patient(args.derivatives_dir, prefix, lesion) for prefix, lesion in args.scan]
    rows, curves = table.evaluate_cohort(patients, map_ids, thresholds, min_overlap=args.min_lesion_overlap)
    table.write_table(args.out, rows, table.COLUMNS, table.column_descriptions())
    table.write_table(args.summary, table.summarise(rows, args.bootstrap, seed=args.seed), table.summary_columns(),
                      table.summary_descriptions())
    write_json(args.curves, {"fpr": args.fpr, "calibration": args.calibration, "maps": curves})
    # Unseen healthy subjects: held-out controls and patients whose lesion mask is empty.
    unseen = args.healthy + [p.prefix for p in patients if not p.lesion.any()]
    table.write_table(args.healthy_out, healthy_rows(args.derivatives_dir, unseen, args.levels), HEALTHY_COLUMNS,
                      HEALTHY_DESCRIPTIONS)
    logger.info("evaluated %d maps of %d patients at the %g healthy-FPR thresholds of %d calibration controls; "
                "false-positive rate of %d unseen healthy scans", len(map_ids), len(patients), args.fpr,
                len(args.calibration), len(unseen))


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

    write_dataset_description(args.derivatives_dir, args.source)


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
    p.add_argument("--gibbs-removal", action=argparse.BooleanOptionalAction,
                   default=default("preprocessing.gibbs_removal"),
                   help="remove Gibbs ringing (dipy, slice by slice along the third axis)")
    p.add_argument("--motion-correction", action=argparse.BooleanOptionalAction,
                   default=default("preprocessing.motion_correction"),
                   help="register every volume to the mean b0 (dipy) and rotate the b-vectors")
    p.add_argument("--noise-factor", type=float, default=1.0,
                   help="first raise the scan's noise standard deviation this many times (training augmentation)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the added noise")

    p = sub.add_parser("pool", help="pool healthy training voxels")
    _add_scans(p)
    p.add_argument("--augmented", nargs="*", default=[], metavar="DIR",
                   help="derivatives trees of noisier copies of the same scans (preprocess --noise-factor)")
    p.add_argument("--out", required=True, help=".npz file")
    p.add_argument("--max-voxels-per-scan", type=int, default=default("training.max_voxels_per_scan"))
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
    p.add_argument("--model", required=True)
    p.add_argument("--reference", help="reference set (.pt), needed by reference-based scores")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--scores", nargs="+", default=["all"])
    p.add_argument("--n-samples", type=int, default=default("scoring.n_samples"), help="Monte Carlo samples")
    p.add_argument("--seed", type=int, default=default("scoring.seed"))
    p.add_argument("--batch-size", type=int, default=default("scoring.batch_size"))
    p.add_argument("--device", default=default("scoring.device"))

    p = sub.add_parser("calibrate", help="healthy null distributions from held-out controls")
    _add_scans(p)
    p.add_argument("--out", required=True, help=".npz file")
    p.add_argument("--augmented", nargs="*", default=[], metavar="DIR",
                   help="derivative trees of the scans' noisier copies: each scan's null is then noise-matched")
    _add_calibration_options(p)

    p = sub.add_parser("learn-combination",
                       help="opt-in: logistic combination of every score, learned on labelled patients (LOPO CV)")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--calibration", nargs="+", required=True, metavar="PREFIX", help="calibration controls")
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

    p = sub.add_parser("evaluate", help="score every map against lesion masks")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--scan", nargs=2, action="append", required=True, metavar=("PREFIX", "LESION_MASK"))
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--calibration", nargs="+", required=True, metavar="PREFIX",
                   help="calibration controls: their maps set each map kind's healthy-FPR threshold")
    p.add_argument("--fpr", type=float, default=default("evaluation.fpr"),
                   help="fraction of calibration brain voxels flagged")
    p.add_argument("--bootstrap", type=int, default=default("evaluation.bootstrap"),
                   help="bootstrap resamples of the cohort summary")
    p.add_argument("--seed", type=int, default=default("evaluation.seed"), help="seed of the bootstrap")
    p.add_argument("--min-lesion-overlap", type=float, default=default("evaluation.min_lesion_overlap"),
                   help="share of a lesion's voxels to flag for it to count as detected")
    p.add_argument("--healthy", nargs="*", default=[], metavar="PREFIX",
                   help="held-out controls: their realised false-positive rate (patients with empty masks join)")
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
    p.add_argument("--history", required=True, help="training_history.tsv from train")
    p.add_argument("--out", required=True, help=".png file")

    p = sub.add_parser("dataset-description", help="write dataset_description.json")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--source", required=True)


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    """Scores, post-processing and calibration settings shared by ``calibrate`` and ``learn-combination``."""
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--erosion-voxels", type=int, default=default("probability.erosion_voxels"),
                   help="brain-mask erosion before calibration")
    p.add_argument("--median-filter-voxels", type=int, default=default("probability.median_filter_voxels"),
                   help="side of an in-mask median filter (odd; 0 = off)")
    p.add_argument("--smoothing-fwhm-mm", type=float, default=default("probability.smoothing_fwhm_mm"),
                   help="Gaussian smoothing within the mask")
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

