"""Detection that holds on people nobody tuned on (issue 25): cohorts, runs over training seeds, tables.

A script, not a test. Three steps:

``cohort``
    A synthetic cohort from ``anomri demo-cohort`` (any family, scheme, resolution, lesion masks) with
    ``--unseen`` extra healthy subjects labelled as *patients* without a lesion mask: nothing in the pipeline
    knows they are healthy, so the fraction of their brain flagged is the false-positive rate on people that
    neither trained nor calibrated anything.
``run``
    ``snakemake`` on such a cohort once per training seed (``training.seed``), with a YAML file of settings
    (an ablation arm) merged into ``config.yaml``; every run in its own output folder.
``recalibrate``
    A copy of a finished arm with settings that act from the calibration on (post-processing, the
    out-of-distribution margin): only ``calibrate`` and what follows it run again.
``table``
    Per patient, mean +- sd over the seeds of a run folder: AUROC, AUPRC, best Dice of the lesion probability
    (``evaluation.tsv``), the Dice of the ``p01`` mask the pipeline writes, the unseen healthy subjects' and the
    controls' out-of-fold flagged fractions at the 1 % level, and every scan's out-of-distribution verdict.

Usage::

    python benchmarks/bench_generalisation.py cohort /data/gen/tuneA6 --controls 6 --patients 5 --unseen 2 \
        --seed 101 --demo-args "--voxel-size 3 --scheme 3shell --lesion-masks ..."
    python benchmarks/bench_generalisation.py run /data/gen/tuneA6 /data/gen/runs/tuneA6-default --seeds 0 1 2 \
        [--settings arm.yaml] [--repo /path/to/another/checkout]
    python benchmarks/bench_generalisation.py table /data/gen/runs/tuneA6-default [more run folders]
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from anomri.evaluate.healthy import scored_voxels  # noqa: E402
from anomri.evaluate.metrics import dice  # noqa: E402
from anomri.io.derivatives import ScanDerivatives  # noqa: E402

#: What every run leaves out to save time: the probability map needs only neg-elbo (the default probability score).
FAST = {"scoring": {"scores": ["neg-elbo"]}, "evaluation": {"bootstrap": 200}}
LEVEL = 0.01


def make_cohort(out: Path, controls: int, patients: int, unseen: int, seed: int, extra: list[str]) -> None:
    """Write the cohort, then relabel its last ``unseen`` controls as patients (no lesion mask)."""
    subprocess.run([sys.executable, "-m", "anomri", "demo-cohort", str(out), "--n-controls", str(controls + unseen),
                    "--n-patients", str(patients), "--seed", str(seed), *extra], check=True)
    table = out / "participants.tsv"
    rows = list(csv.DictReader(table.open(), delimiter="\t"))
    relabel = [r["participant_id"] for r in rows if r["group"] == "control"][controls:]
    for row in rows:
        if row["participant_id"] in relabel:
            row["group"] = "patient"
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (out / "unseen_healthy.json").write_text(json.dumps(relabel))
    print(f"{out}: {controls} controls, {patients} patients, unseen healthy labelled patients: {relabel}")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run(cohort: Path, out: Path, seeds: list[int], settings: Path | None, repo: Path, cores: int) -> None:
    """One snakemake run per training seed into ``out/seed-<s>``."""
    arm = yaml.safe_load(settings.read_text()) if settings else {}
    for seed in seeds:
        target = out / f"seed-{seed}"
        config = _merge(_merge(FAST, arm), {"bids_dir": str(cohort.resolve()), "output_dir": str(target.resolve()),
                                            "training": {"seed": seed}})
        target.mkdir(parents=True, exist_ok=True)
        configfile = target.parent / f"seed-{seed}.yaml"
        configfile.write_text(yaml.safe_dump(config))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile",
                                 str(configfile.resolve())], cwd=repo, capture_output=True, text=True)
        (target.parent / f"seed-{seed}.log").write_text(result.stdout + result.stderr)
        if result.returncode:
            raise SystemExit(f"{target}: snakemake failed; see {target.parent / f'seed-{seed}.log'}")
        print(f"{target}: {time.perf_counter() - start:.0f} s")


def recalibrate(source: Path, out: Path, settings: Path, repo: Path, cores: int) -> None:
    """A copy of every run of ``source`` with settings that act from the calibration on (post-processing, the
    out-of-distribution margin): the models and maps are reused, ``calibrate`` and what follows run again."""
    arm = yaml.safe_load(settings.read_text())
    for configfile in sorted(source.glob("seed-*.yaml")):
        target = out / configfile.stem
        if (target / "evaluation.tsv").exists():
            continue  # recalibrated before
        shutil.copytree(source / configfile.stem, target, symlinks=True)  # copy2 keeps the times Snakemake reads
        config = _merge(yaml.safe_load(configfile.read_text()), arm) | {"output_dir": str(target.resolve())}
        (out / configfile.name).write_text(yaml.safe_dump(config))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile",
                                 str((out / configfile.name).resolve()), "--forcerun", "calibrate"], cwd=repo,
                                capture_output=True, text=True)
        (out / f"{configfile.stem}.log").write_text(result.stdout + result.stderr)
        if result.returncode:
            raise SystemExit(f"{target}: snakemake failed; see {out / f'{configfile.stem}.log'}")
        print(f"{target}: {time.perf_counter() - start:.0f} s")


def _read(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _flagged(out: Path, prefix: str) -> float:
    """Fraction of a scan's scored voxels in its p01 mask."""
    scan = ScanDerivatives(out, prefix)
    brain = np.asarray(nib.load(scan.mask).dataobj) > 0
    scored = scored_voxels(scan, brain)
    return float((np.asarray(nib.load(scan.lesion_mask(LEVEL)).dataobj) > 0)[scored].mean())


