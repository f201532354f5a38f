"""Hugging Face MoE models under DeepSpeed ZeRO-3 on CPU ranks: eager vs inductor vs z3leaf vs no ZeRO.

    python benchmarks/hf_moe.py                  # medium Mixtral, eager experts, 2 ranks (~8 min on 2 cores)
    python benchmarks/hf_moe.py --quick          # tiny Mixtral, 1 rank, 3 ways, 4 steps (the smoke test)
    python benchmarks/hf_moe.py --models mixtral,qwen3_moe --impls eager,grouped_mm --ranks 1,2
    python benchmarks/hf_moe.py --sizes large    # hidden 512, 8 layers (many minutes)

A transformers ``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM`` built from a config (no
download), ``experts_implementation`` ``"eager"`` (a loop over the experts hit, ``nonzero``)
or ``"grouped_mm"``; its sparse MoE blocks flagged as ZeRO-3 leaves by DeepSpeed's default
leaf classes (``leafpass.apply_leaf_module_config(model)``) before ``deepspeed.initialize``.
Every way trains the same weights (seed 0) on the same batches (rank r, step i: random token
ids seeded by (r, i), so ranks route differently) with ``torch.optim.SGD(lr=0.01)``; a step
is ``loss = engine(input_ids=ids, labels=ids).loss; engine.backward(loss); engine.step()``.
Each way runs in fresh gloo rank processes (one torch thread each), so its peak RSS is its
own. Ways (:data:`WAYS`): eager ZeRO-3; ``engine.compile(backend="inductor")``; z3leaf with
``gather`` ``step`` / ``module`` / ``hooks``; z3leaf ``step`` with ``leaf_compile="inner"``;
and the no-ZeRO limit: ZeRO stage 0 + z3leaf (the same compute, gradients all-reduced), with
and without ``leaf_compile``.

After its timed steps, each way in ``--breakdown-ways`` runs ``--profile-steps`` more steps
on rank 0 with :class:`benchmarks.step_breakdown.StepBreakdown`: forward / backward /
optimizer split into gathers, leaf forward, compiled non-leaf forward, DeepSpeed's gradient
path (the bucket reduction apart), leafpass's own Python and the rest.

Prints one table per (model, experts implementation, size, ranks), the breakdowns and the
goals of issue 15 (met / not met); writes ``benchmarks/results/hf_moe.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

# way -> (ZeRO stage, backend or None, z3leaf options or None)
WAYS: dict[str, tuple[int, str | None, dict[str, Any] | None]] = {
    "eager": (3, None, None),
    "inductor": (3, "inductor", None),
    "z3leaf_step": (3, "z3leaf", {"gather": "step"}),
    "z3leaf_module": (3, "z3leaf", {"gather": "module"}),
    "z3leaf_hooks": (3, "z3leaf", {"gather": "hooks"}),
    "z3leaf_step_lc": (3, "z3leaf", {"gather": "step", "leaf_compile": "inner"}),
    "z3leaf_step_dsgrad": (3, "z3leaf", {"gather": "step", "grad_path": "deepspeed"}),
    "stage0_z3leaf": (0, "z3leaf", {}),
    "stage0_z3leaf_lc": (0, "z3leaf", {"leaf_compile": "inner"}),
}
LABELS = {
    "eager": "eager ZeRO-3",
    "inductor": "ZeRO-3 + engine.compile(inductor)",
    "z3leaf_step": "z3leaf gather=step",
    "z3leaf_module": "z3leaf gather=module",
    "z3leaf_hooks": "z3leaf gather=hooks",
    "z3leaf_step_lc": "z3leaf step + leaf_compile",
    "z3leaf_step_dsgrad": "z3leaf step, DeepSpeed's grad path",
    "stage0_z3leaf": "no ZeRO (stage 0) + z3leaf",
    "stage0_z3leaf_lc": "no ZeRO + z3leaf + leaf_compile",
}
DEFAULT_WAYS = ("eager", "inductor", "z3leaf_step", "z3leaf_step_dsgrad", "z3leaf_module", "z3leaf_step_lc", "stage0_z3leaf",
                "stage0_z3leaf_lc")
# model size -> (config keyword arguments shared by both models, sequences x tokens per rank)
SIZES: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {
    "tiny": (dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, top_k=2), (2, 16)),
    # the issue's medium model: hidden 256, 4 layers, 8 experts top-2, 2 x 128 tokens per rank
    "medium": (dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, num_experts=8, top_k=2), (2, 128)),
    "large": (dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, num_experts=8, top_k=2), (2, 256)),
}
LOSS_TOLERANCE = 1e-4  # |loss - eager ZeRO-3's loss|, every step of every rank (stage 0 reduces differently)
DEFINITIONS = {
    "graphs / breaks": "rank 0: torch._dynamo counters['stats']['unique_graphs'] and sum(counters['graph_break']) "
    "over the run (leaf_compile's own graphs and breaks inside the leaves included); 0 for eager",
    "leaf graphs": "leaf_compile ways: graphs compiled for leaf forwards (leafpass.leaf_compile.leaf_compile_stats)",
    "compile s": "rank 0: wall time of the warm-up steps minus as many median steps",
    "step ms": "rank 0: median wall ms of forward + engine.backward + engine.step over the timed steps",
    "cpu ms": "rank 0: median process CPU ms (time.process_time) of the same steps",
    "vs eager / vs limit": "median step over eager ZeRO-3's / over the no-ZeRO limit's (stage0_z3leaf)",
    "peak RSS MiB": "largest ru_maxrss over the ranks of the way (fresh processes: that way's own)",
    "loss = eager": f"every loss of every rank within {LOSS_TOLERANCE:g} of eager ZeRO-3's",
}


@dataclasses.dataclass
class Case:
    model: str  # mixtral | qwen3_moe
    impl: str  # eager | grouped_mm
    size: str
    ranks: int
    steps: int
    warmup: int
    profile_steps: int
    breakdown_ways: tuple[str, ...]
    inner: str = "inductor"  # z3leaf's inner compiler
    seed: int = 0
    lr: float = 0.01
    timeout: float = 900.0

    def label(self) -> str:
        return f"{self.model} {self.size} experts={self.impl} {self.ranks} rank(s)"


def build_model(case: Case):
    import torch
    import transformers

    kw, _ = SIZES[case.size]
    kw = dict(kw)
    n_experts, top_k = kw.pop("num_experts"), kw.pop("top_k")
    common_kw = dict(max_position_embeddings=512, num_experts_per_tok=top_k, **kw)
    if case.model == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=n_experts, **common_kw)
    elif case.model == "qwen3_moe":
        common_kw["moe_intermediate_size"] = common_kw["intermediate_size"]
        config = transformers.Qwen3MoeConfig(num_experts=n_experts, decoder_sparse_step=1, mlp_only_layers=[],
                                             head_dim=kw["hidden_size"] // kw["num_attention_heads"], **common_kw)
    else:
        raise ValueError(f"hf_moe.py: unknown model {case.model!r}; choose mixtral or qwen3_moe")
    torch.manual_seed(case.seed)
    return transformers.AutoModelForCausalLM.from_config(config, experts_implementation=case.impl).train()


def _batch(case: Case, rank: int, step: int):
    import torch

    kw, (seqs, tokens) = SIZES[case.size]
    gen = torch.Generator().manual_seed(1000 * (case.seed + 1) + 100 * rank + step)
    return torch.randint(0, kw["vocab_size"], (seqs, tokens), generator=gen)


def _rank_body(rank: int, world_size: int, way: str, case: Case) -> dict[str, Any]:
    import logging

    import deepspeed
    import torch

    import leafpass
    from leafpass.leaf_compile import leaf_compile_stats
    from leafpass.testing.distributed import zero3_config

    for name in ("torch._dynamo", "torch._inductor", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    stage, backend, options = WAYS[way]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = build_model(case)
    leaves = leafpass.apply_leaf_module_config(model)  # DeepSpeed's default leaf classes
    leaf_classes = tuple({type(m) for m in leaves})
    config = zero3_config(1)
    if stage == 0:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=case.lr),
                                      config=config)
    if backend is not None:
        kwargs = {"options": {"inner": case.inner, **options}} if backend == "z3leaf" else {}
        engine.compile(backend=backend, compile_kwargs=kwargs)

    def step(i: int, phases: dict[str, float] | None = None, breakdown=None, cpu_phases=None):
        ids = _batch(case, rank, i)
        t, c = [time.perf_counter()], [time.process_time()]
        if breakdown is not None:
            breakdown.phase = "forward"
        loss = engine(input_ids=ids, labels=ids).loss
        t.append(time.perf_counter()), c.append(time.process_time())
        if breakdown is not None:
            breakdown.phase = "backward"
        engine.backward(loss)
        t.append(time.perf_counter()), c.append(time.process_time())
        if breakdown is not None:
            breakdown.phase = "optimizer"
        engine.step()
        t.append(time.perf_counter()), c.append(time.process_time())
        for totals, ts in ((phases, t), (cpu_phases, c)):
            if totals is not None:
                for k, a, b in zip(("forward", "backward", "optimizer"), ts, ts[1:]):
                    totals[k] = totals.get(k, 0.0) + b - a
        return float(loss.detach()), t[3] - t[0]

    losses, wall, cpu = [], [], []
    phase_sum: dict[str, float] = {}
    for i in range(case.steps):
        c0 = time.process_time()
        loss, seconds = step(i, phase_sum if i >= case.warmup else None)
        cpu.append(time.process_time() - c0)
        losses.append(loss)
        wall.append(seconds)
    graphs = int(counters["stats"]["unique_graphs"])
    breaks = int(sum(counters["graph_break"].values()))
    reasons: dict[str, int] = {}
    for reason, n in counters["graph_break"].items():
        first = (str(reason).strip().splitlines() or ["?"])[0][:140]
        reasons[first] = reasons.get(first, 0) + int(n)
    breakdown_ms = breakdown_cpu_ms = None
    if case.profile_steps and way in case.breakdown_ways:
        from benchmarks.step_breakdown import StepBreakdown

        # every rank runs the profiled steps (collectives meet); rank 0 times them
        timer = StepBreakdown(engine, leaf_classes) if rank == 0 else None
        prof_phases: dict[str, float] = {}
        prof_cpu: dict[str, float] = {}
        for i in range(case.profile_steps):
            step(case.steps + i, prof_phases, timer, prof_cpu)
        if timer is not None:
            breakdown_ms = timer.per_step(case.profile_steps, prof_phases)
            breakdown_cpu_ms = timer.per_step(case.profile_steps, prof_cpu, cpu=True)
            timer.remove()
    stats = leafpass.gather_stats(engine.module) if backend == "z3leaf" and stage == 3 else None
    timed = slice(case.warmup, None)
    return {
        "losses": losses,
        "wall_s": wall,
        "cpu_s": cpu,
        "median_step_ms": 1e3 * statistics.median(wall[timed]),
        "median_cpu_ms": 1e3 * statistics.median(cpu[timed]),
        "compile_s": sum(wall[: case.warmup]) - case.warmup * statistics.median(wall[timed]),
        "phase_ms": {k: 1e3 * v / len(wall[timed]) for k, v in phase_sum.items()},
        "graphs": graphs if backend else 0,
        "graph_breaks": breaks if backend else 0,
        "graph_break_reasons": reasons,
        "leaf_graphs": sum(leaf_compile_stats().values()),
        "gather_policy": getattr(stats, "policy", None),
        "grad_path": getattr(stats, "grad_path", None),
        "leaves": len(leaves),
        "breakdown_ms": breakdown_ms,
        "breakdown_cpu_ms": breakdown_cpu_ms,
        "peak_rss_mb": common.peak_rss_mb(),
    }


def run_way(way: str, case: Case) -> dict[str, Any]:
    from leafpass.testing.distributed import DistributedRunError, run_ranks

    start = time.perf_counter()
    row: dict[str, Any] = {"way": way, "label": LABELS[way], "case": dataclasses.asdict(case)}
    with tempfile.TemporaryDirectory(prefix=f"leafpass-hf-{way}-") as cache:
        try:
            ranks = run_ranks(_rank_body, way, case, world_size=case.ranks, timeout=case.timeout,
                              pg_timeout=max(60.0, case.timeout / 2),
                              env={"TORCHINDUCTOR_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1",
                                   "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(common.REPO_ROOT)})
        except DistributedRunError as exc:
            row.update(error=str(exc).strip().splitlines()[-1][:300], wall_s=time.perf_counter() - start)
            return row
    r0 = ranks[0]
    row.update({k: r0[k] for k in ("median_step_ms", "median_cpu_ms", "compile_s", "phase_ms", "graphs",
                                   "graph_breaks", "graph_break_reasons", "leaf_graphs", "gather_policy", "grad_path", "leaves",
                                   "breakdown_ms", "breakdown_cpu_ms")})
    row["losses"] = [r["losses"] for r in ranks]
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ranks)
    row["compile_s"] = None if WAYS[way][1] is None else row["compile_s"]
    row["wall_s"] = time.perf_counter() - start
    row["load_average"] = list(os.getloadavg())
    return row


def compare_rows(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_eager``, ``vs_limit`` and ``losses_match_eager`` to each row of one case."""
    by = {r["way"]: r for r in rows if not r.get("error")}
    eager, limit = by.get("eager"), by.get("stage0_z3leaf")
    for r in by.values():
        r["vs_eager"] = r["median_step_ms"] / eager["median_step_ms"] if eager else None
        r["cpu_vs_eager"] = r["median_cpu_ms"] / eager["median_cpu_ms"] if eager else None
        r["vs_limit"] = r["median_step_ms"] / limit["median_step_ms"] if limit else None
        if eager:
            diff = max(abs(a - b) for ra, rb in zip(eager["losses"], r["losses"]) for a, b in zip(ra, rb))
            r["loss_max_abs_diff"] = diff
            r["losses_match_eager"] = diff <= LOSS_TOLERANCE
        else:
            r["loss_max_abs_diff"] = r["losses_match_eager"] = None


