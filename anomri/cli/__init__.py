"""The ``anomri`` command line: one subcommand per pipeline step.

Each Snakemake rule calls exactly one of these. Bad input ends with one line
``anomri: error: <file>: <problem>`` on stderr and exit status 2 (``anomri bids``, the BIDS-App
entry to the whole workflow, uses the BIDS Apps exit codes instead: :class:`anomri.cli.bids.ExitCode`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from anomri import __version__
from anomri.cli import bids, demo, dmri, findings, images
from anomri.cli.registry import COMMANDS, report_error
from anomri.errors import InputError

__all__ = ["build_parser", "limit_threads", "main"]

#: Thread-count variables of OpenMP and the BLAS libraries, read when a library loads.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="anomri", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"anomri {__version__}")
    parser.add_argument("--log", help="also append log messages to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads of the command: torch, BLAS/OpenMP and the nearest-neighbour search "
                             "(what a scheduler reserved; default: every core)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bids.add_parser(sub)
    demo.add_parser(sub)
    dmri.add_parsers(sub)
    findings.add_parsers(sub)
    images.add_parsers(sub)
    return parser


def _setup_logging(log_file: str | None, verbose: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)


def limit_threads(threads: int) -> None:
    """Keep this process to ``threads`` CPU threads: torch, BLAS/OpenMP and the search code.

    The environment variables reach the libraries loaded later, and child processes: torch,
    imported only by the commands that need it (seconds and hundreds of MB), takes its intra-op
    thread count from ``OMP_NUM_THREADS``. torch, if already imported, and every BLAS/OpenMP
    library already loaded (numpy's) are limited at once. The nearest-neighbour search sizes its
    cKDTree workers from torch's count.
    """
    if threads < 1:
        raise InputError("--threads", f"must be positive; got {threads}")
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import numpy  # noqa: F401  (loads numpy's BLAS, so that threadpoolctl limits it)
    from threadpoolctl import threadpool_limits

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    threadpool_limits(limits=threads)


def _resolve_scores(selection: list[str]) -> list[str]:
    from anomri.scores import get_scores

    try:
        return [s.id for s in get_scores("all" if selection == ["all"] else selection)]
    except KeyError as exc:
        raise InputError("--scores", exc.args[0]) from exc


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``anomri`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log, args.verbose)
    try:
        if args.threads is not None:
            limit_threads(args.threads)
        if "scores" in args:
            args.scores = _resolve_scores(args.scores)
        code = COMMANDS[args.command](args)
    except InputError as exc:
        # One line, naming the file: the whole message a user needs.
        report_error(exc, args.log)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
