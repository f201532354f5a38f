#!/usr/bin/env bash
# Build, here, the wheels scripts/gpu-check.sh installs on a GPU machine that has no network.
#
#   bash scripts/gpu-wheels.sh            # -> .gpu-wheels/ (ignored by git), then prints its size
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA), transformers 5.17, accelerate 1.15 and
# pytest, no DeepSpeed and no network; at most 64 MiB of files travel with each call. So this
# folder holds, for CPython 3.12 on x86_64 Linux:
#   - leafpass (this checkout) and DeepSpeed 0.19.8 built with DS_BUILD_OPS=0 (pure Python);
#   - transformers 5.24 and what it needs, DeepSpeed's own requirements (hjson, msgpack, ninja,
#     py-cpuinfo, pydantic, einops, psutil), expecttest and pytest-timeout;
#   - never torch (the machine's stays) nor numpy (torch's own is there already).
# MANIFEST lists every wheel with its size; the script fails if the total is 64 MiB or more.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${GPU_WHEELS:-.gpu-wheels}
py=.venv/bin/python
if [ ! -x "$py" ]; then
  echo "scripts/gpu-wheels.sh: run 'bash scripts/setup.sh' first (it builds with .venv's setuptools and DeepSpeed's sdist)" >&2
  exit 1
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
rm -rf "$out"
mkdir -p "$out"
# leafpass and DeepSpeed: built here (DeepSpeed's setup.py imports torch, so no build isolation)
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" .
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "deepspeed==0.19.8"
# the rest: binary wheels for the GPU machine's interpreter, resolved for it, torch left out
"$py" -m pip download -q -d "$out" --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  "transformers==5.24.*" hjson msgpack ninja py-cpuinfo "pydantic>=2" einops psutil tqdm packaging \
  "expecttest>=0.3" "pytest-timeout>=2.3"
rm -f "$out"/numpy-*.whl "$out"/torch-*.whl "$out"/nvidia_*.whl "$out"/triton-*.whl
for whl in "$out"/*.whl; do
  case "$(basename "$whl")" in
    deepspeed-*-py3-none-any.whl|*-py3-none-any.whl|*-py2.py3-none-any.whl|*cp312*|*abi3*|*-py3-none-manylinux*) ;;
    *) echo "scripts/gpu-wheels.sh: $(basename "$whl") will not install on CPython 3.12" >&2; exit 1 ;;
  esac
done
(cd "$out" && ls -l *.whl | awk '{print $5, $9}' > MANIFEST)
total=$(awk '{s += $1} END {print s}' "$out/MANIFEST")
echo "$(wc -l < "$out/MANIFEST") wheels in $out, $((total / 1024)) KiB"
if [ "$total" -ge $((64 * 1024 * 1024)) ]; then
  echo "scripts/gpu-wheels.sh: $out holds $((total / 1024 / 1024)) MiB; at most 64 MiB travel to the GPU machine" >&2
  exit 1
fi
