#!/usr/bin/env bash
# Run leafpass's tests against another torch release than CI's pin (2.13.0).
#
#   bash scripts/test-torch.sh 2.11.0                 # the whole suite
#   bash scripts/test-torch.sh 2.14.1 -m "not distributed"   # pytest arguments after the version
#
# Makes (or reuses) a virtual environment OUTSIDE the repository, in
# ${LEAFPASS_VENVS:-$HOME/.cache/leafpass/venvs}/torch-VERSION, with that torch, DeepSpeed
# 0.19.8 (DS_BUILD_OPS=0), transformers 5.24, accelerate 1.16 and the test tools, installs this
# checkout into it (editable, no dependencies), checks that torch is still the version asked
# for, and runs pytest from the repository root. torch releases other than the pin are CUDA
# builds from PyPI (several GB each): the first run downloads them, later runs reuse the venv.
# Set VENV=/path to use a venv of your own.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash scripts/test-torch.sh TORCH_VERSION [pytest args...]   (e.g. 2.11.0)" >&2
  exit 2
fi
version=$1
shift
venv=${VENV:-${LEAFPASS_VENVS:-$HOME/.cache/leafpass/venvs}/torch-$version}
py=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
have=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ "${have%%+*}" != "$version" ]; then
  "$venv/bin/python" -m pip install -q "torch==$version"
fi
# Every later install names the torch pin, so no resolver step can swap it.
DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q "torch==$version" "deepspeed==0.19.8" \
  "transformers==5.24.*" "accelerate==1.16.*" "pytest>=8" "pytest-timeout>=2.3" "expecttest>=0.3" \
  "setuptools>=70.1,<82"  # builds wheels itself (bdist_wheel): the wheel tests; a new venv has 65.x
"$venv/bin/python" -m pip install -q --no-deps -e .
have=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
if [ "${have%%+*}" != "$version" ]; then
  echo "scripts/test-torch.sh: asked for torch $version but $venv has $have" >&2
  exit 1
fi
echo "torch $have in $venv"
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
status=0
"$venv/bin/python" -m pytest -q "$@" || status=$?
echo "torch $have: pytest exit $status in $(( $(date +%s) - start )) s"
exit $status
