"""``python -m leafpass demo``: train a small MoE under DeepSpeed ZeRO-3 on CPU ranks, five ways.

Under DeepSpeed's default limits, eager ZeRO-3 and ``engine.compile(backend="z3leaf")``
(whose ``gather="auto"`` gathers the whole model once per step: one graph per forward);
under strict limits (each module gathered at its entry, released after use), eager ZeRO-3,
``engine.compile(backend="inductor")`` and z3leaf (``auto`` then picks ``gather="module"``:
the compiled graph gathers each non-leaf module itself, right before its first use, and
frees it after its last, one graph per forward as well). They train the same ``MoEStack``
on the same data (each rank its own batches, so the ranks route tokens differently); a
progress bar per way on stderr, then a table side by side on stdout, ending with at most
five short lines (:mod:`leafpass.tools.summary`): graphs and breaks, step time against
eager ZeRO-3 (wall and CPU), losses equal or not, peak gathered elements. ``--explain``
prints the long reading too (goals, bucket settings, all-gathers); ``--json`` keeps it. ``--ways`` adds others, e.g. ``z3leaf_module``
(``gather="module"`` with larger buckets). See :mod:`leafpass.tools.zero3_compare` for what each
column means. Offline, CPU only (gloo), a few minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .zero3_compare import (
    DEFINITIONS,
    INNER_CHOICES,
    LOSS_TOLERANCE,
    WAYS,
    ZERO_PRESETS,
    CompareSpec,
    DeepSpeedMissing,
    check_deepspeed,
    compare,
    markdown_table,
    reading,
)
from .summary import summary

__all__ = ["DEMO_WAYS", "main", "parse_args"]

# DeepSpeed's default limits and strict ones (each module gathered at its entry and released
# after use). engine.compile(backend="inductor") runs under strict limits only: under the
# default ones it fails on this model (a DeepSpeed assertion in the compiled backward).
# z3leaf's gather="auto" resolves to "step" under the default limits (the model fits) and
# to "module" under the strict ones (it does not fit under stage3_max_live_parameters=0).
DEMO_WAYS = ("eager", "z3leaf", "eager_strict", "inductor_strict", "z3leaf_strict")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def _ways(text: str) -> list[str]:
    ways = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in ways if w not in WAYS]
    if unknown or not ways:
        raise argparse.ArgumentTypeError(
            f"unknown way(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose a comma list of {', '.join(WAYS)}"
        )
    return list(dict.fromkeys(ways))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = CompareSpec()
    p = argparse.ArgumentParser(
        prog="python -m leafpass demo",
        description="Train a small MoE under DeepSpeed ZeRO-3 on CPU ranks (gloo) several ways: eager "
        "(DeepSpeed's default limits and strict ones), engine.compile(backend='inductor') and "
        "engine.compile(backend='z3leaf'); print them side by side.",
    )
    p.add_argument("--steps", type=_positive, default=defaults.steps,
                   help=f"training steps per way, warm-up included (default {defaults.steps}; at least 2)")
    p.add_argument("--warmup", type=_positive, default=None,
                   help="untimed steps at the start: the first compiles, the second recompiles what new routing "
                   "changed (default 2, or 1 when --steps is 2)")
    p.add_argument("--ranks", type=_positive, default=defaults.ranks, help=f"CPU ranks (default {defaults.ranks})")
    p.add_argument("--d", type=_positive, default=defaults.d, help=f"model width (default {defaults.d})")
    p.add_argument("--layers", type=_positive, default=defaults.n_layers,
                   help=f"MoE layers (default {defaults.n_layers})")
    p.add_argument("--experts", type=_positive, default=defaults.n_experts,
                   help=f"experts per MoE block (default {defaults.n_experts})")
    p.add_argument("--top-k", type=_positive, default=defaults.top_k,
                   help=f"experts per token (default {defaults.top_k})")
    p.add_argument("--tokens", type=_positive, default=defaults.tokens,
                   help=f"tokens per rank and step (default {defaults.tokens})")
    p.add_argument("--ways", type=_ways, default=list(DEMO_WAYS),
                   help=f"comma list of {','.join(WAYS)} (default {','.join(DEMO_WAYS)}; losses are compared "
                   "with eager's only if eager runs)")
    p.add_argument("--inner", choices=INNER_CHOICES, default=defaults.inner,
                   help=f"z3leaf's compiler for the non-leaf pieces (default {defaults.inner})")
    p.add_argument("--zero-limits", choices=list(ZERO_PRESETS), default=defaults.zero_limits,
                   help="ZeRO-3 limits of every way but eager_strict: 'default' keeps DeepSpeed's own limits "
                   "(default), 'strict' gathers each module at its entry and releases it after use")
    p.add_argument("--inductor-cache", choices=("fresh", "shared"), default="fresh",
                   help="'fresh': each way compiles into its own empty Inductor cache, so compile seconds are cold "
                   "and comparable (default); 'shared': the usual on-disk cache, faster reruns")
    p.add_argument("--seed", type=int, default=defaults.seed, help="weights and data seed (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the rows (and the settings) to this JSON file")
    p.add_argument("--timeout", type=_seconds, default=defaults.timeout,
                   help=f"seconds allowed per way, all ranks together (default {defaults.timeout:.0f})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--explain", action="store_true",
                   help="after the table, the long reading: goals, bucket settings, all-gathers, compile time")
    p.add_argument("--verbose", action="store_true",
                   help="keep DeepSpeed's info logs and Dynamo's recompile-limit warnings")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2: the first step compiles, the others are timed")
    if args.warmup is not None and args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be less than --steps ({args.steps}): the steps after it are timed")
    if args.top_k > args.experts:
        p.error(f"--top-k ({args.top_k}) must not exceed --experts ({args.experts})")
    return args


def spec_from_args(args: argparse.Namespace) -> CompareSpec:
    return CompareSpec(
        d=args.d,
        n_layers=args.layers,
        n_experts=args.experts,
        top_k=args.top_k,
        tokens=args.tokens,
        steps=args.steps,
        warmup=args.warmup,
        ranks=args.ranks,
        inner=args.inner,
        seed=args.seed,
        zero_limits=args.zero_limits,
        inductor_cache=args.inductor_cache,
        progress=not args.no_progress,
        quiet=not args.verbose,
        timeout=args.timeout,
    )


def _settings_line(spec: CompareSpec) -> str:
    return (
        f"MoEStack(d={spec.d}, layers={spec.n_layers}, experts={spec.n_experts}, top-{spec.top_k}), "
        f"MoEBlock flagged as the ZeRO-3 leaf; {spec.ranks} CPU ranks (gloo), {spec.tokens} tokens per rank and "
        f"step, {spec.steps} steps ({spec.warmup} warm-up); ZeRO-3 limits: {spec.zero_limits}"
        + (f"; z3leaf inner compiler: {spec.inner}" if spec.inner != "inductor" else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ds_version = check_deepspeed()
    except DeepSpeedMissing as exc:
        print(f"leafpass demo: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # an unsupported DeepSpeed version
        print(f"leafpass demo: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    spec = spec_from_args(args)
    print(_settings_line(spec), flush=True)
    print(f"each way runs in fresh rank processes: {', '.join(args.ways)}", flush=True)
    started = time.perf_counter()
    def starting(way: str) -> None:
        if spec.progress:
            print(f"{way}: starting {spec.ranks} ranks (spawn, import torch and deepspeed) ...",
                  file=sys.stderr, flush=True)

    rows = compare(spec, args.ways, on_start=starting)
    wall = time.perf_counter() - started
    sys.stderr.flush()
    print()
    print(markdown_table(rows))
    if args.explain:
        print()
        print("\n".join(part.strip() for part in reading(rows).split("; ")))
    print(f"\n(deepspeed {ds_version}; {wall:.0f} s in all; load average {_loadavg()}"
          + (f"; wrote {args.json}" if args.json else "; --explain for the long reading") + ")")
    if args.json:
        _write_json(args.json, spec, rows, wall, ds_version)
    print()
    print("\n".join(summary(rows, LOSS_TOLERANCE)), flush=True)
    return 1 if any(r.get("error") for r in rows) else 0


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def _write_json(path: str, spec: CompareSpec, rows: list[dict], wall: float, ds_version: str) -> None:
    import dataclasses

    import torch

    payload = {
        "command": "python -m leafpass demo",
        "settings": dataclasses.asdict(spec),
        "model": spec.model_config(),
        "zero3_config_kwargs": spec.zero_kwargs(),
        "loss_tolerance": LOSS_TOLERANCE,
        "definitions": DEFINITIONS,
        "environment": {
            "torch": torch.__version__,
            "deepspeed": ds_version,
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "wall_s": wall,
        "rows": rows,
        "summary": summary(rows, LOSS_TOLERANCE),
        "reading": reading(rows),
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=str) + "\n")
