"""Eager ZeRO-3 vs ``engine.compile(backend="inductor")`` vs ``engine.compile(backend="z3leaf")``.

The same :class:`~leafpass.testing.models.MoEStack` and the same data, trained under
DeepSpeed ZeRO-3 on N CPU ranks (gloo, :func:`leafpass.testing.distributed.run_ranks`),
in several ways (:data:`WAY_SETUPS`):

* ``eager``: the engine as DeepSpeed builds it, not compiled, with the spec's ZeRO-3
  limits (DeepSpeed's defaults unless ``zero_limits`` says otherwise);
* ``eager_strict``: the same with strict limits (gather each module at its entry, release
  it after use: ZeRO-3 when the model does not fit);
* ``inductor``: ``engine.compile(backend="inductor")``: Dynamo inlines every module, so
  the MoE routing (``nonzero``, a Python ``if`` on a token count) and DeepSpeed's module
  hooks break the graph;
* ``z3leaf``, ``z3leaf_step``, ``z3leaf_hooks``: ``engine.compile(backend="z3leaf")``
  (inner compiler inductor unless ``inner`` says otherwise) with ``gather`` ``auto``,
  ``step`` or ``hooks``: every ``MoEBlock`` stays opaque, gathered by one
  ``prefetch_all`` per call; the other modules are gathered in one all-gather before the
  compiled forward (``step``) or by DeepSpeed's module hooks (``hooks``);
* ``z3leaf_strict``: z3leaf with ``gather="auto"`` under strict limits, where the model
  does not fit under ``stage3_max_live_parameters`` (0), so ``auto`` picks ``module``
  with the engine's own bucket settings (``stage3_prefetch_bucket_size`` 0: one gather per
  module, no prefetch);
* ``z3leaf_module``: z3leaf with ``gather="module"`` under strict limits and the extra
  z3leaf options of :data:`WAY_OPTIONS` (buckets of up to 600,000 elements, no prefetch):
  the compiled graph gathers the non-leaf parameters itself, each stretch between two
  leaves in one all-gather, and frees them after their last use.

::

    from leafpass.tools.zero3_compare import CompareSpec, compare, markdown_table, reading

    rows = compare(CompareSpec(steps=8, ranks=2))
    print(markdown_table(rows)); print(reading(rows))

Each way runs in fresh rank processes (Dynamo is also reset in each rank before it
starts). In every rank: weights from the same seed, ``MoEBlock`` flagged with
``deepspeed.utils.set_z3_leaf_modules`` BEFORE ``deepspeed.initialize``, a
``torch.optim.SGD`` optimizer, :func:`~leafpass.testing.distributed.zero3_config`; step
``i`` of rank ``r`` trains on its own batch (``x``, ``target`` drawn from a generator
seeded by ``(seed, r, i)``), so the ranks route tokens to different experts. A step is
``loss = mse(engine(x), target); engine.backward(loss); engine.step()``.

Row keys (one row per way; see :data:`DEFINITIONS`): ``graphs``, ``graph_breaks``,
``all_gathers_per_step``, ``compile_s``, ``median_step_ms``, ``final_loss``,
``losses_match_eager`` and more (all losses, per-step figures, peak RSS per rank).

With ``hook_timing=True`` (a diagnostic pass: its step times include the timers'
overhead and its graphs may differ), rank 0 also times DeepSpeed ZeRO-3's per-module
fetch/release functions (what its module hooks call) and leafpass's ``prefetch_all``,
split into leaf and non-leaf modules, forward and backward, and counts the compiled
forward graphs run per step (the compiled "islands" between eager code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "DEFINITIONS",
    "INNER_CHOICES",
    "LOSS_TOLERANCE",
    "MODULE_GOAL_VS_EAGER_STRICT",
    "WAYS",
    "WAY_OPTIONS",
    "WAY_SETUPS",
    "ZERO_PRESETS",
    "CompareSpec",
    "DeepSpeedMissing",
    "check_deepspeed",
    "compare",
    "gather_cell",
    "markdown_table",
    "module_goal",
    "reading",
    "run_way",
    "z3leaf_options",
]

WAYS = ("eager", "eager_strict", "inductor", "inductor_strict", "z3leaf", "z3leaf_step", "z3leaf_strict",
        "z3leaf_module", "z3leaf_hooks")
# way -> (backend, ZeRO-3 limits preset or None for the spec's, z3leaf's gather option)
WAY_SETUPS: dict[str, tuple[str | None, str | None, str | None]] = {
    "eager": (None, None, None),
    "eager_strict": (None, "strict", None),
    "inductor": ("inductor", None, None),
    "inductor_strict": ("inductor", "strict", None),
    "z3leaf": ("z3leaf", None, "auto"),
    "z3leaf_step": ("z3leaf", None, "step"),
    "z3leaf_strict": ("z3leaf", "strict", "auto"),
    "z3leaf_module": ("z3leaf", "strict", "module"),
    "z3leaf_hooks": ("z3leaf", None, "hooks"),
}
# way -> more z3leaf options (besides inner and gather); ways not named pass none, so
# gather="module" takes its bucket size and prefetch distance from the engine's config.
# z3leaf_module: buckets of up to 600,000 elements hold every stretch between two leaves
# of the benchmark's MoEStack (d=256: at most ~330,000 elements) in one all-gather; no
# prefetch, so no bucket or leaf is in flight while another is gathered, and at most one
# bucket (its receive buffer and its weights while they are cut apart) or one leaf (~2.1e6
# elements) is whole at a time: no more than eager ZeRO-3 under strict limits holds. A
# prefetch distance of 1 would gather the next leaf while the last bucket is alive: faster
# on a network that overlaps, but above eager's peak (GatheredElementsTracker counts
# gathers in flight).
WAY_OPTIONS: dict[str, dict[str, Any]] = {
    "z3leaf_module": {"bucket_elements": 600_000, "prefetch_distance": 0},
}
# the goal of gather="module": a step at most this fraction of eager ZeRO-3's under strict
# limits, at no higher peak gathered elements
MODULE_GOAL_VS_EAGER_STRICT = 0.8
from leafpass import INNER_COMPILERS as INNER_CHOICES  # noqa: E402  (one list: the backend's)
LOSS_TOLERANCE = 1e-5  # max |loss - eager loss| over every step of every rank

# ZeRO-3 limits (zero3_config keyword arguments). "strict": gather each module when it is
# entered and release it right after use, as ZeRO-3 does when the model does not fit, so
# every gather shows up in the all-gather count. "default": DeepSpeed's own limits, which
# keep a model this small gathered from one step to the next (few all-gathers per step).
ZERO_PRESETS: dict[str, dict[str, Any]] = {
    "strict": {"max_live_parameters": 0, "max_reuse_distance": 0, "prefetch_bucket_size": 0},
    "default": {},
}

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


class DeepSpeedMissing(RuntimeError):
    """DeepSpeed is not installed (or not importable)."""


def check_deepspeed() -> str:
    """DeepSpeed's version; raise :class:`DeepSpeedMissing` with an install hint if it is missing."""
    try:
        from leafpass.runtime import engine_version

        return engine_version("deepspeed")
    except ImportError as exc:
        raise DeepSpeedMissing(
            f"DeepSpeed is not installed ({exc}); install it with: pip install 'leafpass[deepspeed]'"
        ) from exc


