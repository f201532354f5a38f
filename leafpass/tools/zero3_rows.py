"""The parent side of :mod:`.zero3_compare`: one row per way from its ranks' figures
(:data:`DEFINITIONS` says what each key means), a row for a way that failed, and the
comparison with eager ZeRO-3."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .zero3_ways import LOSS_TOLERANCE, WAY_SETUPS, CompareSpec, z3leaf_options

__all__ = ["DEFINITIONS", "ROW_KEYS", "attach_comparison", "failed_row", "loss_diff", "row_of"]

DEFINITIONS = {
    "way": "eager: the engine not compiled; inductor: engine.compile(backend='inductor'); z3leaf: "
    "engine.compile(backend='z3leaf') with gather='auto'; z3leaf_step / z3leaf_hooks: the same with "
    "gather='step' / 'hooks'; a _strict suffix: with strict ZeRO-3 limits instead of the spec's "
    "(z3leaf_strict: gather='auto', which resolves to 'module' there); z3leaf_module: gather='module' "
    "under strict limits with the z3leaf options in WAY_OPTIONS",
    "zero_limits": "the ZeRO-3 limits preset the way ran with (ZERO_PRESETS)",
    "gather": "z3leaf ways: the gather policy leafpass ran with (gather='auto' resolved)",
    "z3leaf_options": "z3leaf ways: the options passed to the backend (inner, gather and WAY_OPTIONS)",
    "gather_settings": "ways whose gather resolved to 'module': the bucket_elements and prefetch_distance it "
    "ran with (the options', else the engine's stage3_prefetch_bucket_size and 1, or 0 when that is 0)",
    "peak_gathered_elements": "most ZeRO-3 parameter elements gathered at once during a steady step, max over "
    "ranks (leafpass.tools.deepspeed_probe.GatheredElementsTracker): DeepSpeed's AVAILABLE parameters plus "
    "the buffers and weights gather='module''s in-graph gathers hold (gather_ops.live_gathered); gathers in "
    "flight count from their start; persistent parameters left out",
    "graphs": "graphs Dynamo compiled in rank 0 over the whole run "
    "(torch._dynamo.utils.counters['stats']['unique_graphs']); 0 for eager",
    "graph_breaks": "graph breaks in rank 0 over the whole run (sum of counters['graph_break']); 0 for eager",
    "frames_skipped": "rank 0: frames Dynamo gave up on and ran eagerly instead of splitting them "
    "(sum of counters['unimplemented']: e.g. a data-dependent op inside a loop, generators, the recompile "
    "limit); not in graph_breaks; 0 for eager",
    "recompile_limit_hits": "rank 0: times Dynamo hit config.recompile_limit for a frame "
    "(it runs eagerly from then on)",
    "all_gathers_per_step": "all-gather collectives rank 0 issued per steady step (median; "
    "leafpass.tools.deepspeed_probe.count_collectives, one call of a process-group collective = one)",
    "compile_s": "rank 0: wall seconds of the warm-up steps minus as many median steady steps: the first "
    "step (trace + compile) and the second (recompiles for what new routing changed, e.g. dynamic shapes)",
    "first_step_compile_s": "rank 0: wall seconds of the first step minus the median steady step",
    "median_step_ms": "rank 0: median wall ms of forward + engine.backward + engine.step over the steady "
    "steps (the steps after the warm-up)",
    "median_step_cpu_ms": "rank 0: median CPU time (time.process_time, all its threads) of the same steady "
    "steps; a rank runs one torch thread, so this is its own work, less sensitive to other load on the "
    "machine than wall time, but without the time spent waiting for the other rank",
    "final_loss": "rank 0's loss at the last step",
    "losses_match_eager": f"max |loss - eager's loss| over every step of every rank <= {LOSS_TOLERANCE:g}",
    "peak_rss_mb": "peak resident set size of each rank process over its whole life (resource.getrusage "
    "RUSAGE_SELF ru_maxrss, read after the last step: imports, DeepSpeed setup, compiles and steps), MiB; each "
    "way runs in fresh rank processes, so it is that way's own",
    "load_average": "os.getloadavg() when the way finished (1, 5, 15 minutes): other load on the machine",
    "error": "why the way failed (its rank's last error line), None if it ran",
    "hooks": "hook_timing pass only: rank 0's seconds per steady step inside DeepSpeed ZeRO-3's "
    "per-module fetch/release functions (called by its forward pre/post hooks and its backward "
    "autograd functions), split leaf / non-leaf and forward / backward, plus leafpass's prefetch_all",
}


ROW_KEYS = (
    "way", "backend", "inner", "zero_limits", "gather", "z3leaf_options", "gather_settings",
    "peak_gathered_elements", "graphs", "graph_breaks",
    "all_gathers_per_step", "compile_s",
    "first_step_compile_s", "first_step_s", "median_step_ms", "median_step_cpu_ms",
    "median_step_cpu_ms_per_rank", "final_loss", "losses", "losses_match_eager", "loss_max_abs_diff",
    "step_vs_eager", "graphs_after_first_step", "graph_breaks_after_first_step", "graph_break_reasons",
    "frames_skipped", "frames_skipped_reasons", "recompile_limit_hits", "step_ms", "phase_ms",
    "collectives_per_step", "all_gathers_per_step_max_rank", "peak_rss_mb", "load_average", "setup_s",
    "wall_s", "hook_timing", "hooks", "error",
)


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def hook_summary(r0: dict[str, Any], steady: slice) -> dict[str, Any] | None:
    """Per steady step medians of rank 0's hook times (ms) and calls."""
    hook_steps = r0["hook_seconds"][steady]
    if not hook_steps:
        return None
    keys = sorted({k for s in hook_steps for k in s})
    per_key_ms = {k: median_or_none([s.get(k, 0.0) * 1e3 for s in hook_steps]) for k in keys}
    calls = {k: median_or_none([c.get(k, 0) for c in r0["hook_calls"][steady]]) for k in keys}
    step_ms = [s * 1e3 for s in r0["step_s"][steady]]
    ds_keys = [k for k in keys if not k.startswith("prefetch_all")]
    nonleaf = [sum(s.get(k, 0.0) for k in ds_keys if k.endswith(".nonleaf")) * 1e3 for s in hook_steps]
    leaf = [sum(s.get(k, 0.0) for k in ds_keys if k.endswith(".leaf")) * 1e3 for s in hook_steps]
    prefetch = [s.get("prefetch_all.leaf", 0.0) * 1e3 for s in hook_steps]
    total = [a + b + c for a, b, c in zip(nonleaf, leaf, prefetch)]
    out: dict[str, Any] = {
        "per_kind_ms": per_key_ms,
        "calls_per_step": calls,
        "nonleaf_ms": median_or_none(nonleaf),
        "leaf_ms": median_or_none(leaf),
        "prefetch_all_ms": median_or_none(prefetch),
        "total_ms": median_or_none(total),
        "nonleaf_calls": sum(v for k, v in calls.items() if k.endswith(".nonleaf")),
        "step_ms": median_or_none(step_ms),
        "nonleaf_fraction": median_or_none([n / s for n, s in zip(nonleaf, step_ms) if s > 0]),
        "total_fraction": median_or_none([t / s for t, s in zip(total, step_ms) if s > 0]),
    }
    runs = r0["graph_runs"][steady]
    if runs:
        out["graph_runs_per_step"] = median_or_none([g["runs"] for g in runs])
        out["in_forward_graphs_ms"] = median_or_none([g["seconds"] * 1e3 for g in runs])
        fwd = [p["forward_s"] * 1e3 for p in r0["phases"][steady]]
        out["forward_ms"] = median_or_none(fwd)
        out["forward_outside_graphs_fraction"] = median_or_none(
            [(f - g["seconds"] * 1e3) / f for f, g in zip(fwd, runs) if f > 0]
        )
    return out


