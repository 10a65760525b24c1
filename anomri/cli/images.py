"""The 2-D image subcommands: demo-images, images-train, images-score, images-evaluate, images-report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anomri.cli.registry import command
from anomri.settings import default


@command("demo-images")
def run_demo_images(args: argparse.Namespace) -> None:
    from anomri.demo.images import make_demo_images

    make_demo_images(args.out, n_train=args.n_train, n_test_good=args.n_test_good,
                     n_test_per_defect=args.n_test_per_defect, height=args.height, seed=args.seed)


@command("images-train")
def run_images_train(args: argparse.Namespace) -> None:
    from anomri.evaluate.table import write_table
    from anomri.images.training import save_image_model, train_image_model
    from anomri.images.settings import ImageSettings
    from anomri.io.images import infer_channels, load_model_inputs, scan_mvtec, split_validation
    from anomri.models.training import resolve_device

    settings = ImageSettings.from_json(args.settings)
    folder = scan_mvtec(args.root)
    train, validation = split_validation(folder.train, settings.validation_fraction, settings.seed)
    channels = infer_channels(folder.train) if settings.channels == "auto" else int(settings.channels)
    inputs = load_model_inputs(train, settings.image_geometry, channels).inputs
    held_out = load_model_inputs(validation, settings.image_geometry, channels).inputs
    resume = Path(args.out).with_suffix(".resume.pt")
    model, history = train_image_model(args.model, inputs, settings, resume, resolve_device(args.device),
                                       validation=held_out)
    save_image_model(args.out, model.cpu(), {"root": str(args.root), "settings": json.loads(settings.to_json()),
                                             "n_training_images": len(train), "n_training_inputs": len(inputs),
                                             "validation_images": [str(r.path) for r in validation]})
    write_table(args.history, history, list(history[0]) if history else ["epoch"])
    resume.unlink(missing_ok=True)


@command("images-score")
def run_images_score(args: argparse.Namespace) -> None:
    from anomri.images.outputs import ImageOutputs
    from anomri.images.scoring import score_folder
    from anomri.images.settings import ImageSettings
    from anomri.images.training import load_image_model
    from anomri.models.checkpoint import file_sha256
    from anomri.models.training import resolve_device

    out = ImageOutputs(args.images_dir)
    model, metadata = load_image_model(args.model, resolve_device(args.device))
    score_folder(args.method, model, {"path": str(args.model), "sha256": file_sha256(args.model)}, args.root,
                 ImageSettings.from_json(args.settings), out.maps(args.method), out.scores(args.method), out.thresholds(args.method))


@command("images-evaluate")
def run_images_evaluate(args: argparse.Namespace) -> None:
    from anomri.images.evaluation import evaluate_methods
    from anomri.images.outputs import ImageOutputs
    from anomri.images.settings import ImageSettings

    out = ImageOutputs(args.images_dir)
    settings = ImageSettings.from_json(args.settings)
    evaluate_methods(args.root, {m: out.scores(m) for m in args.methods}, {m: out.thresholds(m) for m in args.methods},
                     {m: out.maps(m) for m in args.methods}, out.image_scores, out.evaluation, out.curves,
                     settings.threshold_percentile, settings.aupro_fpr_limit)


@command("images-report")
def run_images_report(args: argparse.Namespace) -> None:
    from anomri.images.figures import plot_examples, plot_roc_curves, write_overlays
    from anomri.images.outputs import ImageOutputs
    from anomri.images.settings import PRIMARY_SCORE

    out = ImageOutputs(args.images_dir)
    plot_roc_curves(out.curves, out.roc_figure)
    for method in args.methods:
        plot_examples(args.root, method, out.scores(method), PRIMARY_SCORE[method], out.maps(method),
                      out.examples_figure(method))
        write_overlays(args.root, out.maps(method), out.overlays(method))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from anomri.images.settings import METHODS, MODEL_OF_METHOD

    p = sub.add_parser("demo-images", help="write the synthetic OCT-like demo images (MVTec layout)")
    p.add_argument("out", help="new image folder")
    p.add_argument("--n-train", type=int, default=default("images.demo.n_train"))
    p.add_argument("--n-test-good", type=int, default=default("images.demo.n_test_good"))
    p.add_argument("--n-test-per-defect", type=int, default=default("images.demo.n_test_per_defect"))
    p.add_argument("--height", type=int, default=default("images.demo.height"), help="B-scan height in pixels")
    p.add_argument("--seed", type=int, default=default("images.demo.seed"))

    def common(p: argparse.ArgumentParser, device: bool = False) -> None:
        p.add_argument("--root", required=True, help="MVTec-layout image folder")
        p.add_argument("--settings", default="{}", help="JSON object of ImageSettings fields")
        if device:
            p.add_argument("--device", default=default("images.device"))

    p = sub.add_parser("images-train", help="train one image model on the normal training images")
    common(p, device=True)
    p.add_argument("--model", required=True, choices=sorted(set(MODEL_OF_METHOD.values())))
    p.add_argument("--out", required=True, help="model checkpoint (.pt)")
    p.add_argument("--history", required=True, help="training curve (.tsv)")

    p = sub.add_parser("images-score", help="anomaly maps and scores of one method")
    common(p, device=True)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--model", required=True, help="checkpoint from images-train")
    p.add_argument("--images-dir", required=True, help="<output_dir>/images")

    for name, help_text in (("images-evaluate", "metrics of every method, by defect type"),
                            ("images-report", "ROC curves, best/worst examples and per-image overlays")):
        p = sub.add_parser(name, help=help_text)
        common(p)
        p.add_argument("--methods", nargs="+", required=True, choices=METHODS)
        p.add_argument("--images-dir", required=True)

