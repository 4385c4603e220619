#!/usr/bin/env bash
# Every benchmark, one after the other (about 6 minutes on 2 cores); pass --quick for a smoke run.
# Each prints a table and writes a JSON line; the broker and command-latency ones also write
# benchmarks/results/*.json. Run on a quiet machine: the figures are wall-clock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for bench in bench_broker bench_command_latency bench_acl bench_commands bench_crl bench_lifecycle bench_firmware \
    bench_uplink bench_scale; do
  echo "== $bench"
  "$PY" "benchmarks/$bench.py" "$@"
done
