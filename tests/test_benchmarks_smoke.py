"""Smoke test: ``benchmarks/compile_backends.py --quick`` runs and writes a complete JSON;
``benchmarks/zero3_moe.py``'s default ways, columns and goal report (on made-up rows: no
ranks are started); ``benchmarks/hf_moe.py``: one way of a tiny Mixtral on one rank (inner
compiler ``eager``, so no Inductor compile) with its step breakdown, and its ratios and
goals on made-up rows.

Only structure and graph-break counts are checked; speed goals live in the benchmark's own
output (``goals``), never in tests (the zero3_moe test checks how goals are computed and
printed from given figures, not whether a real run meets them).
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


# ------------------------------------------- zero3_moe.py's report, without starting ranks


def _zero3_row(way: str, step_ms: float, peak: int, gathers: float, gather=None, settings=None, graphs=1,
               breaks=0) -> dict:
    from leafpass.tools import zero3_compare as zc

    backend, limits, way_gather = zc.WAY_SETUPS[way]
    return {
        "way": way, "backend": backend, "zero_limits": limits or "default", "gather": gather or way_gather,
        "gather_settings": settings, "graphs": graphs if backend else 0, "graph_breaks": breaks if backend else 0,
        "frames_skipped": 0, "all_gathers_per_step": gathers, "peak_gathered_elements": peak, "compile_s": 1.0,
        "median_step_ms": step_ms, "median_step_cpu_ms": step_ms / 2, "step_vs_eager": None,
        "phase_ms": {"forward_ms": 1.0, "backward_ms": 2.0, "optimizer_ms": 3.0}, "final_loss": 0.5,
        "losses_match_eager": True, "peak_rss_mb": [100.0, 200.0], "error": None,
    }


def test_zero3_moe_runs_the_module_way_by_default_and_checks_its_goal():
    from benchmarks import zero3_moe as bench

    args = bench.parse_args([])
    # the issue's ways in one run: eager (default and strict limits), engine.compile(inductor),
    # z3leaf step, z3leaf module
    assert {"eager", "eager_strict", "inductor", "z3leaf_step", "z3leaf_module"} <= set(args.way_list)
    assert "z3leaf_module" in args.diagnose_list
    headers = [h for _, h in bench.TABLE_COLUMNS]
    for header in ("gather", "median step ms", "graphs", "graph breaks", "all-gathers/step", "peak gathered elems",
                   "peak RSS MiB (max rank)"):
        assert header in headers

    rows = [
        _zero3_row("eager_strict", 200.0, 2_110_000, 46),
        _zero3_row("inductor_strict", 220.0, 2_110_000, 46, graphs=17, breaks=33),
        _zero3_row("z3leaf_strict", 190.0, 2_110_000, 40, gather="module",
                   settings={"bucket_elements": 0, "prefetch_distance": 0}),
        _zero3_row("z3leaf_module", 150.0, 2_105_344, 18,
                   settings={"bucket_elements": 600_000, "prefetch_distance": 0}),
    ]
    goals = bench.goals(rows)
    by_way = {x["way"]: x for x in goals["module_vs_eager_strict"]}
    assert set(by_way) == {"z3leaf_strict", "z3leaf_module"}
    assert by_way["z3leaf_module"]["met"] is True and by_way["z3leaf_module"]["ratio"] == pytest.approx(0.75)
    assert by_way["z3leaf_strict"]["met_time"] is False and by_way["z3leaf_strict"]["met_memory"] is True
    assert {x["inductor_way"] for x in goals["module_vs_inductor"]} == {"inductor_strict"}
    lines = bench.gap_lines(goals, None)
    module_line = next(line for line in lines if "z3leaf_module (bucket 600,000, prefetch 0)" in line)
    assert "<= 0.8x eager ZeRO-3 (strict limits) at no higher peak gathered elements" in module_line
    assert "150.0 vs 200.0 ms (0.75x, met" in module_line and "2.10534e+06 vs 2.11e+06 (met)" in module_line
    assert any("z3leaf_strict (bucket 0, prefetch 0): 190.0 vs 200.0 ms (0.95x, NOT met" in line for line in lines)
    cells = bench.table_cells(rows)
    assert [c["gather"] for c in cells] == ["-", "-", "module (bucket 0, prefetch 0)",
                                            "module (bucket 600,000, prefetch 0)"]
    assert cells[0]["peak_rss_mb"] == "200"


# ------------------------------------------------ hf_moe.py: one tiny way, then its report


@pytest.fixture(scope="module")
def hf_tiny_row() -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    from benchmarks import hf_moe

    case = hf_moe.Case("mixtral", "eager", "tiny", ranks=1, steps=3, warmup=1, profile_steps=1,
                       breakdown_ways=("z3leaf_step",), inner="eager", timeout=240.0)
    return hf_moe.run_way("z3leaf_step", case)


@pytest.mark.timeout(300)
def test_hf_moe_tiny_mixtral_compiles_one_graph_and_breaks_the_step_down(hf_tiny_row):
    from benchmarks.step_breakdown import BUCKETS, PHASES

    row = hf_tiny_row
    assert not row.get("error"), row.get("error")
    assert row["graphs"] == 1 and row["graph_breaks"] == 0, row["graph_break_reasons"]
    assert row["gather_policy"] == "step" and row["leaves"] == 1
    assert len(row["losses"]) == 1 and len(row["losses"][0]) == 3
    assert row["median_step_ms"] > 0 and row["median_cpu_ms"] > 0 and row["peak_rss_mb"] > 0
    b = row["breakdown_ms"]
    assert set(b) == set(PHASES) and all(set(b[p]) == set(BUCKETS) for p in PHASES)
    # the profiled step gathered the model and ran the leaf and the compiled pieces
    assert b["forward"]["gather"] > 0 and b["forward"]["leaf forward"] > 0 and b["forward"]["non-leaf forward"] > 0
    assert b["backward"]["grad path"] > 0  # DeepSpeed reduced the gradients


def test_hf_moe_compares_ways_and_reports_the_issue_goals(hf_tiny_row):
    from benchmarks import hf_moe

    def row(way, step_ms, rss, losses, compile_s=10.0):
        return {**hf_tiny_row, "way": way, "label": hf_moe.LABELS[way], "median_step_ms": step_ms,
                "median_cpu_ms": step_ms, "peak_rss_mb": rss, "losses": [losses],
                "compile_s": None if way == "eager" else compile_s}

    rows = [row("eager", 400.0, 1000.0, [2.0, 1.5]), row("inductor", 420.0, 1100.0, [2.0, 1.5], 60.0),
            row("z3leaf_step", 260.0, 900.0, [2.0, 1.5 + 1e-6], 30.0),
            row("z3leaf_module", 300.0, 800.0, [2.0, 1.7]), row("stage0_z3leaf", 250.0, 700.0, [2.0, 1.4])]
    hf_moe.compare_rows(rows)
    by = {r["way"]: r for r in rows}
    assert by["z3leaf_step"]["vs_eager"] == pytest.approx(0.65) and by["z3leaf_step"]["vs_limit"] == pytest.approx(1.04)
    assert by["z3leaf_step"]["losses_match_eager"] and not by["z3leaf_module"]["losses_match_eager"]
    case = hf_moe.Case("mixtral", "eager", "medium", 2, 8, 2, 0, ())
    goals = {g["goal"]: g for g in hf_moe.goals(rows, case)}
    assert goals["z3leaf <= 0.7x eager ZeRO-3"]["met"] and goals["z3leaf <= 1.3x the no-ZeRO limit"]["met"]
    assert goals["z3leaf compile s <= DeepSpeed + inductor's"]["value"] == pytest.approx(0.5)
    assert goals["z3leaf peak RSS <= eager ZeRO-3's"]["met"]
    assert all(g["way"] == "z3leaf_step" for g in goals.values())  # the fastest z3leaf way
    text = hf_moe.table(rows)
    assert "z3leaf gather=step" in text and "0.65x" in text


def test_module_call_overhead_runs_and_writes_its_json(tmp_path):
    """``benchmarks/module_call_overhead.py`` with tiny sizes: a table, a JSON with both ways."""
    out = tmp_path / "module_call_overhead.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "module_call_overhead.py"), "--modules", "20",
         "--rounds", "2", "--forwards", "2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [r["way"] for r in result["rows"]] == ["torch (no leafpass)", "import leafpass"]
    assert result["module_calls_per_forward"] == 21
    assert all(len(t) == 2 for t in result["times_s"].values())
    assert "per module call" in proc.stdout and "leafpass's __call__ wrapper" in proc.stdout
