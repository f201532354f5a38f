"""DeepSpeed ZeRO-3 on CPU ranks: eager (default and strict limits) vs ``engine.compile("inductor")`` vs z3leaf.

    python benchmarks/zero3_moe.py            # MoEStack d=256, 4 layers, 8 experts, top-2; ~15+ min on 2 cores
    python benchmarks/zero3_moe.py --quick    # tiny model, few steps (smoke test)

The ways (:data:`leafpass.tools.zero3_compare.WAY_SETUPS`) train the same ``MoEStack``
(``MoEBlock`` flagged as the ZeRO-3 leaf with ``deepspeed.utils.set_z3_leaf_modules`` before
``deepspeed.initialize``) on the same data, each in fresh gloo rank processes, through
:func:`leafpass.tools.zero3_compare.compare` (see its ``DEFINITIONS``, repeated in the JSON).
Every rank trains on its own batches, so ranks route tokens to different experts. Default
ways: eager ZeRO-3 with DeepSpeed's default limits, eager ZeRO-3 with strict limits (gather
each module at its entry, release it after use), ``engine.compile(backend="inductor")``,
and the same with strict limits, z3leaf with ``gather="step"``, z3leaf under strict limits
with ``gather="auto"`` (which resolves to ``"module"`` there, with the engine's bucket
settings: one gather per module, no prefetch), and z3leaf with ``gather="module"`` under
strict limits and buckets of up to 600,000 elements, no prefetch (``z3leaf_module``: each
stretch between two leaves in one all-gather; ``leafpass.tools.zero3_compare.WAY_OPTIONS``).

Main pass: the gather policy each z3leaf way ran with, graphs, graph breaks, frames Dynamo
ran eagerly, all-gathers per step, peak gathered parameter elements, compile seconds,
median step (forward + backward + optimizer step), final loss and whether every loss of
every rank matches eager ZeRO-3's within 1e-5, peak RSS per rank (each way runs in its own
rank processes, so a way's peak RSS is its own).

Diagnostic pass (``--diagnose-ways``, default eager_strict and z3leaf_module; ``--no-diagnose`` skips
it): the same run again with timers on rank 0 around DeepSpeed ZeRO-3's per-module
fetch/release functions, which its forward pre/post hooks and its backward autograd
functions call for every module, split leaf / non-leaf and forward / backward, plus
leafpass's ``prefetch_all``; and, for compiled ways, a counting wrapper around the backend
that counts the compiled forward graphs run per step and the forward time spent inside
them. Its step times include the timers' cost and are not used in the main table.

Prints the table, the goals of the gather-policy issue (``step`` <= 0.85x eager ZeRO-3 with
default limits; ``module`` <= 0.8x eager ZeRO-3 with strict limits at no higher peak
gathered elements, for each way that ran ``module`` under strict limits; both faster than
DeepSpeed + inductor) and the diagnosis; writes
``benchmarks/results/zero3_moe.json`` with the environment (load average at start and end).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from leafpass.tools import zero3_compare as zc

DIAGNOSTIC = (
    "the ways in diagnose_ways run again with timers on rank 0 around DeepSpeed ZeRO-3's per-module "
    "fetch/release functions (pre/post_sub_module_forward_function, pre/post_sub_module_backward_function), "
    "which its module hooks call, split by leaf / non-leaf module, and around leafpass's prefetch_all; compiled "
    "ways also get a counting wrapper around the backend (compiled forward graphs run per step, forward ms inside "
    "them, leaf calls included for z3leaf). Medians over the steady steps; the timers add their own cost."
)

DEFAULT_WAYS = ("eager", "eager_strict", "inductor", "inductor_strict", "z3leaf_step", "z3leaf_strict",
                "z3leaf_module")
DEFAULTS = dict(d=256, layers=4, experts=8, top_k=2, tokens=256, steps=20, warmup=2, ranks=2)
QUICK = dict(d=32, layers=1, experts=4, top_k=2, tokens=16, steps=4, warmup=2, ranks=2)

# the demo's columns, plus the step split into phases and the ratio to eager
_AFTER_STEP_CPU = [key for key, _ in zc.TABLE_COLUMNS].index("median_step_cpu_ms") + 1
TABLE_COLUMNS = [
    *zc.TABLE_COLUMNS[:_AFTER_STEP_CPU],
    ("phases", "fwd / bwd / opt ms"),
    ("vs_eager", "vs eager"),
    *zc.TABLE_COLUMNS[_AFTER_STEP_CPU:],
]

DIAG_COLUMNS = [
    ("way", "way"),
    ("step_ms", "step ms (timed)"),
    ("nonleaf_ms", "non-leaf hooks ms"),
    ("nonleaf_split", "fwd fetch/release, bwd fetch/release ms"),
    ("nonleaf_calls", "non-leaf hook calls"),
    ("leaf_ms", "leaf hooks ms"),
    ("prefetch_all_ms", "prefetch_all ms"),
    ("hooks_share", "hooks / step"),
    ("rest_ms", "step - hooks ms"),
    ("graph_runs", "graphs run/step"),
    ("in_graphs", "fwd in graphs ms"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test: {QUICK}")
    p.add_argument("--steps", type=int, help=f"steps per way, warm-up included (default {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps at the start (default {DEFAULTS['warmup']})")
    p.add_argument("--d", type=int, help=f"model width (default {DEFAULTS['d']})")
    p.add_argument("--layers", type=int, help=f"MoE layers (default {DEFAULTS['layers']})")
    p.add_argument("--experts", type=int, help=f"experts per MoE block (default {DEFAULTS['experts']})")
    p.add_argument("--top-k", type=int, help=f"experts per token (default {DEFAULTS['top_k']})")
    p.add_argument("--tokens", type=int, help=f"tokens per rank and step (default {DEFAULTS['tokens']})")
    p.add_argument("--ranks", type=int, help=f"CPU ranks (default {DEFAULTS['ranks']})")
    p.add_argument("--ways", default=",".join(DEFAULT_WAYS),
                   help=f"comma list of {','.join(zc.WAYS)} (default {','.join(DEFAULT_WAYS)})")
    p.add_argument("--inner", choices=zc.INNER_CHOICES, default="inductor", help="z3leaf's inner compiler")
    p.add_argument("--zero-limits", choices=list(zc.ZERO_PRESETS), default="default",
                   help="ZeRO-3 limits of every way but eager_strict (default: DeepSpeed's own)")
    p.add_argument("--inductor-cache", choices=("fresh", "shared"), default="fresh",
                   help="fresh: an empty Inductor cache per way (cold, comparable compile times; default)")
    p.add_argument("--diagnose-ways", default=None,
                   help="ways to run again with hook timers (default eager_strict,z3leaf_module; quick: "
                   "z3leaf_module; empty for none)")
    p.add_argument("--no-diagnose", action="store_true", help="skip the diagnostic pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per way, all ranks (default 1800)")
    p.add_argument("--out", default=str(common.default_out_path("zero3_moe")), help="JSON output path")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    def ways(text: str) -> list[str]:
        out = [w.strip() for w in text.split(",") if w.strip()]
        bad = [w for w in out if w not in zc.WAYS]
        if bad:
            p.error(f"unknown way(s) {bad}; choose from {list(zc.WAYS)}")
        return list(dict.fromkeys(out))

    args.way_list = ways(args.ways)
    if not args.way_list:
        p.error("--ways is empty")
    if args.diagnose_ways is None:
        args.diagnose_ways = "z3leaf_module" if args.quick else "eager_strict,z3leaf_module"
    args.diagnose_list = [] if args.no_diagnose else ways(args.diagnose_ways)
    return args


def make_spec(args: argparse.Namespace, hook_timing: bool = False) -> zc.CompareSpec:
    try:
        return zc.CompareSpec(
            d=args.d, n_layers=args.layers, n_experts=args.experts, top_k=args.top_k, tokens=args.tokens,
            steps=args.steps, warmup=args.warmup, ranks=args.ranks, inner=args.inner, seed=args.seed,
            zero_limits=args.zero_limits, inductor_cache=args.inductor_cache, hook_timing=hook_timing,
            timeout=args.timeout,
        )
    except ValueError as exc:
        raise SystemExit(f"zero3_moe.py: error: {exc}") from None


# ------------------------------------------------------------------------------ report


def table_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        c: dict[str, Any] = {"way": zc.WAY_LABELS.get(r["way"], r["way"]) + (" (FAILED)" if r.get("error") else "")}
        c["gather"] = zc.gather_cell(r)
        if r.get("error"):
            out.append(c)
            continue
        c.update({k: r.get(k) for k in ("graphs", "graph_breaks", "frames_skipped", "all_gathers_per_step")})
        c["all_gathers_per_step"] = f"{r['all_gathers_per_step']:g}"
        c["peak_gathered_elements"] = f"{r['peak_gathered_elements']:g}"
        c["compile_s"] = "-" if r["backend"] is None else common.fmt(r["compile_s"], 1)  # nothing compiles
        c["median_step_ms"] = common.fmt(r["median_step_ms"], 1)
        c["median_step_cpu_ms"] = common.fmt(r["median_step_cpu_ms"], 1)
        ph = r["phase_ms"]
        c["phases"] = f"{ph['forward_ms']:.0f} / {ph['backward_ms']:.0f} / {ph['optimizer_ms']:.0f}"
        c["vs_eager"] = f"{r['step_vs_eager']:.2f}x" if r.get("step_vs_eager") else "-"
        c["final_loss"] = f"{r['final_loss']:.6f}"
        c["losses_match_eager"] = r.get("losses_match_eager")
        c["peak_rss_mb"] = f"{max(r['peak_rss_mb']):.0f}"
        out.append(c)
    return out


def diagnosis_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        h = r.get("hooks")
        c: dict[str, Any] = {"way": zc.WAY_LABELS.get(r["way"], r["way"])}
        if r.get("error") or not h:
            c["step_ms"] = "FAILED" if r.get("error") else "-"
            out.append(c)
            continue
        k = h["per_kind_ms"]
        c["step_ms"] = common.fmt(h["step_ms"], 1)
        c["nonleaf_ms"] = common.fmt(h["nonleaf_ms"], 1)
        c["nonleaf_split"] = " / ".join(
            f"{k.get(f'{kind}.nonleaf', 0.0):.1f}" for kind in ("fwd_fetch", "fwd_release", "bwd_fetch", "bwd_release")
        )
        c["nonleaf_calls"] = common.fmt(h["nonleaf_calls"], 0)
        c["leaf_ms"] = common.fmt(h["leaf_ms"], 1)
        c["prefetch_all_ms"] = common.fmt(h["prefetch_all_ms"], 1)
        c["hooks_share"] = f"{100 * h['total_fraction']:.0f}%"
        c["rest_ms"] = common.fmt(h["step_ms"] - h["total_ms"], 1)
        c["graph_runs"] = common.fmt(h.get("graph_runs_per_step"), 0)
        c["in_graphs"] = common.fmt(h.get("in_forward_graphs_ms"), 1)
        out.append(c)
    return out


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The gather-policy goals: z3leaf ``step`` <= 0.85x eager ZeRO-3 (default limits) with one
    graph and zero breaks; ``module`` <= 0.8x eager ZeRO-3 with strict limits at no higher peak
    gathered elements (each way that ran ``module`` under strict limits: ``z3leaf_module``,
    and ``z3leaf_strict`` whose ``auto`` resolves to it); each faster than DeepSpeed + inductor
    (``module`` ways against inductor under strict limits when it ran)."""
    by = {r["way"]: r for r in rows if not r.get("error")}
    eager, strict = by.get("eager"), by.get("eager_strict")
    ind = by.get("inductor") or by.get("inductor_strict")
    ind_strict = by.get("inductor_strict") or by.get("inductor")
    step = by.get("z3leaf_step")
    modules = [r for r in by.values() if r.get("gather") == "module" and r.get("zero_limits") == "strict"]
    out: dict[str, Any] = {}

    def ratio(a, b, key="median_step_ms"):
        return a[key] / b[key]

    if step and eager:
        r = ratio(step, eager)
        out["step_vs_eager_default"] = {"z3leaf_step_ms": step["median_step_ms"], "eager_ms": eager["median_step_ms"],
                                        "ratio": r, "goal": 0.85, "met": r <= 0.85,
                                        "cpu_ratio": ratio(step, eager, "median_step_cpu_ms")}
    if step:
        out["step_one_graph"] = {"graphs": step["graphs"], "graph_breaks": step["graph_breaks"],
                                 "met": step["graphs"] == 1 and step["graph_breaks"] == 0}
    if strict and modules:
        out["module_vs_eager_strict"] = [
            {**zc.module_goal(row, strict), "graphs": row["graphs"], "graph_breaks": row["graph_breaks"],
             "all_gathers_per_step": row["all_gathers_per_step"],
             "eager_strict_all_gathers_per_step": strict["all_gathers_per_step"]}
            for row in modules
        ]
    if ind and step:
        r = ratio(step, ind)
        out["step_vs_inductor"] = {"way": step["way"], "z3leaf_ms": step["median_step_ms"],
                                   "inductor_ms": ind["median_step_ms"], "inductor_way": ind["way"], "ratio": r,
                                   "met": r < 1.0, "cpu_ratio": ratio(step, ind, "median_step_cpu_ms")}
    if ind_strict and modules:
        out["module_vs_inductor"] = [
            {"way": row["way"], "z3leaf_ms": row["median_step_ms"], "inductor_ms": ind_strict["median_step_ms"],
             "inductor_way": ind_strict["way"], "ratio": ratio(row, ind_strict),
             "met": ratio(row, ind_strict) < 1.0, "cpu_ratio": ratio(row, ind_strict, "median_step_cpu_ms")}
            for row in modules
        ]
    return out


