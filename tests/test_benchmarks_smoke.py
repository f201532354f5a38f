"""Smoke test: ``benchmarks/compile_backends.py --quick`` runs and writes a complete JSON.

Only structure and graph-break counts are checked; speed goals live in the benchmark's own
output (``goals``), never in tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "compile_backends.py"

ROW_KEYS = {
    "model",
    "backend",
    "graphs",
    "graphs_total",
    "recompiles",
    "pieces",
    "graph_breaks",
    "graph_breaks_total",
    "compile_s",
    "first_forward_s",
    "first_backward_s",
    "median_ms",
    "step_stats",
    "loss_match",
    "grads_match",
    "peak_rss_mb",
}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "compile_backends.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # ~60 s on 2 busy cores, mostly cold inductor compiles of the MoE model
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert out.exists(), proc.stdout[-2000:]
    result = json.loads(out.read_text())
    result["_stdout"] = proc.stdout
    return result


def _row(result: dict, model: str, backend: str) -> dict:
    rows = [r for r in result["rows"] if r["model"] == model and r["backend"] == backend]
    assert len(rows) == 1, f"expected one {model}/{backend} row, got {len(rows)}"
    return rows[0]


@pytest.mark.timeout(300)
def test_json_has_environment_config_and_all_rows(quick_result):
    env = quick_result["environment"]
    for key in ("torch", "torch_threads", "cpu_count"):
        assert key in env
    assert quick_result["config"]["quick"] is True
    assert quick_result["config"]["threads"] == env["torch_threads"]
    pairs = {(r["model"], r["backend"]) for r in quick_result["rows"]}
    assert pairs == {(m, b) for m in ("two_moe", "many_tiny") for b in ("eager", "inductor", "z3leaf")}
    for row in quick_result["rows"]:
        missing = ROW_KEYS - set(row)
        assert not missing, f"{row['model']}/{row['backend']} lacks {sorted(missing)}"
        assert row["median_ms"] > 0 and row["compile_s"] > 0
        assert row["step_stats"]["n"] == quick_result["config"]["steps"]
    assert set(quick_result["goals"]) == {"two_moe", "many_tiny"}
    assert "| model" in quick_result["table"] and "| model" in quick_result["_stdout"]


@pytest.mark.timeout(300)
def test_z3leaf_has_no_graph_break_where_inductor_has_some(quick_result):
    inductor = _row(quick_result, "two_moe", "inductor")
    z3leaf = _row(quick_result, "two_moe", "z3leaf")
    assert inductor["graph_breaks"] > 0
    assert z3leaf["graph_breaks"] == 0
    assert z3leaf["graph_breaks_total"] == 0
    assert z3leaf["graphs"] == 1
    assert quick_result["goals"]["two_moe"]["zero_breaks"]["met"] is True
    for backend in ("eager", "inductor", "z3leaf"):
        assert _row(quick_result, "two_moe", backend)["loss_match"] is True


@pytest.mark.timeout(300)
def test_eager_rows_have_no_compile_figures(quick_result):
    for model in ("two_moe", "many_tiny"):
        eager = _row(quick_result, model, "eager")
        assert eager["graphs"] is None and eager["graph_breaks"] is None
        assert _row(quick_result, model, "z3leaf")["graph_breaks"] == 0