COLUMNS = [("label", "way"), ("graphs_breaks", "graphs / breaks"), ("leaf_graphs", "leaf graphs"),
           ("compile_s", "compile s"), ("median_step_ms", "step ms"), ("median_cpu_ms", "cpu ms"),
           ("phases", "fwd / bwd / opt ms"), ("vs_eager", "vs eager"), ("vs_limit", "vs limit"),
           ("peak_rss_mb", "peak RSS MiB"), ("losses_match_eager", "loss = eager")]


def table(rows: list[dict[str, Any]]) -> str:
    cells = []
    for r in rows:
        if r.get("error"):
            cells.append({"label": f"{r['label']} (FAILED: {r['error'][:80]})"})
            continue
        ph = r["phase_ms"]
        cells.append({
            "label": r["label"],
            "graphs_breaks": "-" if WAYS[r["way"]][1] is None else f"{r['graphs']} / {r['graph_breaks']}",
            "leaf_graphs": r["leaf_graphs"] if "leaf_compile" in (WAYS[r["way"]][2] or {}) else "-",
            "compile_s": r["compile_s"],
            "median_step_ms": r["median_step_ms"],
            "median_cpu_ms": r["median_cpu_ms"],
            "phases": f"{ph['forward']:.0f} / {ph['backward']:.0f} / {ph['optimizer']:.0f}",
            "vs_eager": "-" if r.get("vs_eager") is None else f"{r['vs_eager']:.2f}x",
            "vs_limit": "-" if r.get("vs_limit") is None else f"{r['vs_limit']:.2f}x",
            "peak_rss_mb": f"{r['peak_rss_mb']:.0f}",
            "losses_match_eager": r.get("losses_match_eager"),
        })
    return common.markdown_table(cells, COLUMNS)


