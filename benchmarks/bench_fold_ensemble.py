"""Cross-conformal p (mean of the fold models' p) against p of the fold models' mean map, on a finished run.

A script, not a test. Every patient and unseen healthy subject of a run of
``bench_generalisation.py`` is scored twice against the run's own healthy null
(same post-processing, centring, tissue classes and SNR matching as
``anomri probability``): as the pipeline does, p = mean over the fold models of
each model's p, and with the p of the mean of the fold models' maps (the map
``anomri score`` writes beside the scan). Per patient AUPRC, best Dice and the
Dice of the p <= 0.01 mask; per unseen healthy subject the fraction flagged.

    python benchmarks/bench_fold_ensemble.py runs/D6-default/seed-0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from scipy.special import logsumexp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anomri.evaluate.metrics import auprc, best_dice, dice  # noqa: E402
from anomri.io.derivatives import ScanDerivatives  # noqa: E402
from anomri.io.voxels import read_snr  # noqa: E402
from anomri.maps.probability import HealthyNull  # noqa: E402
from anomri.maps.writing import masked_features, postprocessed_scores  # noqa: E402

LEVEL = 0.01


def log_p(null: HealthyNull, scan: ScanDerivatives, trees: list[ScanDerivatives]) -> tuple[np.ndarray, np.ndarray]:
    """log of the mean over ``trees`` of each tree's map's p, and the mask it is valid in."""
    matched = null.matched(read_snr(scan.features))
    pp, parts = null.postprocessing, []
    for tree in trees:
        processed = {k: postprocessed_scores(scan, k, pp, tree) for k in null.scores}
        _, mask, _ = processed[null.scores[0]]
        features = masked_features(scan, mask) if null.tissue is not None else None
        parts.append(matched.log_tail_probability({k: pp.centre(v[mask]) for k, (v, _, _) in processed.items()},
                                                  features))
    return logsumexp(parts, axis=0) - np.log(len(parts)), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a seed-<s> folder of bench_generalisation.py run")
    args = parser.parse_args()
    config = yaml.safe_load((args.run.parent / f"{args.run.name}.yaml").read_text())
    cohort = Path(config["bids_dir"])
    unseen = json.loads((cohort / "unseen_healthy.json").read_text())
    null = HealthyNull.load(args.run / "calibration" / "healthy_null.npz")
    folds = sorted((args.run / "models").glob("fold-*/maps"))
    patients = sorted(p.name for p in args.run.glob("sub-*") if (cohort / "derivatives" / "lesions" / p.name).exists())
    print(f"{args.run}: {len(folds)} fold models\n")
    print("| subject | p: mean of fold models' p | p of the fold models' mean map |\n|---|---|---|")
    for sub in patients + unseen:
        scan = ScanDerivatives(args.run, sub)
        cells = []
        for trees in ([ScanDerivatives(f, sub) for f in folds], [scan]):
            lp, mask = log_p(null, scan, trees)
            flagged = lp <= np.log(LEVEL)
            if sub in unseen:
                cells.append(f"{100 * flagged.mean():.2f} % flagged")
                continue
            path = cohort / "derivatives" / "lesions" / sub / "dwi" / f"{sub}_space-dwi_desc-lesion_mask.nii.gz"
            lesion = np.asarray(nib.load(path).dataobj)[mask] > 0
            cells.append(f"AUPRC {auprc(-lp, lesion):.3f}, best Dice {best_dice(-lp, lesion)[0]:.3f}, "
                         f"p01 Dice {dice(flagged, lesion):.3f}")
        print(f"| {sub} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
