"""How the workflow's cost grows with the cohort: generated cohorts of 10, 40 and 100 subjects.

A script, not a test. For each cohort size N it writes a config for the demo simulator (N subjects, 60 %
controls, 2 of them held out; low resolution so that 100 subjects fit a session on 2 cores), runs the real
``snakemake --cores C`` on it, and reads every job's Snakemake ``benchmark:`` file. It prints:

* the wall time of each run;
* per rule: jobs, job-seconds (the sum of the jobs' wall times: the work a cluster would spread over nodes),
  job CPU seconds (what the jobs kept busy, the figure to read when the machine was shared), the largest job's
  wall time and the largest max RSS, at every N;
* the growth of each rule's job-seconds and peak memory from the smallest to the largest cohort: ~N_max/N_min
  for per-subject rules, ~1 for the capped ones (training pool, reference set);
* an extrapolation to ``--extrapolate`` subjects on a cluster: per-subject rules scale their job-seconds
  linearly, capped rules keep the largest cohort's job, and the critical path is the longest chain of
  jobs (preprocess one subject -> pool -> train -> reference -> score one subject -> calibrate -> probability
  -> evaluate), where the cohort-wide single jobs that are not capped (calibrate, evaluate) grow linearly. The
  demo simulator, one job for the whole cohort, is left out: a real cohort is read, not simulated.

Usage::

    python benchmarks/bench_scaling.py                             # 10, 40, 100 subjects at 6 mm, --cores 2
    python benchmarks/bench_scaling.py --subjects 10 40 --voxel-size 4 --out /tmp/scaling
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rule_table import rule_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Rules whose work does not grow with the cohort once the cohort is large enough (they sample a capped set).
CAPPED = {"pool_training_voxels", "train", "reference_set", "plot_training", "dataset_description"}
#: One job of each stage on the longest dependency chain of a run.
CRITICAL_PATH = ["preprocess", "augment", "pool_training_voxels", "train", "reference_set",
                 "score_control", "calibrate", "probability", "evaluate"]


def cohort_config(n_subjects: int, voxel_size: float, output_dir: Path, seed: int) -> dict:
    n_controls = math.ceil(0.6 * n_subjects)
    return {
        "output_dir": str(output_dir),
        "demo": {"n_controls": n_controls, "n_patients": n_subjects - n_controls, "voxel_size": voxel_size,
                 "scheme": "3shell", "seed": seed},
    }


def run_cohort(n_subjects: int, args: argparse.Namespace) -> tuple[float, dict[str, list[dict[str, float]]]]:
    out = args.out / f"n{n_subjects}"
    configfile = args.out / f"n{n_subjects}.yaml"
    configfile.parent.mkdir(parents=True, exist_ok=True)
    configfile.write_text(yaml.safe_dump(cohort_config(n_subjects, args.voxel_size, out, args.seed)))
    start = time.perf_counter()
    with open(args.out / f"n{n_subjects}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--configfile",
                        str(configfile)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start, rule_rows(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[10, 40, 100])
    parser.add_argument("--voxel-size", type=float, default=6.0, help="mm (the demo's default is 3)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/anomri_scaling"))
    parser.add_argument("--extrapolate", type=int, default=1000, help="subjects of the cluster extrapolation")
    args = parser.parse_args(argv)
    runs = {}
    for n in args.subjects:
        wall, rows = run_cohort(n, args)
        runs[n] = rows
        print(f"{n} subjects: {wall / 60:.1f} min wall on {args.cores} cores, "
              f"{sum(len(j) for j in rows.values())} jobs", flush=True)
    sizes = list(runs)
    small, large = sizes[0], sizes[-1]
    rules = sorted({r for rows in runs.values() for r in rows}, key=lambda r: -sum(j["s"] for j in runs[large][r]))
    print(f"\nper rule: jobs / job-seconds / job CPU s / largest job s / largest max RSS MB at N = "
          f"{', '.join(map(str, sizes))}")
    print("| rule | " + " | ".join(f"N={n}" for n in sizes) + f" | job-s x{large}/{small} | RSS x{large}/{small} |")
    print("|---|" + "---|" * (len(sizes) + 2))
    for rule in rules:
        cells, totals, peaks = [], [], []
        for n in sizes:
            jobs = runs[n].get(rule, [])
            total = sum(j["s"] for j in jobs)
            peak = max((j["max_rss"] for j in jobs), default=math.nan)
            totals.append(total)
            peaks.append(peak)
            cpu = sum(j["cpu_time"] for j in jobs)
            cells.append(f"{len(jobs)} / {total:.0f} / {cpu:.0f} / {max((j['s'] for j in jobs), default=0):.0f} / "
                         f"{peak:.0f}")
        growth = totals[-1] / totals[0] if totals[0] else math.nan
        print(f"| {rule} | " + " | ".join(cells) + f" | {growth:.1f} | {peaks[-1] / peaks[0]:.2f} |")
    # Cluster extrapolation: every per-subject job runs in parallel, capped jobs once.
    rows = runs[large]
    per_subject = sum(sum(j["s"] for j in jobs) for rule, jobs in rows.items()
                      if rule not in CAPPED and rule != "demo_cohort") / large
    capped = sum(sum(j["s"] for j in jobs) for rule, jobs in rows.items() if rule in CAPPED)
    n = args.extrapolate

    def longest(rule: str) -> float:
        jobs = rows.get(rule, [])
        grows = len(jobs) == 1 and rule not in CAPPED  # one job over the whole cohort
        return max((j["s"] for j in jobs), default=0.0) * (n / large if grows else 1.0)

    path = sum(longest(rule) for rule in CRITICAL_PATH)
    print(f"\n{n} subjects (a real cohort: no simulator job): ~{(per_subject * n + capped) / 3600:.1f} job-hours "
          f"({per_subject:.0f} job-s per subject x {n} + {capped:.0f} job-s capped); the longest chain of single "
          f"jobs, the least wall time with unlimited nodes, is ~{path / 60:.0f} min.")


if __name__ == "__main__":
    main()
