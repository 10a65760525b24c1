#!/usr/bin/env bash
# Create .venv and install anomri. Usage: bash scripts/setup.sh [demo|test]
#   demo: the package and workflow;  test: the same plus the test extras.
# torch is installed first and pinned to the CPU wheel (TORCH_SPEC to override,
# e.g. TORCH_SPEC="torch>=2.3" for a CUDA build), so pip never swaps in a
# multi-GB CUDA build on a CPU machine; pyproject.toml asks for a range it satisfies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
case "${1:-demo}" in
  test) .venv/bin/python -m pip install --quiet -e ".[test]" ;;
  *)    .venv/bin/python -m pip install --quiet -e . ;;
esac