def seed_metrics(out: Path) -> dict:
    """Every number of one run (one seed)."""
    config = yaml.safe_load((out.parent / f"{out.name}.yaml").read_text())
    cohort = Path(config["bids_dir"])
    unseen = json.loads((cohort / "unseen_healthy.json").read_text()) if (cohort / "unseen_healthy.json").exists() \
        else []
    patients = {}
    for row in _read(out / "evaluation.tsv"):
        if row["score"] != "lesion-probability" or row["participant_id"] == "pooled":
            continue
        pid = row["participant_id"]
        scan = ScanDerivatives(out, pid)
        lesion_path = cohort / "derivatives" / "lesions" / pid / "dwi" / f"{pid}_space-dwi_desc-lesion_mask.nii.gz"
        lesion = np.asarray(nib.load(lesion_path).dataobj) > 0
        flagged = np.asarray(nib.load(scan.lesion_mask(LEVEL)).dataobj) > 0
        patients[pid] = {"auroc": float(row["auroc"]), "auprc": float(row["auprc"]),
                         "best_dice": float(row["best_dice"]), "dice_p01": dice(flagged.ravel(), lesion.ravel())}
    healthy = {f"{pid} (unseen)": _flagged(out, pid) for pid in unseen}
    healthy_table = out / "evaluation_healthy.tsv"
    controls = {r["participant_id"]: float(r["realised_fpr"]) for r in _read(healthy_table)
                if float(r["level"]) == LEVEL and r.get("role") == "control"} if healthy_table.exists() else {}
    verdicts = {}
    if (out / "quality.tsv").exists():
        verdicts = {r["participant_id"]: (float(r["shift"]), r["verdict"]) for r in _read(out / "quality.tsv")}
    return {"patients": patients, "unseen": healthy, "controls": controls, "verdicts": verdicts}


def _pm(values: list[float], fmt: str = ".3f") -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{np.mean(values):{fmt}} ± {np.std(values, ddof=1):{fmt}}"


