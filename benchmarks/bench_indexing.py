"""Time cohort indexing: anomri's own indexer against pybids, snakebids and bids2table.

Writes a synthetic BIDS tree of placeholder files (names are all an indexer reads; the JSON sidecars hold one key,
as pybids parses every one):
``--subjects`` participants x ``--sessions`` sessions x ``--runs`` DWI runs, each run with its
``.bval``/``.bvec``/``.json``, plus a T1w per session (which a full index also lists); the first
half of the participants has no ``.bval``/``.bvec`` of its own and inherits the top-level
``dwi.bval``/``dwi.bvec``. Each indexer then lists every DWI and the gradient files that apply to
it, and the answers are compared with anomri's.

anomri alone needs nothing more. The libraries, when installed, are timed too (in a separate
environment: ``pip install pybids bids2table snakebids``; snakebids pulls a snakemake newer than
anomri's pin)::

    python benchmarks/bench_indexing.py --subjects 200
    /path/to/other-venv/bin/python benchmarks/bench_indexing.py --subjects 200   # + the libraries
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomri.io.bids import index_cohort  # noqa: E402

logger = logging.getLogger("bench_indexing")

#: Per DWI: its image path -> (bval, bvec) paths, as an indexer found them.
Answer = dict[str, tuple[str, str]]


def write_cohort(root: Path, subjects: int, sessions: int, runs: int) -> int:
    """The synthetic tree; returns the number of files written."""
    files = [root / "dwi.bval", root / "dwi.bvec", root / "dataset_description.json"]
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{i:03d}" for i in range(subjects)]
    rows = ["participant_id\tgroup"] + [f"sub-{label}\t{'control' if i % 3 else 'patient'}"
                                        for i, label in enumerate(labels)]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    for i, label in enumerate(labels):
        for ses in range(1, sessions + 1):
            base = root / f"sub-{label}" / f"ses-{ses}"
            stem = f"sub-{label}_ses-{ses}"
            files += [base / "anat" / f"{stem}_T1w.nii.gz", base / "anat" / f"{stem}_T1w.json"]
            for run in range(1, runs + 1):
                extensions = [".nii.gz", ".json"] + ([".bval", ".bvec"] if i >= subjects // 2 else [])
                files += [base / "dwi" / f"{stem}_run-{run}_dwi{ext}" for ext in extensions]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        # pybids reads every JSON sidecar: an empty one is an error to it.
        path.write_text('{"RepetitionTime": 3.0}' if path.suffix == ".json" else "")
    (root / "dataset_description.json").write_text('{"Name": "bench", "BIDSVersion": "1.9.0"}')
    return len(files) + 1


def with_anomri(root: Path) -> Answer:
    return {str(s.dwi): (str(s.bval), str(s.bvec)) for s in index_cohort(root)}


def with_pybids(root: Path) -> Answer:
    """pybids' layout (every file and JSON sidecar in its database): the DWI paths."""
    from bids import BIDSLayout

    layout = BIDSLayout(root, validate=False)
    return {f.path: ("", "") for f in layout.get(suffix="dwi", extension=[".nii.gz", ".nii"])}


def pybids_gradients(root: Path, n: int) -> tuple[float, bool]:
    """Seconds per DWI of pybids' inheritance look-ups (``get_bval``, ``get_bvec``) over ``n`` DWIs, and whether
    they agree with anomri's; minutes for a whole cohort, so a sample."""
    from bids import BIDSLayout

    layout = BIDSLayout(root, validate=False)
    reference = with_anomri(root)
    sample = sorted(reference)[:: max(1, len(reference) // n)][:n]
    start = time.perf_counter()
    found = {path: (layout.get_bval(path), layout.get_bvec(path)) for path in sample}
    return (time.perf_counter() - start) / len(sample), all(found[p] == reference[p] for p in sample)


def with_snakebids(root: Path) -> Answer:
    """snakebids' inputs (pybids underneath): the DWI paths only; it resolves no gradient files."""
    from snakebids import generate_inputs

    inputs = generate_inputs(root, pybids_inputs={"dwi": {
        "filters": {"suffix": "dwi", "extension": ".nii.gz"}, "wildcards": ["subject", "session", "run"]}})
    return {path: ("", "") for path in inputs["dwi"].expand()}


def with_bids2table(root: Path) -> Answer:
    """bids2table's table of every file: the DWI paths only; it resolves no inheritance."""
    from bids2table import index_dataset

    table = index_dataset(root).to_pylist()
    return {str(Path(row["root"]) / row["path"]): ("", "") for row in table
            if row["suffix"] == "dwi" and row["ext"] in (".nii.gz", ".nii")}


INDEXERS: dict[str, tuple[str | None, Callable[[Path], Answer]]] = {
    "anomri": (None, with_anomri),
    "pybids": ("bids", with_pybids),
    "snakebids": ("snakebids", with_snakebids),
    "bids2table": ("bids2table", with_bids2table),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per indexer")
    parser.add_argument("--pybids-sample", type=int, default=40,
                        help="DWIs whose gradient files pybids looks up (timed per DWI)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("anomri").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        n_files = write_cohort(root, args.subjects, args.sessions, args.runs)
        logger.info("%d participants, %d files", args.subjects, n_files)
        reference = with_anomri(root)
        logger.info("%-11s %9s %6s  %s", "indexer", "best (s)", "DWIs", "agrees with anomri")
        for name, (module, indexer) in INDEXERS.items():
            if module and importlib.util.find_spec(module) is None:
                logger.info("%-11s %9s", name, "not installed")
                continue
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                answer = indexer(root)
                times.append(time.perf_counter() - start)
            same_scans = sorted(answer) == sorted(reference)
            same_gradients = all(answer[k] == reference[k] for k in reference) if same_scans else False
            verdict = ("scans and gradient files" if same_gradients else "scans only (gradients not resolved)"
                       if same_scans and not any(any(v) for v in answer.values()) else "NO")
            logger.info("%-11s %9.3f %6d  %s", name, min(times), len(answer), verdict)
        if importlib.util.find_spec("bids") is not None:
            per_dwi, agrees = pybids_gradients(root, args.pybids_sample)
            logger.info("pybids get_bval + get_bvec: %.3f s per DWI (x %d DWIs = %.0f s more); agrees with anomri: %s",
                        per_dwi, len(reference), per_dwi * len(reference), agrees)


if __name__ == "__main__":
    main()