@dataclasses.dataclass
class CompareSpec:
    """What to train and how. ``zero`` updates :func:`zero3_config`'s keyword arguments."""

    d: int = 64
    n_layers: int = 2
    n_experts: int = 8
    top_k: int = 2
    hidden: int | None = None
    tokens: int = 32  # per rank and step
    steps: int = 8  # warm-up steps, then steady (timed) steps
    # Untimed steps: the first compiles; the second recompiles what new routing changed
    # (dynamic shapes, guards on DeepSpeed's counters). None: 2, or 1 when steps < 3.
    warmup: int | None = None
    ranks: int = 2
    inner: str = "inductor"  # z3leaf's compiler for the non-leaf pieces
    seed: int = 0
    lr: float = 0.1
    zero_limits: str = "default"  # a ZERO_PRESETS name (ways named *_strict use "strict")
    zero: dict[str, Any] = dataclasses.field(default_factory=dict)  # more zero3_config kwargs
    hook_timing: bool = False
    quiet: bool = True  # silence DeepSpeed's info logs and Dynamo's recompile-limit warnings
    # "fresh": each way compiles into its own empty Inductor cache (cold compiles, and a
    # later way cannot reuse kernels an earlier one compiled); "shared": the usual
    # on-disk cache, so reruns are faster but compile seconds depend on what ran before.
    inductor_cache: str = "fresh"
    progress: bool = False  # a tqdm bar on rank 0 (stderr)
    timeout: float = 900.0  # seconds per way (all ranks)

    def __post_init__(self) -> None:
        if self.warmup is None:
            self.warmup = max(1, min(2, self.steps - 1))
        problems = []
        for name in ("d", "n_layers", "n_experts", "top_k", "tokens", "ranks"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.warmup < 1:
            problems.append("warmup must be >= 1 (the first step compiles)")
        elif self.steps <= self.warmup:
            problems.append(f"steps must be > warmup ({self.warmup}): the steps after the warm-up are timed")
        if self.top_k > self.n_experts:
            problems.append(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.inductor_cache not in ("fresh", "shared"):
            problems.append("inductor_cache must be 'fresh' or 'shared'")
        if self.zero_limits not in ZERO_PRESETS:
            problems.append(f"zero_limits must be one of {list(ZERO_PRESETS)}")
        if self.inner not in INNER_CHOICES:
            problems.append(f"inner must be one of {list(INNER_CHOICES)}")
        if problems:
            raise ValueError("; ".join(problems))

    def zero_kwargs(self, limits: str | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`~leafpass.testing.distributed.zero3_config`, with the
        ``limits`` preset (a way's own) instead of ``zero_limits`` if given."""
        return {**ZERO_PRESETS[limits or self.zero_limits], **self.zero}

    def model_config(self) -> dict[str, Any]:
        return {
            "class": "MoEStack",
            "d": self.d,
            "n_layers": self.n_layers,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "hidden": self.hidden or 2 * self.d,
            "leaf_classes": ["MoEBlock"],
        }


# ----------------------------------------------------------------------------- one rank


def _batch(seed: int, rank: int, step: int, tokens: int, d: int):
    import torch

    gen = torch.Generator().manual_seed(((seed * 1_000_003) + rank) * 100_003 + step)
    return torch.randn(tokens, d, generator=gen), torch.randn(tokens, d, generator=gen)


class _HookTimer:
    """Times DeepSpeed ZeRO-3's per-module fetch/release functions and leafpass's prefetch_all.

    DeepSpeed's module hooks call ``pre/post_sub_module_forward_function`` and
    ``pre/post_sub_module_backward_function`` of the ``DeepSpeedZeRoOffload`` object
    (looked up on ``self`` at each call), so instance attributes replace them. The timers
    are wrapped in ``torch.compiler.disable`` so Dynamo runs them eagerly, as it does
    DeepSpeed's own pre-forward hook.
    """

    KINDS = {
        "pre_sub_module_forward_function": "fwd_fetch",
        "post_sub_module_forward_function": "fwd_release",
        "pre_sub_module_backward_function": "bwd_fetch",
        "post_sub_module_backward_function": "bwd_release",
    }

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def install(self, engine) -> None:
        import torch

        from leafpass.runtime import runtime_for

        # DeepSpeed's own handle on the object whose methods its module hooks call
        offload = getattr(engine.optimizer, "parameter_offload", None)
        if offload is None:
            raise RuntimeError("hook timing: no DeepSpeed ZeRO-3 hooks found on the engine's module")
        for method, kind in self.KINDS.items():
            original = getattr(offload, method)

            def timed(sub_module, _original=original, _kind=kind):
                where = "leaf" if getattr(sub_module, "_z3_leaf", False) else "nonleaf"
                start = time.perf_counter()
                try:
                    return _original(sub_module)
                finally:
                    self._add(f"{_kind}.{where}", time.perf_counter() - start)

            setattr(offload, method, torch.compiler.disable(timed))

        runtime = runtime_for(list(engine.module.parameters()))  # DeepSpeed's, process-wide
        original_prefetch = runtime.prefetch_all

        def timed_prefetch(leaf, params):
            start = time.perf_counter()
            try:
                return original_prefetch(leaf, params)
            finally:
                self._add("prefetch_all.leaf", time.perf_counter() - start)

        runtime.prefetch_all = timed_prefetch

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        return dict(self.seconds), dict(self.calls)


class _CountingBackend:
    """Wraps a Dynamo backend; counts the compiled forward graphs run and their wall time."""

    def __init__(self, backend, options: dict[str, Any] | None = None) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.backend = lookup_backend(backend) if isinstance(backend, str) else backend
        self.__wrapped__ = self.backend  # leafpass recognises its backend through wrappers
        self.__name__ = getattr(self.backend, "__name__", str(backend))
        self.options = options
        self._leafpass_options = options or {}  # what leafpass reads before the frame is entered
        self.runs = 0
        self.seconds = 0.0

    def __call__(self, gm, example_inputs, **kwargs):
        if self.options:
            kwargs.setdefault("options", self.options)
        compiled = self.backend(gm, example_inputs, **kwargs)

        def run(*args):
            start = time.perf_counter()
            try:
                return compiled(*args)
            finally:
                self.runs += 1
                self.seconds += time.perf_counter() - start

        return run


def _rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class _RecompileLimitCounter:
    """A filter on Dynamo's convert_frame logger: counts "hit config.recompile_limit" warnings
    (a frame Dynamo gives up on and runs eagerly from then on) and drops them if ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.hits = 0

    def filter(self, record) -> bool:
        if "recompile_limit" in record.getMessage():
            self.hits += 1
            return not self.quiet
        return True


def _quiet_logs(quiet: bool) -> _RecompileLimitCounter:
    import logging
    import warnings

    counter = _RecompileLimitCounter(quiet)
    logging.getLogger("torch._dynamo.convert_frame").addFilter(counter)
    if quiet:
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)  # DeepSpeed's info lines and its "untested optimizer" warning
        warnings.filterwarnings("ignore", category=UserWarning, module=r"deepspeed(\.|$)")
        warnings.filterwarnings("ignore", message=r".*functools\.lru_cache.*")  # Dynamo, on DeepSpeed's nvtx
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    return counter


def z3leaf_options(way: str, spec: CompareSpec) -> dict[str, Any] | None:
    """The ``options`` a z3leaf way compiles with: ``inner``, ``gather`` and the way's
    :data:`WAY_OPTIONS`; None for the other ways."""
    backend, _, gather = WAY_SETUPS[way]
    if backend != "z3leaf":
        return None
    return {"inner": spec.inner, "gather": gather, **WAY_OPTIONS.get(way, {})}


def _rank_body(rank: int, world_size: int, way: str, spec: CompareSpec) -> dict[str, Any]:
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

    limit_hits = _quiet_logs(spec.quiet)

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
            backend = counting = _CountingBackend(way_backend, compile_kwargs.pop("options", None))
        engine.compile(backend=backend, compile_kwargs=compile_kwargs)
    tracker = GatheredElementsTracker(engine.module)

    timer = None
    if spec.hook_timing and rank == 0:
        timer = _HookTimer()
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
            x, target = _batch(spec.seed, rank, step, spec.tokens, spec.d)
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
        "peak_rss_mb": _rss_mb(),
        "peak_gathered": peak_gathered,
        "zero_limits": way_limits or spec.zero_limits,
        "gather": policy,
        "gather_settings": gather_settings,
    }


# ---------------------------------------------------------------------------- parent side

_ROW_KEYS = (
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


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _sum_keys(step: dict[str, float], prefix: str = "", where: str = "") -> float:
    return sum(v for k, v in step.items() if k.startswith(prefix) and k.endswith(where))


def _hook_summary(r0: dict[str, Any], steady: slice) -> dict[str, Any] | None:
    """Per steady step medians of rank 0's hook times (ms) and calls."""
    hook_steps = r0["hook_seconds"][steady]
    if not hook_steps:
        return None
    keys = sorted({k for s in hook_steps for k in s})
    per_key_ms = {k: _median([s.get(k, 0.0) * 1e3 for s in hook_steps]) for k in keys}
    calls = {k: _median([c.get(k, 0) for c in r0["hook_calls"][steady]]) for k in keys}
    step_ms = [s * 1e3 for s in r0["step_s"][steady]]
    ds_keys = [k for k in keys if not k.startswith("prefetch_all")]
    nonleaf = [sum(s.get(k, 0.0) for k in ds_keys if k.endswith(".nonleaf")) * 1e3 for s in hook_steps]
    leaf = [sum(s.get(k, 0.0) for k in ds_keys if k.endswith(".leaf")) * 1e3 for s in hook_steps]
    prefetch = [s.get("prefetch_all.leaf", 0.0) * 1e3 for s in hook_steps]
    total = [a + b + c for a, b, c in zip(nonleaf, leaf, prefetch)]
    out: dict[str, Any] = {
        "per_kind_ms": per_key_ms,
        "calls_per_step": calls,
        "nonleaf_ms": _median(nonleaf),
        "leaf_ms": _median(leaf),
        "prefetch_all_ms": _median(prefetch),
        "total_ms": _median(total),
        "nonleaf_calls": sum(v for k, v in calls.items() if k.endswith(".nonleaf")),
        "step_ms": _median(step_ms),
        "nonleaf_fraction": _median([n / s for n, s in zip(nonleaf, step_ms) if s > 0]),
        "total_fraction": _median([t / s for t, s in zip(total, step_ms) if s > 0]),
    }
    runs = r0["graph_runs"][steady]
    if runs:
        out["graph_runs_per_step"] = _median([g["runs"] for g in runs])
        out["in_forward_graphs_ms"] = _median([g["seconds"] * 1e3 for g in runs])
        fwd = [p["forward_s"] * 1e3 for p in r0["phases"][steady]]
        out["forward_ms"] = _median(fwd)
        out["forward_outside_graphs_fraction"] = _median(
            [(f - g["seconds"] * 1e3) / f for f, g in zip(fwd, runs) if f > 0]
        )
    return out


def _row(way: str, spec: CompareSpec, ranks: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    r0 = ranks[0]
    steady = slice(spec.warmup, None)
    steady_s = r0["step_s"][steady]
    median_s = _median(steady_s)
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
        "all_gathers_per_step": _median(gathers),
        "compile_s": sum(warmup_s) - len(warmup_s) * median_s,
        "first_step_compile_s": r0["step_s"][0] - median_s,
        "first_step_s": r0["step_s"][0],
        "median_step_ms": median_s * 1e3,
        "median_step_cpu_ms": _median(r0["step_cpu_s"][steady]) * 1e3,
        "median_step_cpu_ms_per_rank": [_median(r["step_cpu_s"][steady]) * 1e3 for r in ranks],
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
            k: _median([p[k] * 1e3 for p in r0["phases"][steady]]) for k in ("forward_s", "backward_s", "optimizer_s")
        },
        "collectives_per_step": [c for c in r0["collectives"]],
        "all_gathers_per_step_max_rank": max(
            (_median([c.get("all_gather", 0) for c in r["collectives"][steady]]) or 0) for r in ranks
        ),
        "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
        "setup_s": r0["setup_s"],
        "wall_s": wall_s,
        "hook_timing": spec.hook_timing,
        "error": None,
    }
    row["phase_ms"] = {k.replace("_s", "_ms"): v for k, v in row["phase_ms"].items()}
    if spec.hook_timing:
        row["hooks"] = _hook_summary(r0, steady)
    return row


def run_way(way: str, spec: CompareSpec, *, keep_going: bool = True) -> dict[str, Any]:
    """Run one way on ``spec.ranks`` fresh processes; return its row (not yet compared).

    If its ranks fail (an error, a crash, a hang past ``spec.timeout``), the row has every
    figure None and ``error`` set, unless ``keep_going`` is False: then the error is raised.
    """
    if way not in WAYS:
        raise ValueError(f"unknown way {way!r}; choose from {list(WAYS)}")
    check_deepspeed()
    from leafpass.testing.distributed import DistributedRunError, run_ranks

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        env = {}
        if spec.inductor_cache == "fresh" and way != "eager":
            env["TORCHINDUCTOR_CACHE_DIR"] = stack.enter_context(
                tempfile.TemporaryDirectory(prefix=f"leafpass-{way}-inductor-")
            )
        try:
            ranks = run_ranks(
                _rank_body,
                way,
                spec,
                world_size=spec.ranks,
                timeout=spec.timeout,
                pg_timeout=max(60.0, spec.timeout / 2),
                env=env,
            )
        except DistributedRunError as exc:
            if not keep_going:
                raise
            return _failed_row(way, spec, exc, time.perf_counter() - start)
    row = _row(way, spec, ranks, time.perf_counter() - start)
    row["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return row


def _failed_row(way: str, spec: CompareSpec, exc: Exception, wall_s: float) -> dict[str, Any]:
    """A row for a way whose ranks failed: every figure None, ``error`` says why."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # The root-cause rank's traceback ends with its exception line; hung ranks are named first.
    reason = lines[0] if lines and lines[0].startswith("rank(s)") else None
    if reason is None:
        tb_lines = [ln for ln in lines if not ln.startswith(("File ", "^", "rank ")) and ":" in ln]
        reason = next((ln for ln in reversed(tb_lines[: _first_other_rank(lines)]) if ln), lines[-1] if lines else "?")
    row = {key: None for key in _ROW_KEYS}
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


def compare(
    spec: CompareSpec,
    ways: Iterable[str] = WAYS,
    *,
    on_start: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    keep_going: bool = True,
) -> list[dict[str, Any]]:
    """Run each way (eager first, if asked for, as the reference); one row per way.

    A way that fails gives a row with ``error`` set (see :func:`run_way`) and the others
    still run, unless ``keep_going`` is False."""
    ways = list(dict.fromkeys(ways))
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        raise ValueError(f"unknown way(s) {unknown}; choose from {list(WAYS)}")
    check_deepspeed()
    rows = []
    for way in sorted(ways, key=WAYS.index):
        if on_start is not None:
            on_start(way)
        row = run_way(way, spec, keep_going=keep_going)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return attach_comparison(rows)


# ------------------------------------------------------------------------------- report

TABLE_COLUMNS = [
    ("way", "way"),
    ("gather", "gather"),
    ("graphs", "graphs"),
    ("graph_breaks", "graph breaks"),
    ("frames_skipped", "frames run eagerly"),
    ("all_gathers_per_step", "all-gathers/step"),
    ("peak_gathered_elements", "peak gathered elems"),
    ("compile_s", "compile s"),
    ("median_step_ms", "median step ms"),
    ("median_step_cpu_ms", "step CPU ms"),
    ("final_loss", "final loss"),
    ("losses_match_eager", "losses = eager"),
    ("peak_rss_mb", "peak RSS MiB (max rank)"),
]


WAY_LABELS = {
    "eager": "eager ZeRO-3",
    "eager_strict": "eager ZeRO-3, strict limits",
    "inductor": "engine.compile(inductor)",
    "inductor_strict": "engine.compile(inductor), strict",
    "z3leaf": "z3leaf (gather auto)",
    "z3leaf_step": "z3leaf gather=step",
    "z3leaf_strict": "z3leaf, strict (auto: module)",
    "z3leaf_module": "z3leaf gather=module, strict",
    "z3leaf_hooks": "z3leaf gather=hooks",
}


def gather_cell(row: dict[str, Any]) -> str:
    """The gather policy a z3leaf way ran with (``auto`` resolved), and for ``module`` its
    bucket size (elements; 0: one gather per module) and prefetch distance; ``-`` otherwise."""
    policy = row.get("gather")
    if not policy:
        return "-"
    settings = row.get("gather_settings")
    if settings:
        return f"{policy} (bucket {settings['bucket_elements']:,}, prefetch {settings['prefetch_distance']})"
    return str(policy)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "way":
        return WAY_LABELS.get(value, str(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "peak_rss_mb":
        return f"{max(value):.0f}"
    if key == "compile_s":
        return f"{value:.1f}"
    if key in ("median_step_ms", "median_step_cpu_ms"):
        return f"{value:.1f}"
    if key == "final_loss":
        return f"{value:.6f}"
    if key in ("all_gathers_per_step", "peak_gathered_elements"):
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = TABLE_COLUMNS) -> str:
    """The rows side by side, one line per way, as a markdown table."""
    headers = [h for _, h in columns]
    body = []
    for row in rows:
        cells = [
            gather_cell(row) if k == "gather"
            else _cell(k, None if (k == "compile_s" and row.get("backend") is None) else row.get(k))
            for k, _ in columns
        ]
        if row.get("error") and columns and columns[0][0] == "way":
            cells[0] += " (FAILED)"
        body.append(cells)
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in body])


def module_goal(row: dict[str, Any], eager_strict: dict[str, Any]) -> dict[str, Any]:
    """``row`` (a way that ran ``gather="module"`` under strict limits) against eager ZeRO-3
    under strict limits: step time ratio (wall and CPU) and peak gathered elements, and
    whether it meets the goal (<= :data:`MODULE_GOAL_VS_EAGER_STRICT` x the step time at no
    higher peak gathered elements)."""
    ratio = row["median_step_ms"] / eager_strict["median_step_ms"]
    peak, ref_peak = row.get("peak_gathered_elements"), eager_strict.get("peak_gathered_elements")
    met_memory = peak is not None and ref_peak is not None and peak <= ref_peak
    met_time = ratio <= MODULE_GOAL_VS_EAGER_STRICT
    return {
        "way": row["way"], "gather_settings": row.get("gather_settings"),
        "ms": row["median_step_ms"], "eager_strict_ms": eager_strict["median_step_ms"], "ratio": ratio,
        "cpu_ratio": row["median_step_cpu_ms"] / eager_strict["median_step_cpu_ms"],
        "goal": MODULE_GOAL_VS_EAGER_STRICT, "met_time": met_time,
        "peak_gathered": peak, "eager_strict_peak_gathered": ref_peak, "met_memory": met_memory,
        "met": met_time and met_memory,
    }


def _strict_module_row(row: dict[str, Any]) -> bool:
    return row.get("gather") == "module" and row.get("zero_limits") == "strict"


def reading(rows: Sequence[dict[str, Any]]) -> str:
    """One paragraph that reads the table: graphs/breaks, step times against eager ZeRO-3 (with
    the spec's limits and with strict ones), all-gathers, peak gathered elements, losses; and,
    for the ways that ran ``gather="module"`` under strict limits, the goal against eager ZeRO-3
    with strict limits (step time and peak gathered elements)."""
    ok = [r for r in rows if not r.get("error")]
    by = {r["way"]: r for r in ok}
    eager, strict = by.get("eager"), by.get("eager_strict")
    parts = []
    for r in ok:
        if r["backend"] is None:
            continue
        text = f"{r['way']}: {r['graphs']} graphs / {r['graph_breaks']} breaks"
        if r.get("gather"):
            settings = r.get("gather_settings")
            text += f" (gather={r['gather']}" + (
                f", buckets of {settings['bucket_elements']:,} elements, prefetch distance "
                f"{settings['prefetch_distance']}" if settings else "") + ")"
        text += f", median step {r['median_step_ms']:.1f} ms"
        for ref in (eager, strict):
            if ref:
                text += (f", {r['median_step_ms'] / ref['median_step_ms']:.2f}x {ref['way']} "
                         f"(CPU {r['median_step_cpu_ms'] / ref['median_step_cpu_ms']:.2f}x)")
        if strict and r.get("zero_limits") == "strict" and r.get("peak_gathered_elements") is not None:
            text += (f", peak gathered {_cell('peak_gathered_elements', r['peak_gathered_elements'])} vs "
                     f"eager_strict's {_cell('peak_gathered_elements', strict.get('peak_gathered_elements'))}")
        parts.append(text + f", compile {r['compile_s']:.1f} s")
    if strict:
        for r in ok:
            if _strict_module_row(r):
                g = module_goal(r, strict)
                parts.append(
                    f"goal of gather=module, {r['way']} <= {g['goal']:g}x eager_strict at no higher peak gathered "
                    f"elements: step {g['ratio']:.2f}x ({'met' if g['met_time'] else 'NOT met'}; CPU "
                    f"{g['cpu_ratio']:.2f}x), peak {_cell('peak_gathered_elements', g['peak_gathered'])} vs "
                    f"{_cell('peak_gathered_elements', g['eager_strict_peak_gathered'])} "
                    f"({'met' if g['met_memory'] else 'NOT met'})"
                )
    for r in ok:
        if r["backend"] is None:
            parts.append(f"{r['way']}: median step {r['median_step_ms']:.1f} ms")
    if ok:
        gathers = ", ".join(f"{r['way']} {_cell('all_gathers_per_step', r['all_gathers_per_step'])}" for r in ok)
        parts.append(f"all-gathers per step: {gathers}")
        peaks = ", ".join(f"{r['way']} {_cell('peak_gathered_elements', r.get('peak_gathered_elements'))}" for r in ok)
        parts.append(f"peak gathered elements: {peaks}")
    if eager:
        match = [
            f"{r['way']} {'yes' if r['losses_match_eager'] else 'NO'} (max diff {r['loss_max_abs_diff']:.1e})"
            for r in ok
            if r["way"] != "eager"
        ]
        if match:
            parts.append(f"losses match eager (every step of every rank, tolerance {LOSS_TOLERANCE:g}): "
                         + ", ".join(match))
    elif ok:
        parts.append("losses not compared (eager ZeRO-3 did not run)")
    for r in rows:
        if r.get("error"):
            parts.append(f"{r['way']} FAILED: {r['error']}")
    return "; ".join(parts) + "."
