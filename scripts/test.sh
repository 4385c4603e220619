#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls this).
# Installs what it needs, then: ruff, mypy --strict, the test suite, and a smoke run of
# the benchmarks (the full benchmarks are separate: see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-packages.sh
scripts/bootstrap.sh
PY=.venv/bin/python
echo "== ruff"
"$PY" -m ruff check .
echo "== mypy --strict"
"$PY" -m mypy
echo "== wheel (python -m build) and Dockerfile lint"
"$PY" -m build --wheel --outdir dist . > .build.log 2>&1 || { cat .build.log; exit 1; }
ls dist/*.whl
.venv/bin/hadolint Dockerfile
echo "== shared stores (PostgreSQL, Redis: the scale-out tests use them and fail, never skip, without them)"
"$PY" -m tests.support.stores || echo "!! a shared store is unreachable: its tests below will fail (they never skip)"
echo "== benchmark smoke (keeps every benchmark runnable; the figures come from full runs)"
benchmarks/run_all.sh --quick > .bench-smoke.log 2>&1 || { cat .bench-smoke.log; exit 1; }
grep -E '^== |target' .bench-smoke.log || true
echo "== pytest"
"$PY" -m pytest -q -p no:cacheprovider "$@"
