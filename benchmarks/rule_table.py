"""Per-rule time, peak memory and CPU load of a finished workflow run, from its Snakemake benchmark files.

Every rule writes ``<output_dir>/benchmarks/<rule>/...tsv`` (``benchmark:``): one row per job with wall seconds
``s``, ``max_rss`` (MB) and ``cpu_time`` (s). This prints one markdown row per rule: jobs, the largest wall time,
the largest max RSS, the suggested ``mem_mb`` (``--margin`` x the largest max RSS, rounded up to 500 MB, at least
500) and the largest mean load (CPU seconds / wall seconds: cores busy on average, to compare with ``threads``).

Snakemake samples memory every 0.5 s for the first 30 s of a job, then every 30 s, so a short peak in a long job
can be missed: hence the margin.

Usage::

    python benchmarks/rule_table.py results/anomri
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def rule_rows(output_dir: Path) -> dict[str, list[dict[str, float]]]:
    """The benchmark rows of every rule, by rule name (the folder under ``benchmarks/``)."""
    rows: dict[str, list[dict[str, float]]] = {}
    for path in sorted((output_dir / "benchmarks").rglob("*.tsv")):
        rule = path.relative_to(output_dir / "benchmarks").parts[0]
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                rows.setdefault(rule, []).append(
                    {k: float(row[k]) if row[k] not in ("", "-", "NA") else math.nan
                     for k in ("s", "max_rss", "cpu_time")})
    return rows


def suggested_mem_mb(max_rss: float, margin: float) -> int:
    return max(500, math.ceil(margin * max_rss / 500) * 500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="output_dir of a finished workflow run")
    parser.add_argument("--margin", type=float, default=1.5, help="mem_mb = margin x largest max RSS")
    args = parser.parse_args()
    rows = rule_rows(args.output_dir)
    if not rows:
        raise SystemExit(f"rule_table: no benchmark files under {args.output_dir / 'benchmarks'}")
    print("| rule | jobs | max s | max_rss MB | mem_mb (x%g) | max mean load (cores) |" % args.margin)
    print("|---|---|---|---|---|---|")
    for rule, jobs in sorted(rows.items(), key=lambda kv: -max(j["s"] for j in kv[1])):
        rss = max(j["max_rss"] for j in jobs)
        load = max(j["cpu_time"] / j["s"] for j in jobs if j["s"] > 0)
        print(f"| {rule} | {len(jobs)} | {max(j['s'] for j in jobs):.1f} | {rss:.0f} | "
              f"{suggested_mem_mb(rss, args.margin)} | {load:.2f} |")


if __name__ == "__main__":
    main()
