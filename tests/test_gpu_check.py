"""``scripts/gpu-check.sh --dry-run``: everything the GPU machine's run does but the CUDA work.

The dry run checks the wheel folder, builds the venv over this interpreter's packages,
installs the wheels offline, collects the tests marked ``cuda`` and runs the Mixtral
benchmark's CPU smoke. Without ``.gpu-wheels/`` (made by ``scripts/gpu-wheels.sh``, which
needs the network) the test hands it a folder with this checkout's own wheel only; the dry
run then takes DeepSpeed and transformers from this interpreter and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(420)


def _wheels(tmp_path: Path) -> Path:
    made = ROOT / ".gpu-wheels"
    if (made / "MANIFEST").exists():
        return made
    folder = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
                    str(ROOT)], check=True, capture_output=True)
    lines = [f"{whl.stat().st_size} {whl.name}" for whl in sorted(folder.glob("*.whl"))]
    (folder / "MANIFEST").write_text("\n".join(lines) + "\n")
    return folder


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run", "--wheels", str(_wheels(tmp_path)),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dry run passed (no CUDA work done)" in done.stdout
    collected = int(done.stdout.split(" tests marked cuda collected")[0].rsplit(" ", 1)[1])
    assert collected >= 5, done.stdout
    settings = json.loads((out / "out" / "settings.json").read_text())
    assert settings["spec"]["device"] == "cuda" and settings["spec"]["dtype"] == "bfloat16"
    assert settings["ways"] == ["eager", "inductor", "z3leaf"]
    smoke = json.loads((out / "out" / "gpu_mixtral.json").read_text())
    rows = {row["way"]: row for row in smoke["rows"]}
    assert set(rows) == {"z3leaf"}
    assert rows["z3leaf"]["graphs"] == 1 and rows["z3leaf"]["graph_breaks"] == 0
    assert rows["z3leaf"]["leaves"] == 1  # DeepSpeed's leaf_module defaults flagged the MoE block
    assert 0 < rows["z3leaf"]["final_loss"] < 10
    assert "| z3leaf | 1 | 0 |" in (out / "out" / "gpu_mixtral.md").read_text()
    # the venv read leafpass's entry point from the installed wheel
    assert "leafpass 0.1.0" in (out / "out" / "versions.txt").read_text()


def test_gpu_check_refuses_a_folder_without_manifest(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run", "--wheels", str(tmp_path), "--out",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "MANIFEST is missing: run 'bash scripts/gpu-wheels.sh'" in done.stderr
