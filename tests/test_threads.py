"""Threads that mean something (issue 14): ``anomri --threads N`` reaches torch, BLAS/OpenMP and the search
code, and every workflow rule passes its ``threads`` and records a ``benchmark:`` file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info

from anomri.cli import THREAD_VARIABLES, build_parser

REPO = Path(__file__).resolve().parents[1]
RULE_FILES = sorted((REPO / "workflow" / "rules").glob("*.smk"))


def test_global_threads_reach_torch_blas_and_search(run_cli, tmp_path: Path, restore_threads) -> None:
    from anomri.scores.search import _workers

    torch.set_num_threads(2)
    result = run_cli(["--threads", "1", "dataset-description", "--derivatives-dir", str(tmp_path / "out"),
                      "--source", str(tmp_path)])
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "dataset_description.json").exists()
    assert torch.get_num_threads() == 1
    assert _workers() == 1  # the cKDTree queries of the nearest-neighbour search
    pools = threadpool_info()
    assert pools and all(p["num_threads"] == 1 for p in pools), pools
    assert all(os.environ[name] == "1" for name in THREAD_VARIABLES)  # libraries loaded later, child processes


def test_torch_imported_after_the_limit_takes_it(tmp_path: Path) -> None:
    """torch, first imported inside a command (dataset-description reads the score registry for
    descriptions.tsv), keeps to --threads: the limit is applied before any command runs."""
    code = ("import sys; from anomri.cli import main; print('torch' in sys.modules); "
            f"main(['--threads', '1', 'dataset-description', '--derivatives-dir', {str(tmp_path)!r}, "
            f"'--source', {str(tmp_path)!r}]); "
            "import torch; print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["False", "1"]


def test_train_threads_is_the_global_option() -> None:
    parser = build_parser()
    train = ["train", "--pool", "p.npz", "--out", "m.pt", "--history", "h.tsv"]
    assert parser.parse_args(train).threads is None
    assert parser.parse_args(["--threads", "3", *train]).threads == 3
    assert parser.parse_args([*train, "--threads", "4"]).threads == 4  # the older spelling, kept


def test_non_positive_threads_rejected(run_cli, tmp_path: Path, restore_threads) -> None:
    result = run_cli(["--threads", "0", "dataset-description", "--derivatives-dir", str(tmp_path),
                      "--source", str(tmp_path)])
    assert result.code == 2
    assert "--threads" in result.err and not (tmp_path / "dataset_description.json").exists()


def test_demo_cohort_workers_are_its_threads(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             restore_threads) -> None:
    import anomri.demo.cohort

    seen = []
    monkeypatch.setattr(anomri.demo.cohort, "make_demo_cohort", lambda out, **kw: seen.append(kw["workers"]))
    for argv in (["--threads", "3"], []):
        assert run_cli([*argv, "demo-cohort", str(tmp_path / "bids")]).code == 0
    assert seen == [3, 2]  # --threads N: N subjects at once; default 2


def rules(path: Path) -> dict[str, str]:
    """The text of every rule of a .smk file, by name."""
    text = path.read_text()
    starts = [(m.group(1), m.start()) for m in re.finditer(r"^\s*rule (\w+):", text, re.M)]
    return {name: text[start:end] for (name, start), (_, end) in zip(starts, starts[1:] + [("", len(text))])}


def test_every_rule_passes_its_threads_and_records_a_benchmark() -> None:
    found = {name: body for path in RULE_FILES for name, body in rules(path).items()}
    actions = {name: body for name, body in found.items() if "shell:" in body}
    assert len(actions) >= 20
    assert all("shell:" in body or "run:" not in body for body in found.values())  # every action is a shell command
    for name, body in actions.items():
        assert re.search(r"^\s*threads: ", body, re.M), f"rule {name}: no threads"
        command = '"$ANOMRI_PYTHON" -m anomri --log {log:q} --threads {threads:q} '
        assert command in body, f"rule {name}: --threads not passed"
        assert body.count("$ANOMRI_PYTHON") == 1, f"rule {name}: several commands"
        # benchmarks/<rule>/..., with every wildcard of the rule's log (its outputs' wildcards).
        bench = re.search(r"^\s*benchmark:\s*\n\s*benchmark_file\(([^)]*)\),?$", body, re.M)
        assert bench, f"rule {name}: no benchmark"
        assert bench.group(1).split(",")[0].strip() == f'"{name}"', f"rule {name}: benchmark under another rule"
        log = re.search(r"^\s*log:\s*\n(.*)\n", body, re.M).group(1)
        assert set(re.findall(r"\{\w+\}", log)) == set(re.findall(r"\{\w+\}", bench.group(1))), name


def test_rules_that_gain_from_threads_declare_them_from_config() -> None:
    found = {name: body for path in RULE_FILES for name, body in rules(path).items()}
    declared = {name: re.search(r"^\s*threads: (.*)$", body, re.M).group(1)
                for name, body in found.items() if "shell:" in body}
    assert declared["train"] == 'config["training"]["threads"]'
    scoring = ("reference_set", "score_control", "score_ensemble")
    assert {declared[r] for r in scoring} == {'config["scoring"]["threads"]'}
    assert {declared[r] for r in ("images_train", "images_score")} == {"IMAGE_THREADS"}
    assert declared["demo_cohort"] == "2"
    several = {"train", *scoring, "images_train", "images_score", "demo_cohort"}
    assert {name: d for name, d in declared.items() if name not in several} == {
        name: "1" for name in declared if name not in several}
