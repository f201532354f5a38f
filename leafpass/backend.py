"""The ``z3leaf`` backend: wires capture, passes, recording and lowering together.

``torch.compile(model, backend="z3leaf")`` finds it through the entry point group
``torch_dynamo_backends``; ``leafpass.make_backend(**options)`` builds the same backend
with options bound. This module validates options and holds no logic of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.fx

from .capture import annotate_input_sources
from .gather import GATHER_POLICIES, check_gather
from .leaf_compile import LEAF_COMPILE_MODES, LeafCompiler, check_leaf_compile
from .lower import lower
from .passes import MODULE_GATHER_PIPELINE, run_passes
from .passes.check_stand_ins import check_stand_ins
from .passes.insert_gathers import GATHER_META
from .record import notify_graph

__all__ = ["OPTIONS", "INNER_COMPILERS", "make_backend", "z3leaf_backend", "resolve_inner"]

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
OPTIONS: Mapping[str, str] = {
    "inner": f"compiler for the non-leaf pieces: one of {INNER_COMPILERS} or a backend callable",
    "gather": f"who gathers non-leaf parameters of a partitioned model: one of {list(GATHER_POLICIES)}",
    "bucket_elements": "gather='module': merge adjacent gathers up to this many elements "
                       "(default: the engine's prefetch bucket, DeepSpeed stage3_prefetch_bucket_size)",
    "prefetch_distance": "gather='module': start each gather this many buckets early "
                         "(default: 1, or 0 when the engine's prefetch bucket is 0)",
    "leaf_compile": f"how each leaf's own forward runs: one of {list(LEAF_COMPILE_MODES)} (default 'off')",
}


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise TypeError(
            f"z3leaf options must be a dict such as {{'inner': 'inductor'}}, got {type(options).__name__}"
        )
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        valid = ", ".join(f"{k!r} ({v})" for k, v in OPTIONS.items())
        raise ValueError(f"unknown z3leaf option(s) {unknown}; valid options: {valid}")
    checked = {"inner": "inductor", "gather": "auto", "bucket_elements": None, "prefetch_distance": None,
               "leaf_compile": "off", **options}
    check_gather(checked["gather"])
    check_leaf_compile(checked["leaf_compile"])
    for key in ("bucket_elements", "prefetch_distance"):
        value = checked[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"z3leaf option {key!r} must be an int >= 0 (or None for the engine's default); "
                             f"got {value!r}")
    inner = checked["inner"]
    if not callable(inner) and inner not in INNER_COMPILERS:
        raise ValueError(
            f"z3leaf option 'inner' must be one of {list(INNER_COMPILERS)} or a backend callable "
            f"(gm, example_inputs) -> callable; got {inner!r}"
        )
    return checked


def resolve_inner(inner: Any, mode: str | None = None) -> Callable:
    """The compiler that compiles non-leaf pieces, from the ``inner`` option."""
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        if mode and mode != "default":
            patches = torch._inductor.list_mode_options(mode)
            return lambda gm, ex: compile_fx(gm, ex, config_patches=patches)
        return compile_fx
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(inner)


def _compile(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any], mode: str | None):
    checked = _check_options(options)
    annotate_input_sources(gm)
    plan = current_gather_plan()
    if plan is None:
        gm = run_passes(gm)
        inner = resolve_inner(checked["inner"], mode)
    else:
        gm = run_passes(gm, MODULE_GATHER_PIPELINE, example_inputs=list(example_inputs), plan=plan)
        check_stand_ins(gm, list(example_inputs), plan.is_stand_in, plan.param_names)
        inner = _recomputing(checked["inner"], mode)
    notify_graph(gm)
    leaf_compiler = None
    if checked["leaf_compile"] == "inner":
        leaf_compiler = LeafCompiler(resolve_inner(checked["inner"], mode), (checked["inner"], mode))
    program = lower(gm, list(example_inputs), inner, leaf_compiler)
    if plan is not None:  # the gather ops find their buckets while the program holds them
        program.gather_buckets = [info.bucket for node in gm.graph.nodes if (info := node.meta.get(GATHER_META))]
    return program


def current_gather_plan():
    """The ``gather="module"`` plan of the call being compiled, if any."""
    from .runtime.deepspeed_module import current_plan

    return current_plan()


def _recomputing(inner: Any, mode: str | None) -> Callable:
    """The inner compiler for a graph with in-graph gathers: one whose partitioner honours
    their "must recompute" marks, so gathered weights are not saved for backward.
    inductor does; ``aot_eager``'s default partitioner saves every value backward uses, so
    it is swapped for the same compiler with the min-cut partitioner."""
    if inner == "aot_eager":
        from functorch.compile import min_cut_rematerialization_partition
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop

        return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop,
                            partition_fn=min_cut_rematerialization_partition)
    if inner == "eager":
        import warnings

        warnings.warn(
            "leafpass: gather='module' with inner='eager' keeps every gathered weight alive until "
            "backward (eager autograd saves what backward needs); use inner='aot_eager' or "
            "'inductor' to gather them again for backward instead.",
            stacklevel=2,
        )
    return resolve_inner(inner, mode)


def make_backend(**options: Any) -> Callable:
    """A z3leaf backend with ``options`` bound: ``torch.compile(m, backend=make_backend(inner="aot_eager"))``."""
    _check_options(options)

    def backend(gm, example_inputs, **kwargs):
        extra = kwargs.pop("options", None) or {}
        mode = kwargs.pop("mode", None)
        if kwargs:
            raise TypeError(f"z3leaf backend got unexpected arguments {sorted(kwargs)}")
        return _compile(gm, example_inputs, {**options, **extra}, mode)

    backend._leafpass_backend = True
    backend._leafpass_options = dict(options)
    backend.__name__ = "z3leaf"
    return backend


def z3leaf_backend(gm, example_inputs, options: Mapping[str, Any] | None = None, mode: str | None = None):
    """``torch.compile(model, backend="z3leaf", options={"inner": "inductor"})``."""
    return _compile(gm, example_inputs, options or {}, mode)


z3leaf_backend._leafpass_backend = True
