#!/usr/bin/env bash
# One command on a machine with CUDA GPUs: install what travels, run the CUDA tests and the
# Mixtral ZeRO-3 benchmark, write one table.
#
#   bash scripts/gpu-check.sh              # on the GPU machine, from the repository root
#   bash scripts/gpu-check.sh --dry-run    # anywhere: everything but the CUDA work
#
# Before: `bash scripts/gpu-wheels.sh` here fills .gpu-wheels/ (DeepSpeed 0.19.8, transformers
# 5.24, leafpass, ...; under 64 MiB) and the folder travels with the checkout.
# Steps:
#   1. checks .gpu-wheels/ against its MANIFEST and the 64 MiB limit;
#   2. makes a venv in .gpu-check/venv that sees the machine's own packages (its torch
#      2.11+cu130 stays) and installs the wheels with --no-deps --no-index (no network);
#   3. runs the tests marked `cuda` (tests/test_cuda.py on one GPU; tests/distributed/
#      test_cuda_zero3.py with NCCL, one rank per GPU);
#   4. runs benchmarks/gpu_mixtral.py: eager ZeRO-3, DeepSpeed + inductor and z3leaf, bf16;
#   5. writes .gpu-check/out/gpu-check.md (the table and the test summary) and the JSON.
# Each step has a time limit; all of it fits in 8 minutes.
# --dry-run: steps 1 and 2 for real (with the python given by PYTHON, default python3), then
# collects the `cuda` tests instead of running them, parses the benchmark's arguments and runs
# its CPU smoke (gloo, 1 rank, tiny model, z3leaf). Options: --wheels DIR, --out DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
wheels=.gpu-wheels
work=.gpu-check
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --wheels) wheels=$2; shift ;;
    --out) work=$2; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "scripts/gpu-check.sh: unknown argument $1 (use --dry-run, --wheels DIR, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-python3}
out=$work/out
venv=$work/venv
mkdir -p "$out"
log() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }
fail() { echo "scripts/gpu-check.sh: $*" >&2; exit 1; }

# 1. the wheels
[ -f "$wheels/MANIFEST" ] || fail "$wheels/MANIFEST is missing: run 'bash scripts/gpu-wheels.sh' on a machine with network first"
total=0
while read -r size name; do
  [ -f "$wheels/$name" ] || fail "$wheels/$name is in MANIFEST but missing"
  total=$((total + size))
done < "$wheels/MANIFEST"
[ "$total" -lt $((64 * 1024 * 1024)) ] || fail "$wheels holds $((total / 1048576)) MiB; at most 64 MiB travel"
for need in leafpass deepspeed transformers; do
  if ! ls "$wheels"/"$need"-*.whl > /dev/null 2>&1; then
    # a dry run may go on where the interpreter below has it already (a CPU checkout's .venv)
    if [ "$dry_run" = 1 ] && [ "$need" != leafpass ] && "${PYTHON:-python3}" -c "import $need" 2>/dev/null; then
      log "dry run: no $need wheel in $wheels (the GPU machine needs one: bash scripts/gpu-wheels.sh)"
    else
      fail "no $need wheel in $wheels: run 'bash scripts/gpu-wheels.sh'"
    fi
  fi
done
log "$(wc -l < "$wheels/MANIFEST") wheels, $((total / 1024)) KiB in $wheels"

# 2. the venv: the machine's packages underneath (a .pth naming its site-packages, which is what
# --system-site-packages gives, also when PYTHON is itself a venv's), the wheels on top
"$py" -c 'import torch' 2>/dev/null || fail "$py cannot import torch; set PYTHON to an interpreter that has it"
rm -rf "$venv"
# no pip inside (a system Python may lack ensurepip): the machine's pip installs into it
"$py" -m venv --without-pip "$venv"
vpy=$venv/bin/python
base_sites=$("$py" -c 'import site, sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))')
venv_site=$("$vpy" -c 'import site; print(site.getsitepackages()[0])')
echo "$base_sites" > "$venv_site/_gpu_check_base.pth"
# the wheels this interpreter takes: all of them on the GPU machine (CPython 3.12); a dry run
# elsewhere leaves out the binary ones built for 3.12 and says so
selected=$("$py" - "$wheels" <<'PY'
import pathlib, sys
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
ours = set(sys_tags())
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    fits = any(tag in ours for tag in parse_wheel_filename(whl.name)[3])
    print(("" if fits else "-") + str(whl))
PY
)
install=$(echo "$selected" | grep -v '^-' || true)
skipped=$(echo "$selected" | grep -c '^-' || true)
if [ "$skipped" -gt 0 ]; then
  [ "$dry_run" = 1 ] || fail "$skipped wheel(s) in $wheels do not fit $("$py" --version): $(echo "$selected" | grep '^-' | tr '\n' ' ')"
  log "dry run: $skipped wheel(s) for another Python left out here (the machine's own packages stand in)"
fi
# shellcheck disable=SC2086
"$py" -m pip --python "$vpy" install -q --disable-pip-version-check --no-deps --no-index --no-cache-dir $install
"$vpy" - <<'PY' | tee "$out/versions.txt"
import importlib.metadata as md, sys, torch
import deepspeed, transformers, leafpass  # noqa: F401  (all three import)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}, leafpass {md.version('leafpass')}, "
      f"CUDA GPUs {torch.cuda.device_count()}")
PY

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$dry_run" = 1 ]; then
  export DS_ACCELERATOR=cpu
  # 3. collect the cuda tests
  collected=$("$vpy" -m pytest -q --collect-only -m cuda tests -p no:cacheprovider | grep -c '::' || true)
  [ "$collected" -gt 0 ] || fail "no test marked cuda was collected"
  log "dry run: $collected tests marked cuda collected"
  # 4. the benchmark: its arguments as the real run gives them, then the CPU smoke
  "$vpy" benchmarks/gpu_mixtral.py --parse-only --ranks 1 > "$out/settings.json"
  timeout 300 "$vpy" benchmarks/gpu_mixtral.py --smoke --ways z3leaf --out "$out" > "$out/benchmark.log" 2>&1 \
    || { tail -20 "$out/benchmark.log"; fail "the benchmark's CPU smoke failed"; }
  log "dry run: benchmark smoke table in $out/gpu_mixtral.md"
  cat "$out/gpu_mixtral.md"
  log "dry run passed (no CUDA work done)"
  exit 0
fi

export DS_ACCELERATOR=cuda
gpus=$("$vpy" -c 'import torch; print(torch.cuda.device_count())')
[ "$gpus" -gt 0 ] || fail "torch sees no CUDA GPU here; use --dry-run"
status=0
# 3. the cuda tests (the distributed ones start one NCCL rank per GPU themselves)
timeout 170 "$vpy" -m pytest -q -m cuda tests -p no:cacheprovider -rs --timeout 150 > "$out/tests.log" 2>&1 || status=$?
tests_line=$(tail -1 "$out/tests.log")
log "cuda tests: $tests_line"
# 4. the benchmark
timeout 290 "$vpy" benchmarks/gpu_mixtral.py --out "$out" --timeout 120 > "$out/benchmark.log" 2>&1 || status=$?
tail -6 "$out/benchmark.log"
# 5. one table
{
  echo "# scripts/gpu-check.sh on $(hostname) $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  cat "$out/versions.txt"
  echo
  echo "cuda tests: $tests_line"
  echo
  cat "$out/gpu_mixtral.md" 2>/dev/null || echo "(the benchmark wrote no table: see benchmark.log)"
} > "$out/gpu-check.md"
cat "$out/gpu-check.md"
exit $status