def breakdown_table(rows: list[dict[str, Any]], key: str = "breakdown_ms") -> str | None:
    """One line per way and phase: ms per step in each bucket (``key``: wall or CPU figures)."""
    from benchmarks.step_breakdown import BUCKETS, PHASES

    cells = []
    for r in rows:
        b = r.get(key)
        if not b:
            continue
        for phase in PHASES:
            cells.append({"way": r["label"], "phase": phase,
                          **{k: f"{v:.1f}" for k, v in b[phase].items()},
                          "total": f"{sum(b[phase].values()):.1f}"})
    if not cells:
        return None
    return common.markdown_table(cells, [("way", "way"), ("phase", "phase"), *((k, k) for k in BUCKETS),
                                         ("total", "total")])


def goals(rows: list[dict[str, Any]], case: Case) -> list[dict[str, Any]]:
    """Issue 15's goals for one case: z3leaf (the best z3leaf ZeRO-3 way) vs eager, the limit, inductor."""
    by = {r["way"]: r for r in rows if not r.get("error")}
    z3 = [r for w, r in by.items() if w.startswith("z3leaf")]
    if not z3:
        return []
    best = min(z3, key=lambda r: r["median_step_ms"])
    out = []

    def goal(what: str, value: float | None, bound: float, unit: str = "x") -> None:
        if value is not None:
            out.append({"goal": what, "way": best["way"], "value": value, "bound": bound, "met": value <= bound,
                        "unit": unit})

    if case.ranks >= 2:
        goal("z3leaf <= 0.7x eager ZeRO-3", best.get("vs_eager"), 0.7)
        goal("z3leaf <= 1.3x the no-ZeRO limit", best.get("vs_limit"), 1.3)
    else:
        goal("z3leaf <= 1.15x the no-ZeRO limit (1 rank)", best.get("vs_limit"), 1.15)
    if "inductor" in by and best.get("compile_s") is not None:
        goal("z3leaf compile s <= DeepSpeed + inductor's", best["compile_s"] / by["inductor"]["compile_s"], 1.0)
    if "eager" in by:
        goal("z3leaf peak RSS <= eager ZeRO-3's", best["peak_rss_mb"] / by["eager"]["peak_rss_mb"], 1.0)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mixtral", help="comma list of mixtral, qwen3_moe")
    p.add_argument("--impls", default="eager", help="comma list of experts implementations: eager, grouped_mm")
    p.add_argument("--sizes", default="medium", help=f"comma list of {list(SIZES)}")
    p.add_argument("--ranks", default="2", help="comma list of rank counts")
    p.add_argument("--ways", default=",".join(DEFAULT_WAYS), help=f"comma list of {list(WAYS)}")
    p.add_argument("--steps", type=int, default=8, help="steps per way, warm-up included")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps after the timed ones (0: none)")
    p.add_argument("--breakdown-ways", default="eager,z3leaf_step,z3leaf_step_lc,stage0_z3leaf")
    p.add_argument("--inner", default="inductor", help="z3leaf's inner compiler (inductor, aot_eager, eager)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per way")
    p.add_argument("--quick", action="store_true", help="tiny Mixtral, 1 rank, eager / z3leaf step / stage 0, 4 steps")
    p.add_argument("--out", default=str(common.default_out_path("hf_moe")))
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.ranks, args.steps, args.warmup, args.profile_steps = "tiny", "1", 4, 2, 1
        args.ways, args.timeout = "eager,z3leaf_step,stage0_z3leaf", 300.0
    args.way_list = [w for w in args.ways.split(",") if w]
    unknown = [w for w in args.way_list if w not in WAYS]
    if unknown:
        p.error(f"unknown way(s) {unknown}; choose from {list(WAYS)}")
    bad = [s for s in args.sizes.split(",") if s not in SIZES]
    if bad:
        p.error(f"unknown size(s) {bad}; choose from {list(SIZES)}")
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = list(os.getloadavg())
    cases = [Case(m, i, s, int(n), args.steps, args.warmup, args.profile_steps,
                  tuple(w for w in args.breakdown_ways.split(",") if w), inner=args.inner, timeout=args.timeout)
             for m in args.models.split(",") for i in args.impls.split(",") for s in args.sizes.split(",")
             for n in args.ranks.split(",")]
    results = []
    for case in cases:
        print(f"== {case.label()}: {case.steps} steps ({case.warmup} warm-up), load average {os.getloadavg()}",
              flush=True)
        rows = []
        for way in args.way_list:
            row = run_way(way, case)
            rows.append(row)
            if row.get("error"):
                print(f"  {way:18s} FAILED: {row['error']}", flush=True)
            else:
                print(f"  {way:18s} step={row['median_step_ms']:.1f}ms cpu={row['median_cpu_ms']:.1f}ms "
                      f"graphs={row['graphs']} breaks={row['graph_breaks']} ({row['wall_s']:.0f}s, load "
                      f"{row['load_average'][0]:.1f})", flush=True)
        compare_rows(rows)
        results.append({"case": dataclasses.asdict(case), "label": case.label(), "rows": rows,
                        "table": table(rows), "breakdown": breakdown_table(rows),
                        "breakdown_cpu": breakdown_table(rows, "breakdown_cpu_ms"), "goals": goals(rows, case)})
    load_end = list(os.getloadavg())
    for res in results:
        print(f"\n### {res['label']}\n\n{res['table']}")
        if res["breakdown"]:
            print(f"\nper-step breakdown, rank 0, wall ms (exclusive buckets; benchmarks/step_breakdown.py):\n\n"
                  f"{res['breakdown']}\n\nthe same, CPU ms (time.process_time):\n\n{res['breakdown_cpu']}")
        for g in res["goals"]:
            print(f"- {g['goal']}: {g['way']} {g['value']:.2f}{g['unit']} ({'met' if g['met'] else 'NOT met'})")
    print(f"\nload average: start {load_start}, end {load_end} ({os.cpu_count()} cpus)")
    import deepspeed
    import transformers

    payload = {
        "benchmark": "hf_moe",
        "environment": common.environment(deepspeed=deepspeed.__version__, transformers=transformers.__version__,
                                          load_average_at_start=load_start, load_average_at_end=load_end,
                                          threads_per_rank=1),
        "config": {"quick": args.quick, "ways": args.way_list, "sizes": {k: SIZES[k] for k in args.sizes.split(",")},
                   "loss": "engine(input_ids=ids, labels=ids).loss; SGD lr 0.01", "loss_tolerance": LOSS_TOLERANCE},
        "definitions": DEFINITIONS,
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    path = common.write_json(args.out, payload)
    print(f"wrote {path} ({payload['wall_s']:.0f}s)")
    return 1 if any(r.get("error") for res in results for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
