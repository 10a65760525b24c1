"""The 2-D image subcommands: demo-images, images-train, images-score, images-fuse, images-evaluate, images-report."""

from __future__ import annotations

import argparse

from anomri.cli.registry import command
from anomri.settings import default


@command("demo-images")
def run_demo_images(args: argparse.Namespace) -> None:
    from anomri.demo.images import make_demo_images

    make_demo_images(args.out, n_train=args.n_train, n_test_good=args.n_test_good,
                     n_test_per_defect=args.n_test_per_defect, height=args.height, seed=args.seed)


@command("images-train")
def run_images_train(args: argparse.Namespace) -> None:
    from anomri.images.settings import ImageSettings
    from anomri.images.training import train_on_folder

    train_on_folder(args.model, args.root, ImageSettings.from_json(args.settings), args.out, args.history, args.device)


@command("images-score")
def run_images_score(args: argparse.Namespace) -> None:
    from anomri.images.scoring import score_method
    from anomri.images.settings import ImageSettings

    score_method(args.method, args.model, args.root, ImageSettings.from_json(args.settings), args.images_dir,
                 args.device)


@command("images-fuse")
def run_images_fuse(args: argparse.Namespace) -> None:
    from anomri.images.map_fusion import fuse_method_maps
    from anomri.images.settings import ImageSettings

    fuse_method_maps(args.images_dir, ImageSettings.from_json(args.settings))


@command("images-evaluate")
def run_images_evaluate(args: argparse.Namespace) -> None:
    from anomri.images.evaluation import evaluate_methods
    from anomri.images.global_scores import descriptor_score_rows
    from anomri.images.outputs import ImageOutputs
    from anomri.images.settings import ImageSettings

    out = ImageOutputs(args.images_dir)
    settings = ImageSettings.from_json(args.settings)
    descriptor_rows = descriptor_score_rows(args.root, settings) if settings.descriptor_score else None
    evaluate_methods(args.root, {m: out.scores(m) for m in args.methods}, {m: out.thresholds(m) for m in args.methods},
                     {m: out.maps(m) for m in args.methods}, out.image_scores, out.evaluation, out.curves,
                     settings.threshold_percentile, settings.aupro_fpr_limit,
                     descriptor_rows=descriptor_rows, fusion=settings.descriptor_fusion)


@command("images-report")
def run_images_report(args: argparse.Namespace) -> None:
    from anomri.images.figures import write_figures

    write_figures(args.root, args.methods, args.images_dir)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from anomri.images.settings import ALL_METHODS, METHODS, MODEL_OF_METHOD

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

    p = sub.add_parser("images-fuse", help="method fusion: the maps of images.map_fusion_methods, calibrated on "
                                           "normal images and fused per pixel")
    p.add_argument("--settings", default="{}", help="JSON object of ImageSettings fields")
    p.add_argument("--images-dir", required=True, help="<output_dir>/images, where images-score wrote")

    for name, help_text in (("images-evaluate", "metrics of every method, by defect type"),
                            ("images-report", "ROC curves, best/worst examples and per-image overlays")):
        p = sub.add_parser(name, help=help_text)
        common(p)
        p.add_argument("--methods", nargs="+", required=True, choices=ALL_METHODS)
        p.add_argument("--images-dir", required=True)

