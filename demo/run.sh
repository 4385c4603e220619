#!/usr/bin/env bash
# The demo (README "See it work"): dev PKI, broker, devices, refusals, commands,
# revocation, signed firmware and renewal, end to end on this machine's loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/system-packages.sh   # softhsm2 holds the demo's firmware release keys
scripts/bootstrap.sh
exec .venv/bin/python demo/demo.py "$@"
