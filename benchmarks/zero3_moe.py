"""DeepSpeed ZeRO-3 on CPU ranks: eager vs ``engine.compile("inductor")`` vs ``engine.compile("z3leaf")``.

    python benchmarks/zero3_moe.py            # MoEStack d=256, 4 layers, 8 experts, top-2; ~10+ min on 2 cores
    python benchmarks/zero3_moe.py --quick    # tiny model, few steps (smoke test)

The three ways train the same ``MoEStack`` (``MoEBlock`` flagged as the ZeRO-3 leaf with
``deepspeed.utils.set_z3_leaf_modules`` before ``deepspeed.initialize``) on the same data,
each in fresh gloo rank processes, through :func:`leafpass.zero3_compare.compare` (see its
``DEFINITIONS``, repeated in the JSON). Every rank trains on its own batches, so ranks route
tokens to different experts; ZeRO-3 limits are "strict" by default (gather each module at
its entry, release it after use), so every gather shows in the all-gather count.

Main pass: graphs, graph breaks, frames Dynamo ran eagerly, all-gathers per step, compile
seconds, median step (forward + backward + optimizer step), final loss and whether every
loss of every rank matches eager ZeRO-3's within 1e-5, peak RSS per rank.

Diagnostic pass (``--diagnose-ways``, default eager and z3leaf; ``--no-diagnose`` skips it):
the same run again with timers on rank 0 around DeepSpeed ZeRO-3's per-module
fetch/release functions, which its forward pre/post hooks and its backward autograd
functions call for every module, split leaf / non-leaf and forward / backward, plus
leafpass's ``prefetch_all``; and, for compiled ways, a counting wrapper around the backend
that counts the compiled forward graphs run per step and the forward time spent inside
them. It answers "what holds z3leaf back": the per-module hooks of the non-leaf modules,
which also split the compiled program into many small graphs. Its step times include the
timers' cost and are not used in the main table.

Prints the table, the goals (z3leaf vs inductor: fewer graphs, fewer breaks, faster steps)
and the diagnosis; writes ``benchmarks/results/zero3_moe.json`` with the environment
(load average at start and end included).
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
from leafpass import zero3_compare as zc

DIAGNOSTIC = (
    "the ways in diagnose_ways run again with timers on rank 0 around DeepSpeed ZeRO-3's per-module "
    "fetch/release functions (pre/post_sub_module_forward_function, pre/post_sub_module_backward_function), "
    "which its module hooks call, split by leaf / non-leaf module, and around leafpass's prefetch_all; compiled "
    "ways also get a counting wrapper around the backend (compiled forward graphs run per step, forward ms inside "
    "them, leaf calls included for z3leaf). Medians over the steady steps; the timers add their own cost."
)

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
    p.add_argument("--ways", default=",".join(zc.WAYS), help="comma list of eager,inductor,z3leaf")
    p.add_argument("--inner", choices=zc.INNER_CHOICES, default="inductor", help="z3leaf's inner compiler")
    p.add_argument("--zero-limits", choices=list(zc.ZERO_PRESETS), default="strict",
                   help="ZeRO-3 limits preset (default strict: gather at entry, release after use)")
    p.add_argument("--inductor-cache", choices=("fresh", "shared"), default="fresh",
                   help="fresh: an empty Inductor cache per way (cold, comparable compile times; default)")
    p.add_argument("--diagnose-ways", default=None,
                   help="ways to run again with hook timers (default eager,z3leaf; quick: z3leaf; empty for none)")
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
        args.diagnose_ways = "z3leaf" if args.quick else "eager,z3leaf"
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
        if r.get("error"):
            out.append(c)
            continue
        c.update({k: r.get(k) for k in ("graphs", "graph_breaks", "frames_skipped", "all_gathers_per_step")})
        c["all_gathers_per_step"] = f"{r['all_gathers_per_step']:g}"
        c["compile_s"] = "-" if r["way"] == "eager" else common.fmt(r["compile_s"], 1)  # nothing compiles
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
    """z3leaf against inductor (fewer graphs, fewer breaks, faster steps) and its gap to eager."""
    by = {r["way"]: r for r in rows if not r.get("error")}
    z3, ind, eager = by.get("z3leaf"), by.get("inductor"), by.get("eager")
    out: dict[str, Any] = {}
    if z3 and ind:
        out["fewer_graphs"] = {"z3leaf": z3["graphs"], "inductor": ind["graphs"], "met": z3["graphs"] < ind["graphs"]}
        z3_b, ind_b = z3["graph_breaks"], ind["graph_breaks"]
        out["fewer_breaks"] = {"z3leaf": z3_b, "inductor": ind_b, "met": z3_b < ind_b,
                               "z3leaf_with_frames_run_eagerly": z3_b + z3["frames_skipped"],
                               "inductor_with_frames_run_eagerly": ind_b + ind["frames_skipped"]}
        ratio = z3["median_step_ms"] / ind["median_step_ms"]
        cpu_ratio = z3["median_step_cpu_ms"] / ind["median_step_cpu_ms"]
        out["faster_steps"] = {"z3leaf_ms": z3["median_step_ms"], "inductor_ms": ind["median_step_ms"],
                               "ratio": ratio, "met": ratio < 1.0,
                               "z3leaf_cpu_ms": z3["median_step_cpu_ms"], "inductor_cpu_ms": ind["median_step_cpu_ms"],
                               "cpu_ratio": cpu_ratio, "met_cpu": cpu_ratio < 1.0}
    if z3 and eager:
        out["gap_to_eager"] = {"z3leaf_ms": z3["median_step_ms"], "eager_ms": eager["median_step_ms"],
                               "ratio": z3["median_step_ms"] / eager["median_step_ms"],
                               "extra_ms": z3["median_step_ms"] - eager["median_step_ms"],
                               "z3leaf_cpu_ms": z3["median_step_cpu_ms"], "eager_cpu_ms": eager["median_step_cpu_ms"],
                               "cpu_ratio": z3["median_step_cpu_ms"] / eager["median_step_cpu_ms"]}
    return out


def explain_gap(rows: list[dict[str, Any]], diag: list[dict[str, Any]]) -> dict[str, Any] | None:
    """From the diagnostic pass: hook time per step and the step without it, z3leaf vs eager."""
    by = {r["way"]: r for r in diag if not r.get("error") and r.get("hooks")}
    z3, eager = by.get("z3leaf"), by.get("eager")
    if not z3:
        return None
    h = z3["hooks"]
    out: dict[str, Any] = {
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
    if "fewer_graphs" in g:
        fg, fb, fs = g["fewer_graphs"], g["fewer_breaks"], g["faster_steps"]
        lines.append(f"- fewer graphs than inductor: {fg['z3leaf']} vs {fg['inductor']} "
                     f"({'met' if fg['met'] else 'NOT met'})")
        lines.append(f"- fewer graph breaks than inductor: {fb['z3leaf']} vs {fb['inductor']} "
                     f"({'met' if fb['met'] else 'NOT met'}); with frames Dynamo ran eagerly: "
                     f"{fb['z3leaf_with_frames_run_eagerly']} vs {fb['inductor_with_frames_run_eagerly']}")
        lines.append(f"- faster steps than inductor: {fs['z3leaf_ms']:.1f} vs {fs['inductor_ms']:.1f} ms "
                     f"({fs['ratio']:.2f}x, {'met' if fs['met'] else 'NOT met'}); CPU time "
                     f"{fs['z3leaf_cpu_ms']:.1f} vs {fs['inductor_cpu_ms']:.1f} ms "
                     f"({fs['cpu_ratio']:.2f}x, {'met' if fs['met_cpu'] else 'NOT met'})")
    if "gap_to_eager" in g:
        ge = g["gap_to_eager"]
        lines.append(f"- gap to eager ZeRO-3: {ge['z3leaf_ms']:.1f} vs {ge['eager_ms']:.1f} ms "
                     f"({ge['ratio']:.2f}x, {ge['extra_ms']:+.1f} ms per step); CPU time "
                     f"{ge['z3leaf_cpu_ms']:.1f} vs {ge['eager_cpu_ms']:.1f} ms ({ge['cpu_ratio']:.2f}x)")
    if gap:
        lines.append(
            f"- what holds z3leaf back (diagnostic pass, rank 0, per step): DeepSpeed's hooks of the non-leaf "
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
                f"- the hooks split the compiled program: {gap['z3leaf_graph_runs_per_step']:.0f} compiled forward "
                f"graphs run per step, {gap['z3leaf_forward_in_graphs_ms']:.1f} ms of the "
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
            print(f"  {row['way']:8s} FAILED: {row['error']}", flush=True)
        else:
            print(f"  {row['way']:8s} graphs={row['graphs']} breaks={row['graph_breaks']} "
                  f"compile={row['compile_s']:.1f}s step={row['median_step_ms']:.1f}ms ({row['wall_s']:.0f}s)",
                  flush=True)

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
    print("goals (z3leaf vs DeepSpeed + inductor) and what holds z3leaf back:")
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
