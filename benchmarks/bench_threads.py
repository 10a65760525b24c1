"""Wall time of ``anomri train`` and ``anomri score`` with ``--threads 1`` against ``--threads N`` (issue 14).

A script, not a test. It needs a finished workflow run (``snakemake --cores 2 --config output_dir=DIR``): it
retrains the VAE on that run's pooled training voxels (a few epochs: every epoch costs the same) and rescores
one of its scans with the run's model and reference set, into a temporary folder (the run is left as it is),
each once per thread count and repeat, alternating the counts so that a change in the machine's load hits both.
Every command is a fresh ``python -m anomri`` process, timed from start to exit (a few seconds of imports
included). Prints seconds per command and thread count, and the ratio ``t(1) / t(N)``.

Usage::

    python benchmarks/bench_threads.py results/anomri                  # 1 vs 2 threads, 3 epochs, one repeat
    python benchmarks/bench_threads.py /tmp/run --threads 1 2 4 --repeats 2 --epochs 5 --prefix sub-P01
    python benchmarks/bench_threads.py /tmp/run --scores neg-elbo latent-nn-euclid   # a cheaper score
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anomri.io.derivatives import ScanDerivatives
from anomri.settings import default


def train_command(run: Path, work: Path, epochs: int) -> list[str]:
    settings = {k: v for k, v in default("training").items()
                if k not in ("device", "max_voxels_per_scan", "max_training_voxels", "threads", "noise_augmentation",
                             "diffusivity_augmentation", "anisotropy_augmentation")}
    settings["max_epochs"] = epochs
    return ["train", "--pool", str(run / "models" / "fold-1" / "training_voxels.npz"), "--out", str(work / "vae.pt"),
            "--history", str(work / "history.tsv"), "--settings", json.dumps(settings), "--device", "cpu"]


def score_command(run: Path, work: Path, prefix: str, scores: list[str]) -> list[str]:
    """``anomri score`` of ``prefix`` with the run's model and reference, writing under ``work``."""
    source, copy = ScanDerivatives(run, prefix), ScanDerivatives(work, prefix)
    if not copy.dir.exists():
        copy.dir.mkdir(parents=True)
        for path in (source.features, source.mask, *source.dir.glob("*qspace_features.json")):
            shutil.copy2(path, copy.dir / Path(path).name)
    scoring = default("scoring")
    reference = run / "models" / "fold-1" / "reference_set.pt"
    return ["score", "--model", str(run / "models" / "fold-1" / "vae.pt"),
            *(["--reference", str(reference)] if reference.exists() else []),
            "--derivatives-dir", str(work), "--prefix", prefix, "--scores", *scores,
            "--n-samples", str(scoring["n_samples"]), "--seed", str(scoring["seed"]),
            "--batch-size", str(scoring["batch_size"]), "--device", "cpu"]


def timed(threads: int, command: list[str], log: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anomri", "--log", str(log), "--threads", str(threads), *command],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="output_dir of a finished workflow run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (first: baseline)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per timed train")
    parser.add_argument("--prefix", help="scan to rescore (default: the first patient of the run)")
    parser.add_argument("--only", choices=["train", "score"], help="time one command only")
    parser.add_argument("--scores", nargs="+", default=default("scoring.scores"),
                        help="scores of the timed score (default: the workflow's)")
    args = parser.parse_args()

    run = args.output_dir
    if not (run / "models" / "fold-1" / "vae.pt").exists() or not (run / "models" / "fold-1" / "training_voxels.npz").exists():
        sys.exit(f"bench_threads: {run} is not a finished run (models/vae.pt, models/training_voxels.npz)")
    prefix = args.prefix or sorted(p.name.split("_")[0] for p in run.glob("sub-P*") if p.is_dir())[0]
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        work = Path(tmp)
        commands = {"train": train_command(run, work, args.epochs), "score": score_command(run, work, prefix, args.scores)}
        if args.only:
            commands = {args.only: commands[args.only]}
        for repeat in range(args.repeats):
            for name, command in commands.items():
                # Alternate the order between repeats: a load change then hits every thread count.
                for threads in (args.threads if repeat % 2 == 0 else args.threads[::-1]):
                    seconds = timed(threads, command, work / f"{name}-{threads}.log")
                    times.setdefault((name, threads), []).append(seconds)
                    print(f"{name} --threads {threads} (repeat {repeat + 1}): {seconds:.1f} s", flush=True)

    base = args.threads[0]
    print(f"\n| command | threads | seconds (each repeat) | median s | t({base}) / t(N) |")
    print("|---|---|---|---|---|")
    for name in commands:
        for threads in args.threads:
            runs = times[(name, threads)]
            ratio = statistics.median(times[(name, base)]) / statistics.median(runs)
            label = f"train ({args.epochs} epochs)" if name == "train" else f"score ({prefix})"
            print(f"| {label} | {threads} | {', '.join(f'{t:.1f}' for t in runs)} | "
                  f"{statistics.median(runs):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
