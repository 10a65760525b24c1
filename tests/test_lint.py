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
