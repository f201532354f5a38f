"""Where a training step's time goes: exclusive time buckets over a few profiled steps.

``hf_moe.py`` runs a few extra steps of a way with :class:`StepBreakdown` installed and
reports, per step, how the wall time of forward, backward and optimizer step splits into:

=========================  ===================================================================
bucket                     what is timed (the innermost active bucket gets the time)
=========================  ===================================================================
gather                     DeepSpeed ZeRO-3's per-module fetch / release
                           (``PartitionedParameterCoordinator.fetch_sub_module``,
                           ``release_sub_module``, ``release_and_reset_all``), waits on its
                           all-gather handles, leafpass's ``prefetch_all`` and its
                           ``gather="step"`` gather and release
all-gather                 launching the all-gather collectives (``deepspeed.comm.allgather_fn``
                           and ``all_gather_into_tensor``), inside the above; DeepSpeed issues
                           them asynchronously, so waiting for them is in ``gather``
leaf forward               a leaf's forward, between the engine's hooks (a forward pre-hook
                           registered last, a forward hook registered first)
non-leaf forward           z3leaf's compiled pieces (``lower._CompiledPiece``), forward only
grad path                  DeepSpeed ZeRO-3's gradient path outside the bucket's reduction:
                           ``reduce_ready_partitions_and_remove_grads`` (copy into the bucket,
                           partition) and ``independent_gradient_partition_epilogue``
grad reduce                the reduction of a gradient bucket inside the gradient path:
                           DeepSpeed's ``reduce_scatter_coalesced`` (pad, interleave with
                           ``torch.cat``, divide, reduce-scatter) or, under
                           ``grad_path="leafpass"``, its bucket all-reduce or interleaved
                           reduce-scatter
leafpass                   leafpass's own Python: ``DeepSpeedGatherer.call`` and
                           ``lower._LeafPiece.forward`` minus every bucket inside them
rest                       whatever no bucket covers: in forward, eager non-leaf modules (eager
                           ways) and module-call overhead; in backward, autograd (compiled
                           and leaf backward); in the optimizer step, all of it
=========================  ===================================================================

Exclusive: a bucket entered inside another pauses it, so the buckets and ``rest`` add up to
the step. Each bucket gets wall time and process CPU time (``time.process_time``: this
rank's threads, gloo's included): on a shared machine a collective's wall time is mostly
waiting for the other rank, its CPU time is its own work. The timers cost a few microseconds per call, so profiled steps are a little slower
than the timed ones; read shares, not absolute figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

BUCKETS = ("gather", "all-gather", "leaf forward", "non-leaf forward", "grad path", "grad reduce", "leafpass",
           "rest")
PHASES = ("forward", "backward", "optimizer")


class StepBreakdown:
    """Patch the functions named in the module docstring with exclusive timers; ``remove()`` undoes it."""

    def __init__(self, engine, leaf_classes: tuple[type, ...]) -> None:
        self.seconds: dict[tuple[str, str], float] = {}
        self.cpu_seconds: dict[tuple[str, str], float] = {}
        self.phase = "forward"
        self._stack: list[list] = []  # [bucket, wall start, cpu start]
        self._undo: list[Callable[[], None]] = []
        self._install(engine, leaf_classes)

    # ------------------------------------------------------------------ timing

    def _charge(self, bucket: str, seconds: float, cpu: float) -> None:
        key = (self.phase, bucket)
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.cpu_seconds[key] = self.cpu_seconds.get(key, 0.0) + cpu

    def enter(self, bucket: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self._stack:
            top = self._stack[-1]
            self._charge(top[0], now - top[1], cpu - top[2])
        self._stack.append([bucket, now, cpu])

    def exit(self) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if not self._stack:  # a leaf's post-hook whose pre-hook ran before install
            return
        bucket, start, cpu_start = self._stack.pop()
        self._charge(bucket, now - start, cpu - cpu_start)
        if self._stack:
            self._stack[-1][1] = now
            self._stack[-1][2] = cpu

    def per_step(self, steps: int, phase_totals: dict[str, float], cpu: bool = False) -> dict[str, dict[str, float]]:
        """ms per step: ``{phase: {bucket: ms}}``; ``rest`` = the phase's time minus its buckets.
        ``cpu``: CPU time (``phase_totals`` must then be the phases' CPU seconds)."""
        seconds = self.cpu_seconds if cpu else self.seconds
        out: dict[str, dict[str, float]] = {}
        for phase in PHASES:
            row = {b: 1e3 * seconds.get((phase, b), 0.0) / steps for b in BUCKETS if b != "rest"}
            row["rest"] = 1e3 * phase_totals.get(phase, 0.0) / steps - sum(row.values())
            out[phase] = row
        return out

    # ------------------------------------------------------------------ patching

    def _wrap(self, owner: Any, name: str, bucket: str) -> None:
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if original is None:
            return
        timer = self

        def timed(*args, **kwargs):
            timer.enter(bucket)
            try:
                return original(*args, **kwargs)
            finally:
                timer.exit()

        timed = torch.compiler.disable(timed)
        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def _install(self, engine, leaf_classes: tuple[type, ...]) -> None:
        import deepspeed.comm
        from deepspeed.runtime.zero import partition_parameters as pp
        from deepspeed.runtime.zero import stage3
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        from leafpass import lower
        from leafpass.runtime.deepspeed_runtime import DeepSpeedRuntime
        from leafpass.runtime.deepspeed_gatherer import DeepSpeedGatherer

        for name in ("fetch_sub_module", "release_sub_module", "release_and_reset_all"):
            self._wrap(PartitionedParameterCoordinator, name, "gather")
        for cls in (pp.AllGatherHandle, pp.AllGatherCoalescedHandle):
            self._wrap(cls, "wait", "gather")
        self._wrap(DeepSpeedRuntime, "prefetch_all", "gather")
        self._wrap(DeepSpeedGatherer, "_gather_step", "gather")
        self._wrap(DeepSpeedGatherer, "_release", "gather")
        for name in ("allgather_fn", "all_gather_into_tensor"):
            self._wrap(deepspeed.comm, name, "all-gather")
        self._wrap(stage3.DeepSpeedZeroOptimizer_Stage3, "reduce_ready_partitions_and_remove_grads", "grad path")
        self._wrap(stage3.DeepSpeedZeroOptimizer_Stage3, "independent_gradient_partition_epilogue", "grad path")
        self._wrap(stage3, "reduce_scatter_coalesced", "grad reduce")
        from leafpass.runtime import deepspeed_grad_path

        for name in ("_all_reduce_in_bucket", "_reduce_scatter_interleaved"):
            self._wrap(deepspeed_grad_path, name, "grad reduce")
        self._wrap(lower._CompiledPiece, "forward", "non-leaf forward")
        self._wrap(lower._LeafPiece, "forward", "leafpass")
        self._wrap(DeepSpeedGatherer, "call", "leafpass")
        handles = []
        for module in engine.module.modules():
            if isinstance(module, leaf_classes):
                handles.append(module.register_forward_pre_hook(lambda m, a: self.enter("leaf forward")))
                handles.append(module.register_forward_hook(lambda m, a, o: self.exit(), prepend=True))
        self._undo.extend(h.remove for h in handles)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