def explain_gap(rows: list[dict[str, Any]], diag: list[dict[str, Any]]) -> dict[str, Any] | None:
    """From the diagnostic pass: hook time per step and the step without it, z3leaf vs eager."""
    by = {r["way"]: r for r in diag if not r.get("error") and r.get("hooks")}
    z3 = next((by[w] for w in ("z3leaf_module", "z3leaf_strict", "z3leaf_hooks", "z3leaf", "z3leaf_step") if w in by),
              None)
    eager = by.get("eager_strict") or by.get("eager")
    if not z3:
        return None
    h = z3["hooks"]
    out: dict[str, Any] = {
        "z3leaf_way": z3["way"],
        "z3leaf_gather": z3.get("gather"),
        "z3leaf_step_ms": h["step_ms"],
        "z3leaf_nonleaf_hooks_ms": h["nonleaf_ms"],
        "z3leaf_nonleaf_hook_calls": h["nonleaf_calls"],
        "z3leaf_leaf_hooks_ms": h["leaf_ms"],
        "z3leaf_prefetch_all_ms": h["prefetch_all_ms"],
        "z3leaf_hooks_share": h["total_fraction"],
        "z3leaf_nonleaf_share": h["nonleaf_fraction"],
        "z3leaf_step_minus_hooks_ms": h["step_ms"] - h["total_ms"],
        "z3leaf_graph_runs_per_step": h.get("graph_runs_per_step"),
        "z3leaf_forward_ms": h.get("forward_ms"),
        "z3leaf_forward_in_graphs_ms": h.get("in_forward_graphs_ms"),
        "z3leaf_forward_outside_graphs_share": h.get("forward_outside_graphs_fraction"),
    }
    if eager:
        e = eager["hooks"]
        out.update({
            "eager_step_ms": e["step_ms"],
            "eager_nonleaf_hooks_ms": e["nonleaf_ms"],
            "eager_leaf_hooks_ms": e["leaf_ms"],
            "eager_hooks_share": e["total_fraction"],
            "eager_step_minus_hooks_ms": e["step_ms"] - e["total_ms"],
        })
    return out


