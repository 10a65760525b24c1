"""Does fusing several methods' image scores beat the best one? Scores calibrated on normal validation images only.

Each method's image score (its primary score from ``scores/<method>.json``, or the one ``METHOD:SCORE`` names)
is read from the score tables of ``bench_images.py`` runs and expressed as a z-score against the held-back
normal validation images of the same run (:class:`anomri.images.fusion.NormalCalibration`, what the engine's
fusion does); every subset of two or more methods is fused by the mean and by the max of the z-scores
(:func:`anomri.images.fusion.fuse`). Printed: image AUROC per defect type (its defective test images against
every normal test image) and pooled, per run; then leave one type out: for each type, the arm (one method
alone, or a subset and rule) with the best mean image AUROC over runs on the *other* types pooled is chosen,
and its AUROC on the left-out type reported beside the engine's fusion (``score_fusion_methods`` by
``map_fusion_rule``) and the best single method chosen the same way.

    python benchmarks/bench_score_fusion.py --runs /work/bi/all0 [/work/bi/all1] \\
        --methods draem patch-memory vae-projection vae anogan mhp-vae [--root DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from anomri.evaluate.metrics import auroc
from anomri.images.evaluation import read_scores
from anomri.images.fusion import NormalCalibration, fuse
from anomri.images.outputs import ImageOutputs
from anomri.images.settings import FUSION_RULES, ImageSettings
from anomri.io.images import scan_mvtec

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"


def calibrated_scores(run: Path, spec: str, keys: list[tuple[str, str]]) -> np.ndarray:
    """z-scores of the test images ``keys`` (label, stem) under method ``spec`` (METHOD or METHOD:SCORE) of
    ``run``, calibrated on that run's normal validation images."""
    method, _, score = spec.partition(":")
    out = ImageOutputs(run / "images")
    score = score or json.loads(out.thresholds(method).read_text())["primary_score"]
    rows = [r for r in read_scores(out.scores(method)) if r["score"] == score]
    if not rows:
        raise SystemExit(f"{out.scores(method)}: no score {score!r}")
    test = {(r["label"], r["stem"]): r["value"] for r in rows if r["split"] == "test"}
    calibration = NormalCalibration.fit([r["value"] for r in rows if r["split"] == "val"])
    return calibration.zscore([test[k] for k in keys])


def type_aurocs(scores: np.ndarray, labels: np.ndarray, types: list[str]) -> dict[str, float]:
    """Image AUROC of each defect type against every normal test image, and of all types pooled."""
    normal = labels == "good"
    result = {t: auroc(scores[normal | (labels == t)], labels[normal | (labels == t)] == t) for t in types}
    result["pooled"] = auroc(scores, ~normal)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="bench_images.py output folders")
    parser.add_argument("--methods", nargs="+", required=True, metavar="METHOD[:SCORE]")
    args = parser.parse_args()
    folder = scan_mvtec(args.root)
    keys = [(r.label, r.stem) for r in folder.test]
    labels = np.array([label for label, _ in keys])
    types = list(folder.defect_types)
    z = {run: {m: calibrated_scores(run, m, keys) for m in args.methods} for run in args.runs}
    arms = {(m,): {run: z[run][m] for run in args.runs} for m in args.methods}
    for size in range(2, len(args.methods) + 1):
        for subset in itertools.combinations(args.methods, size):
            for rule in FUSION_RULES:
                arms[(*subset, rule)] = {run: fuse([z[run][m] for m in subset], rule) for run in args.runs}
    table = {arm: {run: type_aurocs(scores, labels, types) for run, scores in by_run.items()}
             for arm, by_run in arms.items()}
    defaults = ImageSettings()
    engine = tuple(defaults.score_fusion_methods)
    engine += (defaults.map_fusion_rule,) if len(engine) > 1 else ()

    def name(arm: tuple[str, ...]) -> str:
        return arm[0] if len(arm) == 1 else f"{' + '.join(arm[:-1])} ({arm[-1]})"

    def mean_over(arm: tuple[str, ...], key: str) -> float:
        return float(np.mean([table[arm][run][key] for run in args.runs]))

    print(f"Image AUROC {' / '.join([*types, 'pooled'])}, runs {', '.join(str(r) for r in args.runs)}:\n")
    print("| arm | " + " | ".join(r.name for r in args.runs) + " |")
    print("|---|" + "---|" * len(args.runs))
    for arm in sorted(table, key=lambda a: -mean_over(a, "pooled")):
        cells = [" / ".join(f"{table[arm][run][k]:.3f}" for k in [*types, "pooled"]) for run in args.runs]
        print(f"| {name(arm)} | " + " | ".join(cells) + " |")
    print("\nLeave one type out (chosen on the other types' defective images against every normal test image):\n")
    print(f"| left-out type | chosen arm | its AUROC | best single method chosen so | engine ({name(engine)}) |")
    print("|---|---|---|---|---|")
    for left_out in types:
        others = [t for t in types if t != left_out]
        normal = labels == "good"
        inside = normal | np.isin(labels, others)

        def tuning(arm: tuple[str, ...]) -> float:
            return float(np.mean([auroc(arms[arm][run][inside], ~normal[inside]) for run in args.runs]))

        chosen = max(arms, key=tuning)
        single = max((a for a in arms if len(a) == 1), key=tuning)
        engine_cell = f"{mean_over(engine, left_out):.3f}" if engine in table else "not in --methods"
        print(f"| {left_out} | {name(chosen)} | {mean_over(chosen, left_out):.3f} | {name(single)} "
              f"{mean_over(single, left_out):.3f} | {engine_cell} |")


if __name__ == "__main__":
    main()
