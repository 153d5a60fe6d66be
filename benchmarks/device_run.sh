#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no network, Python 3.12 with torch): install the wheels
# that benchmarks/device_wheels.sh fetched into .whl/, then doctor, gpu-check, the trainer benchmark
# on CUDA and the published table, everything logged under $OUT with results/published/ as one tarball.
#   device run: carry [".whl"], command "bash benchmarks/device_run.sh", timeout_s 600
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "error: could not install the carried wheels in .whl/ (run benchmarks/device_wheels.sh first)"; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
python3 -m bptt_harness doctor 2>&1 | tee "$OUT/doctor.txt"
timeout 150 python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu-check.log"
timeout 90 python3 benchmarks/bench_trainer.py --device cuda --rounds 3 2>&1 | tee "$OUT/bench-trainer.log"
bash benchmarks/gpu_table.sh --max-seconds "${GPU_TABLE_SECONDS:-300}" 2>&1 | tee "$OUT/gpu-table.log"
tar -czf "$OUT/published.tgz" results/published
