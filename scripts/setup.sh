#!/usr/bin/env bash
# Create .venv (if needed) and install leafpass with everything its tests, demo and
# benchmarks use. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Pin torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# DeepSpeed builds from its sdist; build no native ops (nothing here needs them).
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[test,deepspeed,transformers,accelerate]" "torch==2.13.0"