def row_of(way: str, spec: CompareSpec, ranks: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    r0 = ranks[0]
    steady = slice(spec.warmup, None)
    steady_s = r0["step_s"][steady]
    median_s = median_or_none(steady_s)
    warmup_s = r0["step_s"][: spec.warmup]
    gathers = [c.get("all_gather", 0) for c in r0["collectives"][steady]]
    row: dict[str, Any] = {
        "way": way,
        "backend": WAY_SETUPS[way][0],
        "inner": spec.inner if WAY_SETUPS[way][0] == "z3leaf" else None,
        "zero_limits": r0["zero_limits"],
        "gather": r0["gather"],
        "z3leaf_options": z3leaf_options(way, spec),
        "gather_settings": r0["gather_settings"],
        "peak_gathered_elements": max((max(r["peak_gathered"][steady]) for r in ranks), default=None),
        "graphs": r0["graphs"],
        "graph_breaks": r0["graph_breaks"],
        "all_gathers_per_step": median_or_none(gathers),
        "compile_s": sum(warmup_s) - len(warmup_s) * median_s,
        "first_step_compile_s": r0["step_s"][0] - median_s,
        "first_step_s": r0["step_s"][0],
        "median_step_ms": median_s * 1e3,
        "median_step_cpu_ms": median_or_none(r0["step_cpu_s"][steady]) * 1e3,
        "median_step_cpu_ms_per_rank": [median_or_none(r["step_cpu_s"][steady]) * 1e3 for r in ranks],
        "final_loss": r0["losses"][-1],
        "losses": [r["losses"] for r in ranks],  # losses[rank][step]
        "losses_match_eager": None,
        "loss_max_abs_diff": None,
        "graphs_after_first_step": r0["graphs_after_first_step"],
        "graph_breaks_after_first_step": r0["graph_breaks_after_first_step"],
        "graph_break_reasons": r0["graph_break_reasons"],
        "frames_skipped": sum(r0["unimplemented"].values()) if way != "eager" else 0,
        "frames_skipped_reasons": {k.splitlines()[0][:160]: v for k, v in r0["unimplemented"].items()},
        "recompile_limit_hits": r0["recompile_limit_hits"],
        "step_ms": [s * 1e3 for s in r0["step_s"]],
        "phase_ms": {
            k: median_or_none([p[k] * 1e3 for p in r0["phases"][steady]]) for k in ("forward_s", "backward_s", "optimizer_s")
        },
        "collectives_per_step": [c for c in r0["collectives"]],
        "all_gathers_per_step_max_rank": max(
            (median_or_none([c.get("all_gather", 0) for c in r["collectives"][steady]]) or 0) for r in ranks
        ),
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
        "setup_s": r0["setup_s"],
        "wall_s": wall_s,
        "hook_timing": spec.hook_timing,
        "error": None,
    }
    row["phase_ms"] = {k.replace("_s", "_ms"): v for k, v in row["phase_ms"].items()}
    if spec.hook_timing:
        row["hooks"] = hook_summary(r0, steady)
    return row


def failed_row(way: str, spec: CompareSpec, exc: Exception, wall_s: float) -> dict[str, Any]:
    """A row for a way whose ranks failed: every figure None, ``error`` says why."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # The root-cause rank's traceback ends with its exception line; hung ranks are named first.
    reason = lines[0] if lines and lines[0].startswith("rank(s)") else None
    if reason is None:
        tb_lines = [ln for ln in lines if not ln.startswith(("File ", "^", "rank ")) and ":" in ln]
        reason = next((ln for ln in reversed(tb_lines[: _first_other_rank(lines)]) if ln), lines[-1] if lines else "?")
    row = {key: None for key in ROW_KEYS}
    row.update(way=way, backend=WAY_SETUPS[way][0], inner=spec.inner if WAY_SETUPS[way][0] == "z3leaf" else None,
               z3leaf_options=z3leaf_options(way, spec), error=reason[:300], error_text=text, wall_s=wall_s,
               hook_timing=spec.hook_timing)
    return row


def _first_other_rank(lines: list[str]) -> int:
    """Index of the first line after the root cause's traceback ("rank N failed too ...")."""
    for i, line in enumerate(lines):
        if i and line.startswith("rank ") and " failed too " in line:
            return i
    return len(lines)


def loss_diff(reference: dict[str, Any], row: dict[str, Any]) -> float:
    """Max |loss - reference loss| over every step of every rank (inf if shapes differ)."""
    a, b = reference["losses"], row["losses"]
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return math.inf
    diffs = [abs(p - q) for x, y in zip(a, b) for p, q in zip(x, y)]
    return max(diffs) if diffs else 0.0


def attach_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``losses_match_eager``/``loss_max_abs_diff`` and step-time ratios against eager."""
    eager = next((r for r in rows if r["way"] == "eager" and not r.get("error")), None)
    for row in rows:
        if eager is None or row.get("error"):
            continue
        diff = loss_diff(eager, row)
        row["loss_max_abs_diff"] = diff
        row["losses_match_eager"] = bool(diff <= LOSS_TOLERANCE)
        row["step_vs_eager"] = row["median_step_ms"] / eager["median_step_ms"] if eager["median_step_ms"] else None
    return rows
