"""Lowering: split the graph at its leaves, compile the rest, run leaves eagerly.

The graph after the passes alternates stretches of ordinary ops with leaf calls::

    [linear] -> prefetch_all moe1, moe1(...) -> [linear, relu] -> prefetch_all moe2, moe2(...)

``lower`` cuts it with ``torch.fx.passes.split_module`` (as Dynamo's DDPOptimizer
does) into pieces: each stretch of ordinary ops becomes a piece compiled by the
inner compiler (inductor, aot_eager, ...); each leaf becomes a piece run eagerly,
holding its ``prefetch_all``, its ``call_module`` and the ``getitem`` nodes that
unpack its output. A small top-level graph calls the pieces in order; autograd
links them, so the leaf's backward runs eagerly between compiled backward pieces.

A leaf piece whose leaf was called inside ``torch.utils.checkpoint`` (see
``passes.inline_checkpoint``) runs under non-reentrant checkpoint: backward runs
its ``prefetch_all`` and the leaf's forward again before the leaf's backward. The
compiled pieces around it recompute the region's other ops through the inner
compiler's partitioner (the ops carry checkpoint's recompute tags).

With ``options={"leaf_compile": "inner"}`` a leaf piece still runs its
``prefetch_all`` and the leaf's module call eagerly, but the leaf's ``forward``
inside that call runs through ``torch.compile`` (``leafpass.leaf_compile``).

Each compiled piece is compiled with fake inputs taken from the traced graph's
``example_value`` metadata (the leaf's real outputs cannot be faked by running it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.fx
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from .graph_nodes import CheckpointRegion, checkpoint_region_of, is_leaf_call_node, is_prefetch_node, leaf_partitions
from .runtime import in_leaf_environment, leaf_environments_active
from .leaf_compile import LeafCompiler
from .runtime.leaf_inputs import leaf_input_for_deepspeed_backward_hook
from .shape_inference import LeafShapeError
from .dynamo_internals import compiling_frame, is_first_compile_of_frame
from .schedule_check import check_same_schedule, leaf_schedule

__all__ = ["checkpoint_holding_parameters", "lower"]


def _example(node: torch.fx.Node):
    meta = node.meta
    return meta.get("example_value", meta.get("val"))


class _CompiledPiece(torch.nn.Module):
    """Calls a compiled piece; pieces are compiled with tuple outputs and unwrapped here."""

    def __init__(self, fn: Callable, single: bool) -> None:
        super().__init__()
        self.fn = fn
        self.single = single

    def forward(self, *args):
        out = self.fn(*args)
        return out[0] if self.single else tuple(out)


def _as_tuple_output(piece: torch.fx.GraphModule) -> bool:
    """Make ``piece`` return a tuple (aot_autograd wants one); True if it returned one value."""
    out = next(n for n in reversed(piece.graph.nodes) if n.op == "output")
    value = out.args[0]
    if isinstance(value, (tuple, list)):
        out.args = (tuple(value),)
        piece.recompile()
        return False
    out.args = ((value,),)
    piece.recompile()
    return True


def lower(
    gm: torch.fx.GraphModule,
    example_inputs: list,
    inner: Callable[[torch.fx.GraphModule, list], Callable],
    leaf_compiler: LeafCompiler | None = None,
) -> Callable:
    """Split ``gm`` at its leaves and compile the non-leaf pieces with ``inner``.

    With ``leaf_compiler`` (option ``leaf_compile="inner"``), each leaf's ``forward``
    runs compiled inside its eager module call (see ``leaf_compile``)."""
    schedule = leaf_schedule(gm)
    if not any(is_leaf_call_node(n) for n in gm.graph.nodes):
        return _CheckedProgram(inner(gm, example_inputs), schedule)
    part = leaf_partitions(gm)

    by_name = {n.name: n for n in gm.graph.nodes}

    split = split_module(gm, None, lambda n: part[n], keep_original_order=True, keep_original_node_name=True)
    leaf_pids = {pid for n, pid in part.items() if is_leaf_call_node(n) or is_prefetch_node(n)}

    for node in split.graph.nodes:
        if node.op != "call_module" or not node.target.startswith("submod_"):
            continue
        pid = int(node.target.split("_")[-1])
        piece = getattr(split, node.target)
        if pid in leaf_pids:  # run eagerly: prefetch_all, the leaf, its unpacking
            region = _checkpoint_region(piece, by_name)
            setattr(split, node.target, _LeafPiece(piece, _expected_outputs(piece, by_name), region, leaf_compiler))
            continue
        inputs = []
        for ph in (n for n in piece.graph.nodes if n.op == "placeholder"):
            src = by_name.get(ph.name)
            ex = _example(src) if src is not None else None
            if ex is None:
                raise AssertionError(f"leafpass: no example value for input {ph.name!r} of {node.target}")
            inputs.append(ex)
        single = _as_tuple_output(piece)
        compiled = inner(piece, inputs)
        setattr(split, node.target, _CompiledPiece(compiled, single))
    split.recompile()
    return _CheckedProgram(split, schedule)


def _checkpoint_region(piece: torch.fx.GraphModule, by_name) -> CheckpointRegion | None:
    """The checkpoint region the leaf of ``piece`` was called in, if any."""
    for n in piece.graph.nodes:
        if n.op == "call_module" and n.name in by_name:
            region = checkpoint_region_of(by_name[n.name])
            if region is not None:
                return region
    return None


def _expected_outputs(piece: torch.fx.GraphModule, by_name) -> list:
    out = next(n for n in reversed(piece.graph.nodes) if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return [_example(by_name[v.name]) if isinstance(v, torch.fx.Node) and v.name in by_name else None for v in values]


def checkpoint_holding_parameters(run: Callable, args: tuple, preserve_rng_state: bool = True):
    """``run(*args)`` under non-reentrant ``torch.utils.checkpoint``, with the parameters
    among ``args`` held by the call instead of handed to checkpoint as its inputs.

    A leaf piece's inputs include the leaf's parameters (for its ``prefetch_all``), which under
    ZeRO-3 are partitioned (shape ``[0]``) when the piece starts and gathered inside it. torch
    2.11's checkpoint saves its inputs through an autograd function (``_NoopSaveInputs``),
    which makes each parameter's gradient accumulator right then, recording the shape ``[0]``;
    the leaf's backward later hands that accumulator a whole gradient and autograd refuses it
    (``LinearFunctionForZeroStage3Backward returned an invalid gradient ... expected shape
    compatible with [0]``). torch 2.12+ saves inputs without an autograd node. A parameter is
    the module's own tensor (checkpoint has nothing to save or restore for it), so it never
    goes through checkpoint here, on any torch::

        checkpoint(run, x, w)                        # torch 2.11: AccumulateGrad(w) made at [0]
        checkpoint(lambda x: run(x, w), x)           # what this does: w is not an input
    """
    at = [i for i, a in enumerate(args) if isinstance(a, torch.nn.Parameter)]
    if not at:
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)
    held = {i: args[i] for i in at}
    passed = [a for i, a in enumerate(args) if i not in held]

    def run_with_parameters(*values):
        it = iter(values)
        return run(*[held[i] if i in held else next(it) for i in range(len(args))])

    return checkpoint(run_with_parameters, *passed, use_reentrant=False, preserve_rng_state=preserve_rng_state)


class _LeafPiece(torch.nn.Module):
    """Runs a leaf piece eagerly and checks its outputs against what was compiled for.

    The pieces after a leaf were compiled for the output sizes inferred at compile time.
    A leaf whose output *sizes* depend on its input *values* breaks that contract; it is
    caught here, with the leaf named, instead of feeding a compiled piece wrong sizes.
    """

    def __init__(self, piece: torch.fx.GraphModule, expected: list, region: CheckpointRegion | None = None,
                 leaf_compiler: LeafCompiler | None = None) -> None:
        super().__init__()
        self.piece = piece
        self.leaf_compiler = leaf_compiler
        self.expected = expected
        self.region = region
        self.leaves = [n.target for n in piece.graph.nodes if n.op == "call_module"]
        self.leaf_modules = [piece.get_submodule(name) for name in self.leaves]

    def forward(self, *args):
        # everything before the leaf frozen: see runtime.leaf_inputs
        args = leaf_input_for_deepspeed_backward_hook(self.leaf_modules, args)
        if self.region is not None and torch.is_grad_enabled():
            # from a checkpoint region: keep nothing for backward but the inputs, and run
            # prefetch_all + the leaf again there (non-reentrant, as Dynamo traces every
            # checkpoint), so the engine gathers the leaf again as in eager checkpointing
            return checkpoint_holding_parameters(self._run, args, self.region.preserve_rng_state)
        return self._run(*args)

    def _run(self, *args):
        with contextlib.ExitStack() as stack:
            if leaf_environments_active():
                stack.enter_context(in_leaf_environment())
            if self.leaf_compiler is not None:
                stack.enter_context(self.leaf_compiler.swapped(self.leaf_modules))
            out = self.piece(*args)
        values = out if isinstance(out, tuple) else (out,)
        for got, want in zip(values, self.expected):
            if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor):
                if got.dim() != want.dim() or got.dtype != want.dtype or any(
                    isinstance(w, int) and g != w for g, w in zip(got.shape, want.shape)
                ):
                    raise LeafShapeError(
                        f"leafpass: leaf {', '.join(self.leaves)!s} returned a {got.dtype} tensor of shape "
                        f"{tuple(got.shape)} where {want.dtype} of shape {tuple(want.shape)} was inferred at "
                        f"compile time. A leaf's output shapes must follow from its input shapes, not "
                        f"its input values; unflag it (module._z3_leaf = False) or pad its output."
                    )
        return out


class _CheckedProgram:
    """The lowered program. If it was compiled for its frame's first compile, its first
    call checks that all ranks compiled the same leaf schedule (see ``schedule_check``)."""

    def __init__(self, fn: Callable, schedule: list[tuple[str, int]]) -> None:
        self.fn = fn
        self.schedule = schedule
        self.checked = not is_first_compile_of_frame()
        self.frame = compiling_frame()  # named in a mismatch

    def __call__(self, *args):
        if not self.checked:
            self.checked = True
            check_same_schedule(self.schedule, self.frame)
        return self.fn(*args)
