"""Does fusing two methods' maps per pixel beat the better one? Maps calibrated on normal validation images only.

Each method's saved test maps (``<out>/images/maps/<method>``, from ``bench_images.py`` runs) are divided by
that method's pixel threshold, the 99th percentile of its maps of the held-back normal validation images
(``scores/<method>.json``), so that 1 means "as high as the top 1 % of normal pixels" for every method; the
fused map is the maximum or the mean of the calibrated maps. Pixel AUROC and AU-PRO per defect type with the
engine's own metric code, beside each method alone.

    python benchmarks/bench_map_fusion.py --runs draem=/tmp/bi/d0 patch-memory=/tmp/bi/pm0 [--root DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from anomri.evaluate.image_metrics import pixel_metrics_by_subset
from anomri.images.outputs import ImageOutputs, map_path
from anomri.io.images import read_mask, scan_mvtec

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED)
    parser.add_argument("--runs", nargs="+", required=True, metavar="METHOD=DIR")
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    args = parser.parse_args()
    folder = scan_mvtec(args.root)
    test = folder.test
    subsets = {"pooled": np.ones(len(test), bool)}
    subsets |= {d: np.array([r.label in ("good", d) for r in test]) for d in folder.defect_types}
    calibrated = {}
    for spec in args.runs:
        method, run = spec.split("=", 1)
        out = ImageOutputs(Path(run) / "images")
        threshold = json.loads(out.thresholds(method).read_text())["pixel_threshold"]
        calibrated[method] = [np.load(map_path(out.maps(method), r.label, r.stem)) / threshold for r in test]
    masks = [read_mask(r, m.shape) for r, m in zip(test, next(iter(calibrated.values())))]
    arms = dict(calibrated)
    stacks = [np.stack(maps) for maps in zip(*calibrated.values())]
    arms["fused max"] = [s.max(0) for s in stacks]
    arms["fused mean"] = [s.mean(0) for s in stacks]
    types = list(subsets)
    print(f"| map | pixel AUROC {' / '.join(types)} | AU-PRO {' / '.join(types)} |")
    print("|---|---|---|")
    for name, maps in arms.items():
        rows = pixel_metrics_by_subset(maps, masks, subsets, 1.0, args.fpr_limit)
        auroc = " / ".join(f"{rows[t]['pixel_auroc']:.3f}" for t in types)
        aupro = " / ".join(f"{rows[t]['aupro']:.3f}" for t in types)
        print(f"| {name} | {auroc} | {aupro} |")


if __name__ == "__main__":
    main()
