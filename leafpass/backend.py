"""The ``z3leaf`` backend: wires capture, passes, recording and lowering together.

``torch.compile(model, backend="z3leaf")`` finds it through the entry point group
``torch_dynamo_backends``; ``leafpass.make_backend(**options)`` builds the same backend
with options bound. This module validates options and holds no logic of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.fx

from .capture import annotate_input_sources, warn_if_call_replaced
from .dynamo_internals import hold_compiling_flag_until_compile_end
from .graph_nodes import gather_info_of
from .leaf_compile import LeafCompiler
from .lower import lower
from .module_plan import current_plan
from .options import INNER_COMPILERS, OPTIONS, check_options
from .passes import MODULE_GATHER_PIPELINE, run_passes
from .passes.check_stand_ins import check_stand_ins
from .ops import holds_host_state_op
from .record import notify_graph

__all__ = ["OPTIONS", "INNER_COMPILERS", "make_backend", "z3leaf_backend", "resolve_inner"]

def resolve_inner(inner: Any, mode: str | None = None) -> Callable:
    """The compiler that compiles non-leaf pieces, from the ``inner`` option."""
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        if mode and mode != "default":
            patches = torch._inductor.list_mode_options(mode)
            return lambda gm, ex: compile_fx(gm, ex, config_patches=_piece_patches(gm, patches))
        return compile_fx
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(inner)


def _piece_patches(gm: torch.fx.GraphModule, patches: dict[str, Any]) -> dict[str, Any]:
    """Inductor's settings for one compiled piece: CUDA graphs (``mode="reduce-overhead"``)
    off for a piece that calls a leafpass op, whose host-side work a replay would skip."""
    if not patches.get("triton.cudagraphs") or not holds_host_state_op(gm):
        return patches
    if not _warned_cudagraphs:
        import warnings

        _warned_cudagraphs.append(True)
        warnings.warn(
            "leafpass: mode='reduce-overhead' compiles the pieces that gather parameters "
            "(prefetch_start, gather_start/gather_wait) without CUDA graphs: a replay would skip "
            "their host-side work. The other pieces keep CUDA graphs; gather='step' keeps gathers "
            "out of the graph altogether.",
            stacklevel=2,
        )
    return {**patches, "triton.cudagraphs": False}


_warned_cudagraphs: list[bool] = []


def _compile(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any], mode: str | None):
    # the passes, the lowering and Dynamo's guards built after them read the model as a
    # compile does (torch 2.11 does not hold is_compiling() there: see dynamo_internals)
    hold_compiling_flag_until_compile_end()
    return _compile_held(gm, example_inputs, options, mode)


def _compile_held(gm: torch.fx.GraphModule, example_inputs, options: Mapping[str, Any], mode: str | None):
    checked = check_options(options)
    warn_if_call_replaced()
    annotate_input_sources(gm)
    plan = current_plan()  # set by a gatherer under gather="module"
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
        program.gather_buckets = [info.bucket for node in gm.graph.nodes if (info := gather_info_of(node))]
    return program


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
    check_options(options)

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
