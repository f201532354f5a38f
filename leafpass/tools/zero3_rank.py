"""One rank of one way of :mod:`.zero3_compare`: build the model, flag its ``MoEBlock``s,
set up DeepSpeed ZeRO-3, compile as the way says, train ``spec.steps`` steps, and return
the rank's figures (run in fresh rank processes by :func:`.zero3_compare.run_way`)."""

from __future__ import annotations

import time
from typing import Any

from .zero3_probes import CountingBackend, HookTimer, peak_rss_mb, quiet_logs
from .zero3_ways import WAY_SETUPS, CompareSpec, z3leaf_options

__all__ = ["batch_of", "rank_body"]


def batch_of(seed: int, rank: int, step: int, tokens: int, d: int):
    import torch

    gen = torch.Generator().manual_seed(((seed * 1_000_003) + rank) * 100_003 + step)
    return torch.randn(tokens, d, generator=gen), torch.randn(tokens, d, generator=gen)


def rank_body(rank: int, world_size: int, way: str, spec: CompareSpec) -> dict[str, Any]:
    """Train ``spec.steps`` steps of one way on this rank; return its figures."""
    import torch
    import torch.nn.functional as F

    wall_start = time.perf_counter()
    bar = None
    if spec.progress and rank == 0:
        import sys

        import threading

        from tqdm import tqdm

        # A thread lock: tqdm's default also makes a multiprocessing lock, a semaphore that
        # this rank (which leaves with os._exit) would leave to the resource tracker.
        tqdm.set_lock(threading.RLock())
        bar = tqdm(
            total=spec.steps,
            file=sys.stderr,
            desc=f"{way:8s} setting up",
            bar_format="{desc} |{bar:16}| {elapsed}",
            dynamic_ncols=False,
            leave=True,
        )

    import deepspeed

    limit_hits = quiet_logs(spec.quiet)

    from leafpass import gather_stats
    from .deepspeed_probe import GatheredElementsTracker, count_collectives
    from leafpass.testing.distributed import zero3_config
    from leafpass.testing.models import MoEBlock, MoEStack

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()

    torch.manual_seed(spec.seed)  # identical weights on every rank
    model = MoEStack(spec.d, spec.n_layers, spec.n_experts, spec.top_k, spec.hidden)
    deepspeed.utils.set_z3_leaf_modules(model, [MoEBlock])  # before deepspeed.initialize
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    way_backend, way_limits, _ = WAY_SETUPS[way]
    config = zero3_config(1, **spec.zero_kwargs(way_limits))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    counting = None
    if way_backend is not None:
        backend: Any = way_backend
        compile_kwargs: dict[str, Any] = {}
        if way_backend == "z3leaf":
            compile_kwargs["options"] = z3leaf_options(way, spec)
        if spec.hook_timing:
            backend = counting = CountingBackend(way_backend, compile_kwargs.pop("options", None))
        engine.compile(backend=backend, compile_kwargs=compile_kwargs)
    tracker = GatheredElementsTracker(engine.module)

    timer = None
    if spec.hook_timing and rank == 0:
        timer = HookTimer()
        timer.install(engine)

    setup_s = time.perf_counter() - wall_start
    losses: list[float] = []
    step_s: list[float] = []
    step_cpu_s: list[float] = []
    phases: list[dict[str, float]] = []
    gathers: list[dict[str, int]] = []
    hook_steps: list[dict[str, float]] = []
    hook_calls: list[dict[str, int]] = []
    graph_runs: list[dict[str, float]] = []
    graphs_after_first = breaks_after_first = None
    peak_gathered: list[int] = []
    with count_collectives() as coll, tracker:
        for step in range(spec.steps):
            tracker.reset()
            x, target = batch_of(spec.seed, rank, step, spec.tokens, spec.d)
            before = coll.snapshot()
            hooks_before = timer.snapshot() if timer else None
            runs_before = (counting.runs, counting.seconds) if counting else None
            c0 = time.process_time()
            t0 = time.perf_counter()
            loss = F.mse_loss(engine(x), target)
            t1 = time.perf_counter()
            engine.backward(loss)
            t2 = time.perf_counter()
            engine.step()
            t3 = time.perf_counter()
            step_cpu_s.append(time.process_time() - c0)
            tracker.sample()
            peak_gathered.append(tracker.peak)
            losses.append(float(loss.detach()))
            step_s.append(t3 - t0)
            phases.append({"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2})
            gathers.append(coll.delta(before, coll.snapshot()))
            if timer:
                sec, calls = timer.snapshot()
                hook_steps.append({k: v - hooks_before[0].get(k, 0.0) for k, v in sec.items()})
                hook_calls.append({k: v - hooks_before[1].get(k, 0) for k, v in calls.items()})
            if counting:
                graph_runs.append(
                    {"runs": counting.runs - runs_before[0], "seconds": counting.seconds - runs_before[1]}
                )
            if step == 0:
                graphs_after_first = int(counters["stats"]["unique_graphs"])
                breaks_after_first = int(sum(counters["graph_break"].values()))
            if bar is not None:
                bar.set_description_str(f"{way:8s} step {step + 1}/{spec.steps} loss {losses[-1]:.4f}")
                bar.update(1)
    if bar is not None:
        bar.close()

    graphs = int(counters["stats"]["unique_graphs"])
    breaks = int(sum(counters["graph_break"].values()))
    stats = gather_stats(engine.module) if way_backend == "z3leaf" else None
    policy = getattr(stats, "policy", None)
    gather_settings = None
    if policy == "module" and getattr(stats, "module_settings", None) is not None:
        bucket, distance = stats.module_settings
        gather_settings = {"bucket_elements": bucket, "prefetch_distance": distance}
    reasons: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        text = str(reason).strip().splitlines()
        key = text[0][:160] if text else "?"
        reasons[key] = reasons.get(key, 0) + int(count)
    return {
        "rank": rank,
        "losses": losses,
        "step_s": step_s,
        "step_cpu_s": step_cpu_s,
        "phases": phases,
        "collectives": gathers,
        "graphs": graphs if way != "eager" else 0,
        "graph_breaks": breaks if way != "eager" else 0,
        "graphs_after_first_step": graphs_after_first if way != "eager" else 0,
        "graph_breaks_after_first_step": breaks_after_first if way != "eager" else 0,
        "graph_break_reasons": reasons,
        "recompile_limit_hits": limit_hits.hits,
        "unimplemented": {str(k)[:400]: int(v) for k, v in counters["unimplemented"].items()},
        "frames": dict(counters["frames"]),
        "hook_seconds": hook_steps,
        "hook_calls": hook_calls,
        "graph_runs": graph_runs,
        "setup_s": setup_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gathered": peak_gathered,
        "zero_limits": way_limits or spec.zero_limits,
        "gather": policy,
        "gather_settings": gather_settings,
    }
