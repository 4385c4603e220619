#!/usr/bin/env bash
# The demo (README "See it work"): dev PKI, broker, devices, refusals, commands,
# revocation, signed firmware and renewal, end to end on this machine's loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
# softhsm2 holds the demo's firmware release keys; pip's and apt's chatter goes to a file,
# so the demo's stderr is only the programs' JSON lines
{ scripts/system-packages.sh && scripts/bootstrap.sh; } > .bootstrap.log 2>&1 || { cat .bootstrap.log >&2; exit 1; }
exec .venv/bin/python demo/demo.py "$@"
