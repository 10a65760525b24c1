"""The image engine on real industrial defects: every method on magnetic tiles at 128 px, in one run.

Runs the same commands as the Snakemake `images` target (train, score, evaluate)
on ``../shared/data/magnetic_tile`` and prints, per method, image AUROC, pixel
AUROC and AUPRO over all test images and per defect type, with the wall time
of each step. Development (settings, map smoothing, projection step size) looked
only at the ``blowhole`` defects and the normal validation images; ``break``
and ``crack`` are held out, and the table says so.

    python benchmarks/bench_images.py                   # resumes any finished step found in --out
    python benchmarks/bench_images.py --append-readme   # add the tables to benchmarks/README.md
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from bench_anogan import append_to_readme

from anomri.cli import main as anomri
from anomri.images.outputs import ImageOutputs
from anomri.images.settings import METHODS, MODEL_OF_METHOD

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
DEVELOPMENT_DEFECTS = ("blowhole",)
#: Image scores every method gets from its map (besides its primary score).
MAP_SCORES = ("map-max", "map-top")


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    if anomri(args) != 0:
        sys.exit(f"anomri {args[0]} failed")
    return time.perf_counter() - start


def _fmt(value: str) -> str:
    return value if value == "n/a" else f"{float(value):.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=Path("/tmp/anomri-bench-images"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--settings", default="{}", help="JSON overrides of the config.yaml image settings")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        sys.exit(f"{args.root} not found: the magnetic-tile data lives in ../shared/data (see its README)")
    out = ImageOutputs(args.out / "images")
    settings = json.dumps({"image_size": 128} | json.loads(args.settings))
    common = ["--root", str(args.root), "--settings", settings]
    timings = {}
    for kind in sorted({MODEL_OF_METHOD[m] for m in args.methods}):
        if not out.model(kind).exists():
            timings[f"train {kind}"] = _run(["images-train", *common, "--model", kind, "--out", str(out.model(kind)),
                                             "--history", str(out.history(kind)), "--device", args.device])
    for method in args.methods:
        if not out.thresholds(method).exists():
            timings[f"score {method}"] = _run(["images-score", *common, "--method", method, "--model",
                                               str(out.model(MODEL_OF_METHOD[method])), "--images-dir",
                                               str(out.root), "--device", args.device])
    timings["evaluate"] = _run(["images-evaluate", *common, "--methods", *args.methods, "--images-dir",
                                str(out.root)])
    with open(out.evaluation, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    lines = [f"Magnetic tile (`{args.root.name}`), 128 px, settings {settings} on top of config.yaml's defaults. "
             f"Development looked only at {', '.join(DEVELOPMENT_DEFECTS)} (dev); the other defect types are "
             "held out.", "",
             "| method | score | defect type | image AUROC | pixel AUROC | AUPRO@0.3 | image F1 @ val. threshold |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["primary"] == "True" or row["score"] in MAP_SCORES:
            tag = " (dev)" if row["defect_type"] in DEVELOPMENT_DEFECTS else (
                "" if row["defect_type"] == "all" else " (held out)")
            lines.append(f"| {row['method']} | {row['score']} | {row['defect_type']}{tag} | "
                         f"{_fmt(row['image_auroc'])} | {_fmt(row['pixel_auroc'])} | {_fmt(row['aupro'])} | "
                         f"{_fmt(row['image_f1_at_threshold'])} |")
    overall = [r for r in rows if r["defect_type"] == "all" and r["image_auroc"] != "n/a"]
    lines += ["", "Best image AUROC of each method over all its scores (all test images):", "",
              "| method | best score | image AUROC |", "|---|---|---|"]
    for method in args.methods:
        best = max((r for r in overall if r["method"] == method), key=lambda r: float(r["image_auroc"]))
        lines.append(f"| {method} | {best['score']} | {_fmt(best['image_auroc'])} |")
    lines += ["", "| step | wall time (s) |", "|---|---|"]
    lines += [f"| {step} | {seconds:.0f} |" for step, seconds in timings.items()]
    print("\n".join(lines))
    if args.append_readme:
        append_to_readme(f"bench_images.py ({time.strftime('%Y-%m-%d')})", lines)


if __name__ == "__main__":
    main()
