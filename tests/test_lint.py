"""The workflow passes the Snakemake workflow catalog's quality checks: ``snakemake --lint`` and ``snakefmt --check``.

Both run from the repository root, as the catalog runs them (the default config.yaml; snakefmt's settings
in pyproject.toml), in a few seconds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


def test_snakemake_lint_finds_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Lints for" not in output, output[-4000:]


def test_snakefmt_leaves_the_workflow_unchanged() -> None:
    pytest.importorskip("snakefmt", reason="snakefmt is in the test extra: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--diff", "workflow"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def test_cluster_test_cohort_is_a_valid_config(tmp_path) -> None:
    """scripts/cluster-test.sh needs root and a SLURM install, so CI runs it only when time allows: at least its
    cohort must stay valid for the workflow's current rules (split sizes, probability scores among the computed)."""
    script = (REPO / "scripts" / "cluster-test.sh").read_text()
    start = script.index('cat > "$WORK/cohort.yaml" << EOF\n') + len('cat > "$WORK/cohort.yaml" << EOF\n')
    cohort = tmp_path / "cohort.yaml"
    cohort.write_text(script[start : script.index("\nEOF\n", start)] + "\n")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(cohort), "--config",
                             f"output_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
