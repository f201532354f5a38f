#!/usr/bin/env bash
# Set up .venv and run the demo: 2 CPU ranks, DeepSpeed ZeRO-3, compiled with z3leaf.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m leafpass demo "$@"
