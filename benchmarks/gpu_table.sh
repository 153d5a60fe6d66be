#!/usr/bin/env bash
# make gpu-table: the published bptt x batch-size table on this machine's GPU (see benchmarks/gpu_table.py).
# Writes results/published/<device label>/<study>/; arguments go to the script
# (e.g. --max-seconds S, or --allow-cpu --tiny --out DIR for a CPU rehearsal).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=python3
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
fi
exec "$PY" benchmarks/gpu_table.py "$@"
