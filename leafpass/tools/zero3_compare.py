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

Each piece has its own file: the ways and :class:`CompareSpec` (``zero3_ways``), one
rank's training and figures (``zero3_rank``, measured with ``zero3_probes``), the rows
and the comparison with eager (``zero3_rows``), the table and its reading
(``zero3_table``). This module runs the ways and re-exports what callers use.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

from .zero3_rank import rank_body
from .zero3_rows import DEFINITIONS, ROW_KEYS, attach_comparison, failed_row, loss_diff, row_of
from .zero3_table import TABLE_COLUMNS, WAY_LABELS, gather_cell, markdown_table, module_goal, reading
from .zero3_ways import (
    INNER_CHOICES, LOSS_TOLERANCE, MODULE_GOAL_VS_EAGER_STRICT, WAY_OPTIONS, WAY_SETUPS, WAYS, ZERO_PRESETS,
    CompareSpec, DeepSpeedMissing, check_deepspeed, z3leaf_options,
)

__all__ = [
    "DEFINITIONS",
    "INNER_CHOICES",
    "LOSS_TOLERANCE",
    "MODULE_GOAL_VS_EAGER_STRICT",
    "ROW_KEYS",
    "TABLE_COLUMNS",
    "WAYS",
    "WAY_LABELS",
    "WAY_OPTIONS",
    "WAY_SETUPS",
    "ZERO_PRESETS",
    "CompareSpec",
    "DeepSpeedMissing",
    "attach_comparison",
    "check_deepspeed",
    "compare",
    "failed_row",
    "gather_cell",
    "loss_diff",
    "markdown_table",
    "module_goal",
    "reading",
    "run_way",
    "z3leaf_options",
]


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
                rank_body,
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
            return failed_row(way, spec, exc, time.perf_counter() - start)
    row = row_of(way, spec, ranks, time.perf_counter() - start)
    row["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return row


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