def gap_lines(g: dict[str, Any], gap: dict[str, Any] | None) -> list[str]:
    lines = []

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if "step_vs_eager_default" in g:
        x = g["step_vs_eager_default"]
        lines.append(f"- gather='step' <= 0.85x eager ZeRO-3 (default limits): {x['z3leaf_step_ms']:.1f} vs "
                     f"{x['eager_ms']:.1f} ms ({x['ratio']:.2f}x, {met(x['met'])}; CPU time {x['cpu_ratio']:.2f}x)")
    if "step_one_graph" in g:
        x = g["step_one_graph"]
        lines.append(f"- gather='step' one graph, zero breaks: {x['graphs']} graph(s), {x['graph_breaks']} breaks "
                     f"({met(x['met'])})")
    def settings(x: dict[str, Any]) -> str:
        s = x.get("gather_settings")
        return f"bucket {s['bucket_elements']:,}, prefetch {s['prefetch_distance']}" if s else "module"

    for x in g.get("module_vs_eager_strict", []):
        lines.append(f"- gather='module' <= {x['goal']:g}x eager ZeRO-3 (strict limits) at no higher peak gathered "
                     f"elements, {x['way']} ({settings(x)}): {x['ms']:.1f} vs {x['eager_strict_ms']:.1f} ms "
                     f"({x['ratio']:.2f}x, {met(x['met_time'])}; CPU {x['cpu_ratio']:.2f}x), peak gathered "
                     f"{x['peak_gathered']:g} vs {x['eager_strict_peak_gathered']:g} ({met(x['met_memory'])}); "
                     f"{x['graphs']} graph(s), {x['graph_breaks']} breaks, {x['all_gathers_per_step']:g} vs "
                     f"{x['eager_strict_all_gathers_per_step']:g} all-gathers/step")
    for x in [g["step_vs_inductor"]] if "step_vs_inductor" in g else []:
        lines.append(f"- gather='step' faster than DeepSpeed + inductor ({x['inductor_way']}): {x['z3leaf_ms']:.1f} vs "
                     f"{x['inductor_ms']:.1f} ms ({x['ratio']:.2f}x, {met(x['met'])}; CPU {x['cpu_ratio']:.2f}x)")
    for x in g.get("module_vs_inductor", []):
        lines.append(f"- gather='module' ({x['way']}) faster than DeepSpeed + inductor ({x['inductor_way']}): "
                     f"{x['z3leaf_ms']:.1f} vs {x['inductor_ms']:.1f} ms ({x['ratio']:.2f}x, {met(x['met'])}; "
                     f"CPU {x['cpu_ratio']:.2f}x)")
    if gap:
        lines.append(
            f"- what holds {gap['z3leaf_way']} (gather={gap['z3leaf_gather']}) back (diagnostic pass, rank 0, per "
            f"step): DeepSpeed's hooks of the non-leaf "
            f"modules {gap['z3leaf_nonleaf_hooks_ms']:.1f} ms in {gap['z3leaf_nonleaf_hook_calls']:.0f} calls "
            f"({100 * gap['z3leaf_nonleaf_share']:.0f}% of the {gap['z3leaf_step_ms']:.1f} ms step); leaf hooks "
            f"{gap['z3leaf_leaf_hooks_ms']:.1f} ms, prefetch_all {gap['z3leaf_prefetch_all_ms']:.1f} ms; the step "
            f"without hooks {gap['z3leaf_step_minus_hooks_ms']:.1f} ms"
            + (f" vs eager's {gap['eager_step_minus_hooks_ms']:.1f} ms (eager's hooks: "
               f"{gap['eager_nonleaf_hooks_ms']:.1f} ms non-leaf, {gap['eager_leaf_hooks_ms']:.1f} ms leaf)"
               if "eager_step_ms" in gap else "")
        )
        if gap.get("z3leaf_graph_runs_per_step") is not None:
            lines.append(
                f"- compiled forward graphs run per step: {gap['z3leaf_graph_runs_per_step']:.0f}"
                + (" (the hooks split the compiled program)" if gap["z3leaf_graph_runs_per_step"] > 1 else "")
                + f", {gap['z3leaf_forward_in_graphs_ms']:.1f} ms of the "
                f"{gap['z3leaf_forward_ms']:.1f} ms forward inside them (leaf calls included), "
                f"{100 * gap['z3leaf_forward_outside_graphs_share']:.0f}% outside"
            )
    return lines


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ds_version = zc.check_deepspeed()
    except zc.DeepSpeedMissing as exc:
        print(f"zero3_moe.py: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    spec = make_spec(args)
    print(f"MoEStack(d={spec.d}, layers={spec.n_layers}, experts={spec.n_experts}, top-{spec.top_k}), "
          f"{spec.ranks} ranks x {spec.tokens} tokens, {spec.steps} steps ({spec.warmup} warm-up), "
          f"ZeRO-3 limits {spec.zero_limits}, inductor cache {spec.inductor_cache}; load average {load_start}",
          flush=True)

    def report(row: dict[str, Any]) -> None:
        if row.get("error"):
            print(f"  {row['way']:12s} FAILED: {row['error']}", flush=True)
        else:
            compiled = f"compile={row['compile_s']:.1f}s " if row["backend"] is not None else ""
            print(f"  {row['way']:12s} graphs={row['graphs']} breaks={row['graph_breaks']} "
                  f"{compiled}step={row['median_step_ms']:.1f}ms ({row['wall_s']:.0f}s)", flush=True)

    rows = zc.compare(spec, args.way_list, on_start=lambda w: print(f"{w} ...", flush=True), on_row=report)

    diag: list[dict[str, Any]] = []
    if args.diagnose_list:
        print("diagnostic pass (hook timers on rank 0):", flush=True)
        dspec = make_spec(args, hook_timing=True)
        diag = zc.compare(dspec, args.diagnose_list, on_start=lambda w: print(f"{w} (timed hooks) ...", flush=True),
                          on_row=report)

    g = goals(rows)
    gap = explain_gap(rows, diag)
    table = common.markdown_table(table_cells(rows), TABLE_COLUMNS)
    diag_table = common.markdown_table(diagnosis_cells(diag), DIAG_COLUMNS) if diag else None
    load_end = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    print()
    print(table)
    print()
    print(zc.reading(rows))
    if diag_table:
        print()
        print("diagnostic pass, rank 0, medians per steady step (timers on; DeepSpeed's fetch/release functions "
              "that its module hooks call):")
        print()
        print(diag_table)
    print()
    print("goals (gather policies vs eager ZeRO-3 and DeepSpeed + inductor) and what holds z3leaf back:")
    for line in gap_lines(g, gap):
        print(line)
    print(f"\nload average: start {load_start}, end {load_end} ({os.cpu_count()} cpus)")

    import torch

    payload = {
        "benchmark": "zero3_moe",
        "environment": common.environment(
            deepspeed=ds_version,
            load_average_at_start=load_start,
            load_average_at_end=load_end,
            ranks=spec.ranks,
            threads_per_rank=1,
            inductor_compile_threads=1,
            torch_build=torch.__version__,
        ),
        "config": {
            "quick": args.quick,
            "spec": dataclasses.asdict(spec),
            "model": spec.model_config(),
            "zero3_config_kwargs": spec.zero_kwargs(),
            "ways": args.way_list,
            "diagnose_ways": args.diagnose_list,
            "loss": "mse_loss(engine(x), target); engine.backward(loss); engine.step(); SGD lr 0.1",
            "loss_tolerance": zc.LOSS_TOLERANCE,
        },
        "definitions": {**zc.DEFINITIONS, "diagnostic": DIAGNOSTIC},
        "rows": rows,
        "diagnostic_rows": diag,
        "goals": g,
        "what_holds_z3leaf_back": gap,
        "table": table,
        "diagnostic_table": diag_table,
        "wall_s": time.perf_counter() - started,
    }
    path = common.write_json(args.out, payload)
    print(f"wrote {path} ({payload['wall_s']:.0f}s)")
    return 1 if any(r.get("error") for r in rows + diag) else 0


if __name__ == "__main__":
    sys.exit(main())