def table(folder: Path) -> None:
    """Markdown tables of one arm (a folder of seed-<s> runs)."""
    seeds = sorted(p for p in folder.glob("seed-*") if p.is_dir() and (p / "evaluation.tsv").exists())
    runs = [seed_metrics(s) for s in seeds]
    if not runs:
        print(f"{folder}: no finished run")
        return
    metrics = ["auroc", "auprc", "best_dice", "dice_p01"]
    print(f"\n### {folder.name} ({len(runs)} seed{'s' if len(runs) > 1 else ''}: {', '.join(s.name for s in seeds)})\n")
    print("| patient | AUROC | AUPRC | best Dice | Dice of p01 mask |\n|---|---|---|---|---|")
    for pid in runs[0]["patients"]:
        print(f"| {pid} | " + " | ".join(_pm([r["patients"][pid][m] for r in runs]) for m in metrics) + " |")
    means = {m: [np.mean([p[m] for p in r["patients"].values()]) for r in runs] for m in metrics}
    print("| **mean** | " + " | ".join(f"**{_pm(means[m])}**" for m in metrics) + " |")
    flagged = {k: [r["unseen"].get(k, np.nan) for r in runs] for k in runs[0]["unseen"]}
    flagged |= {f"{k} (control, out of fold)": [r["controls"].get(k, np.nan) for r in runs]
                for k in runs[0]["controls"]}
    print("\nflagged at p <= 0.01 (% of scored brain): " + "; ".join(
        f"{k} {_pm([100 * v for v in vals], '.2f')}" for k, vals in flagged.items()))
    worst_unseen = [max(r["unseen"].values()) for r in runs if r["unseen"]]
    worst_control = [max(r["controls"].values()) for r in runs if r["controls"]]
    print(f"worst unseen healthy: {_pm([100 * v for v in worst_unseen], '.2f')} %; worst control out of fold: "
          f"{_pm([100 * v for v in worst_control], '.2f')} %")
    ood = {pid: [r["verdicts"][pid] for r in runs if pid in r["verdicts"]] for pid in runs[0]["verdicts"]}
    flagged_ood = {pid: v for pid, v in ood.items() if any(verdict != "within" for _, verdict in v)}
    print("out-of-distribution verdicts (shift, verdict per seed): " + (
        "; ".join(f"{pid} " + ", ".join(f"{s:.2f} {v}" for s, v in vals) for pid, vals in flagged_ood.items())
        or "none"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cohort", help="write a cohort with unseen healthy subjects labelled as patients")
    c.add_argument("out", type=Path)
    c.add_argument("--controls", type=int, required=True)
    c.add_argument("--patients", type=int, required=True)
    c.add_argument("--unseen", type=int, default=2)
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--demo-args", default="", help="more anomri demo-cohort options, one string")
    r = sub.add_parser("run", help="snakemake once per training seed")
    r.add_argument("cohort", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--settings", type=Path, help="YAML settings of the arm, merged into config.yaml")
    r.add_argument("--repo", type=Path, default=REPO, help="the checkout whose workflow runs")
    r.add_argument("--cores", type=int, default=2)
    c = sub.add_parser("recalibrate", help="rerun a finished arm from the calibration on, with other settings")
    c.add_argument("source", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--settings", type=Path, required=True, help="YAML settings merged into the source's config")
    c.add_argument("--repo", type=Path, default=REPO)
    c.add_argument("--cores", type=int, default=2)
    t = sub.add_parser("table", help="per-patient tables of finished runs")
    t.add_argument("folders", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.command == "cohort":
        make_cohort(args.out, args.controls, args.patients, args.unseen, args.seed, shlex.split(args.demo_args))
    elif args.command == "run":
        run(args.cohort, args.out, args.seeds, args.settings, args.repo, args.cores)
    elif args.command == "recalibrate":
        recalibrate(args.source, args.out, args.settings, args.repo, args.cores)
    else:
        for folder in args.folders:
            table(folder)


if __name__ == "__main__":
    main()
