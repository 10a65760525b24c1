"""The image engine on real industrial defects: every method on magnetic tiles at 128 px, in one run.

Runs the same commands as the Snakemake `images` target (train, score, evaluate)
on ``../shared/data/magnetic_tile`` and prints, per method, image AUROC, pixel
AUROC and AUPRO per defect type and pooled, with the wall time of each step.
Development types (``--dev``, by default every type not held out) and held-out
types (``--held-out``) are printed in separate tables, each with its own
pooled row. Settings were chosen on blowhole, break and crack, the types in
``../shared/data/magnetic_tile``: they are development types. Held-out types
(the issue's fray and uneven, kept by whoever filed it) are reported only when
``--held-out`` names them and the folder holds them.

    python benchmarks/bench_images.py                   # resumes any finished step found in --out
    python benchmarks/bench_images.py --root <folder with held-out types> --held-out fray uneven
    python benchmarks/bench_images.py --append-readme   # add the tables to benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_anogan import append_to_readme

from anomri.cli import main as anomri
from anomri.images.evaluation import evaluate_methods
from anomri.images.outputs import ImageOutputs
from anomri.images.settings import ALL_METHODS, FUSION_METHOD, MODEL_OF_METHOD, ImageSettings
from anomri.io.images import scan_mvtec

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"
#: Image scores every method gets from its map (besides its primary score).
MAP_SCORES = ("map-max", "map-top")
#: Names of the pooled rows of each group of defect types.
POOLED = {"dev": "dev (pooled)", "held-out": "held out (pooled)"}


def _run(args: list[str], step: str, timings: dict[str, float], record: Path) -> None:
    """Run one anomri subcommand and record its wall time in ``timings`` and, at once, in ``record`` (JSON), so a
    resumed run still reports the steps an earlier one finished."""
    start = time.perf_counter()
    if anomri(args) != 0:
        sys.exit(f"anomri {args[0]} failed")
    timings[step] = time.perf_counter() - start
    record.write_text(json.dumps(timings, indent=1))


def _fmt(value: object) -> str:
    return "n/a" if value in ("n/a", None, "") else f"{float(value):.3f}"


def group_tables(rows: list[dict], groups: dict[str, list[str]], methods: list[str]) -> list[str]:
    """One markdown table per group of defect types (its types and its pooled row), and each method's best
    image score per group."""
    lines: list[str] = []
    for group, types in groups.items():
        if not types:
            continue
        subsets = [*types, POOLED[group]] if len(types) > 1 else types
        chosen = [r for r in rows if r["defect_type"] in subsets and (r["primary"] or r["score"] in MAP_SCORES)]
        lines += [f"**{'Development' if group == 'dev' else 'Held-out'} defect types** ({', '.join(types)}):", "",
                  "| method | score | defect type | image AUROC | pixel AUROC | AUPRO@0.3 | image F1 @ val. threshold |",
                  "|---|---|---|---|---|---|---|"]
        for method in methods:
            for row in sorted((r for r in chosen if r["method"] == method),
                              key=lambda r: (not r["primary"], r["score"], subsets.index(r["defect_type"]))):
                lines.append(f"| {method} | {row['score']} | {row['defect_type']} | {_fmt(row['image_auroc'])} | "
                             f"{_fmt(row.get('pixel_auroc'))} | {_fmt(row.get('aupro'))} | "
                             f"{_fmt(row['image_f1_at_threshold'])} |")
        lines += ["", f"Best image AUROC of each method over all its scores, {subsets[-1]}:", "",
                  "| method | best score | image AUROC |", "|---|---|---|"]
        for method in methods:
            best = max((r for r in rows if r["method"] == method and r["defect_type"] == subsets[-1]),
                       key=lambda r: r["image_auroc"])
            lines.append(f"| {method} | {best['score']} | {_fmt(best['image_auroc'])} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=Path("/tmp/anomri-bench-images"))
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS,
                        help=f"methods to run; {FUSION_METHOD} also runs the methods it fuses")
    parser.add_argument("--settings", default="{}", help="JSON overrides of the config.yaml image settings")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--held-out", nargs="*", default=[], metavar="TYPE",
                        help="defect types no choice was made on, reported apart (e.g. fray uneven)")
    parser.add_argument("--dev", nargs="*", metavar="TYPE",
                        help="development defect types (default: every type of the folder not held out)")
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        sys.exit(f"{args.root} not found: the magnetic-tile data lives in ../shared/data (see its README)")
    present = scan_mvtec(args.root).defect_types
    dev = [t for t in present if t not in args.held_out] if args.dev is None else args.dev
    groups = {"dev": [t for t in dev if t in present], "held-out": [t for t in args.held_out if t in present]}
    out = ImageOutputs(args.out / "images")
    settings = json.dumps({"image_size": 128} | json.loads(args.settings))
    common = ["--root", str(args.root), "--settings", settings]
    image_settings = ImageSettings.from_json(settings)
    fused = image_settings.fused_methods if FUSION_METHOD in args.methods else ()
    scored = [m for m in dict.fromkeys([*args.methods, *fused]) if m != FUSION_METHOD]
    record = args.out / "timings.json"
    timings = json.loads(record.read_text()) if record.is_file() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    for method in scored:  # in the order asked for, each scored as soon as its model is trained
        kind = MODEL_OF_METHOD[method]
        if not out.model(kind).exists():
            _run(["images-train", *common, "--model", kind, "--out", str(out.model(kind)), "--history",
                  str(out.history(kind)), "--device", args.device], f"train {kind}", timings, record)
        if not out.thresholds(method).exists():
            _run(["images-score", *common, "--method", method, "--model", str(out.model(MODEL_OF_METHOD[method])),
                  "--images-dir", str(out.root), "--device", args.device], f"score {method}", timings, record)
    if fused and not out.thresholds(FUSION_METHOD).exists():
        _run(["images-fuse", "--settings", settings, "--images-dir", str(out.root)], f"fuse {' + '.join(fused)}",
             timings, record)
    start = time.perf_counter()
    rows = evaluate_methods(args.root, {m: out.scores(m) for m in args.methods},
                            {m: out.thresholds(m) for m in args.methods}, {m: out.maps(m) for m in args.methods},
                            out.image_scores, out.evaluation, out.curves, image_settings.threshold_percentile,
                            image_settings.aupro_fpr_limit, {POOLED[g]: types for g, types in groups.items()})
    timings["evaluate"] = time.perf_counter() - start
    lines = [f"`{args.root.name}`, 128 px, settings {settings} on top of config.yaml's defaults. "
             f"Development types (choices were made on them): {', '.join(groups['dev']) or 'none'}. "
             f"Held-out types: {', '.join(groups['held-out']) or 'none in this folder'}"
             + (f" (asked for but absent: {', '.join(t for t in args.held_out if t not in present)})"
                if set(args.held_out) - set(present) else "") + ".", ""]
    lines += group_tables(rows, groups, args.methods)
    lines += ["| step | wall time (s) |", "|---|---|"]
    lines += [f"| {step} | {seconds:.0f} |" for step, seconds in timings.items()]
    print("\n".join(lines))
    if args.append_readme:
        append_to_readme(f"bench_images.py ({time.strftime('%Y-%m-%d')})", lines)


if __name__ == "__main__":
    main()
