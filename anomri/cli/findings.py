"""The findings subcommands of every scan, labelled or not: clusters, plot-findings, cohort-page."""

from __future__ import annotations

import argparse
from pathlib import Path

from anomri.cli.registry import command
from anomri.errors import InputError
from anomri.settings import default


def _check_levels(levels: list[float]) -> None:
    if not all(0.0 < level < 1.0 for level in levels):
        raise InputError("--levels", f"false-positive levels must lie in (0, 1); got {levels}")


@command("clusters")
def run_clusters(args: argparse.Namespace) -> None:
    from anomri.io.derivatives import ScanDerivatives
    from anomri.maps.clusters import write_cluster_table

    _check_levels(args.levels)
    write_cluster_table(ScanDerivatives(Path(args.derivatives_dir), args.prefix), args.levels)


@command("plot-findings")
def run_plot_findings(args: argparse.Namespace) -> None:
    from anomri.report.figures import plot_findings

    _check_levels(args.levels)
    if args.n_clusters < 1:
        raise InputError("--n-clusters", f"must be positive; got {args.n_clusters}")
    plot_findings(args.derivatives_dir, args.prefix, args.levels, args.out, args.lesion_mask, args.n_clusters)


@command("cohort-page")
def run_cohort_page(args: argparse.Namespace) -> None:
    from anomri.report.cohort import write_cohort_page

    _check_levels(args.levels)
    write_cohort_page(args.derivatives_dir, args.quality, args.levels, args.out)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The parsers of the findings subcommands."""
    levels = {"type": float, "nargs": "+", "default": default("probability.levels"),
              "help": "healthy false-positive levels of the lesion masks (probability.levels)"}

    p = sub.add_parser("clusters", help="table of the flagged clusters of one scan at every lesion-mask level")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--prefix", required=True, help="sub-<label>[_ses-<label>]")
    p.add_argument("--levels", **levels)

    p = sub.add_parser("plot-findings",
                       help="-log10 p over the mean b0 through the largest flagged clusters of one scan")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--prefix", required=True, help="sub-<label>[_ses-<label>]")
    p.add_argument("--levels", **levels)
    p.add_argument("--lesion-mask", help="ground-truth lesion mask, drawn as a contour (optional)")
    p.add_argument("--n-clusters", type=int, default=3, help="slice through this many of the largest clusters")
    p.add_argument("--out", required=True, help=".png file")

    p = sub.add_parser("cohort-page", help="HTML page listing every scan's findings and quality checks")
    p.add_argument("--derivatives-dir", required=True)
    p.add_argument("--quality", required=True, help="quality.tsv from quality")
    p.add_argument("--levels", **levels)
    p.add_argument("--out", required=True, help=".html file; its links are relative to its folder")
