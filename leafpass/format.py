"""``format_graph``: a canonical text of a leafpass graph, made for snapshot tests.

It is the contract with users' ``assertExpectedInline`` tests, so it changes rarely
and on purpose. What it shows and how::

    inputs: x                                   graph inputs that are not parameters
    t0 = torch._C._nn.linear(x, l1.weight, l1.bias)
    prefetch_all moe1 (10 params)               one line per prefetch, leaf and count
    t1 = moe1(t0)                               a leaf call_module, by qualified name
    return t1

In-graph gathers (``gather="module"``) show what they gather, not their bucket ids
(which differ between runs)::

    t2 = gather_start [l2.weight, l2.bias] (272 elements)
    t3 = gather_wait t2
    t4 = getitem(t3, 0)
    prefetch_start moe2                         a leaf's gather issued early

A leaf called with a Python object (a ``DynamicCache``, a dataclass; see
``leaf_arguments``) gets the copy it updates built before its call and the copy's tensors
read after it, each node named by the object's class::

    t1 = build_DynamicCache()
    prefetch_all leaf (2 params)
    t2 = leaf(t0, extra=t1)
    t3 = read_DynamicCache(t1)

Ops from a ``torch.utils.checkpoint`` region around a leaf (see
``passes.inline_checkpoint``) end in ``# checkpoint N``, regions numbered in graph
order: backward recomputes the marked ops, and runs the marked leaf (its
``prefetch_all`` included) again::

    t1 = torch.nn.functional.layer_norm(t0, ...)  # checkpoint 0
    prefetch_all block.moe (17 params)  # checkpoint 0
    t2 = block.moe(t1)  # checkpoint 0

Values are numbered ``t0, t1, ...`` in graph order, parameters and buffers are named
by their qualified names, functions by their qualified Python names, so the text has
no file paths, no addresses and nothing that differs between two identical compiles.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx

from .graph_nodes import GATHER_META, checkpoint_region_of, is_prefetch_node, is_prefetch_start_node
from .leaf_arguments import BuildArgument, ReadObjectStates
from .leaf_call import leaf_call_of, plain_source, qualname_from_source

__all__ = ["format_graph"]


def _source(node: torch.fx.Node) -> str | None:
    source = node.meta.get("leafpass_source")
    return plain_source(source) if source is not None else None


def _is_param_placeholder(node: torch.fx.Node) -> bool:
    source = _source(node) or ""
    return "._parameters[" in source or "._buffers[" in source


def _placeholder_name(node: torch.fx.Node) -> str:
    source = _source(node)
    if source is None:
        return node.name
    if _is_param_placeholder(node):
        return qualname_from_source(source)
    # an input: L['x'] -> x, L['args'][0] -> args[0], L['kwargs']['mask'] -> kwargs['mask']
    return re.sub(r"^[LG]\['([^']*)'\]", r"\1", source)


def _target_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    if isinstance(target, (BuildArgument, ReadObjectStates)):  # leafpass's own: named by what they build
        return target.__name__
    try:
        return torch.fx.node._get_qualified_name(target)
    except Exception:
        return getattr(target, "__name__", type(target).__name__)


def format_graph(gm: torch.fx.GraphModule) -> str:
    """A stable text of ``gm`` (a graph from ``record_graphs``) for snapshot tests."""
    names: dict[torch.fx.Node, str] = {}
    lines: list[str] = []
    inputs: list[str] = []
    counter = 0

    def fmt(arg) -> str:
        if isinstance(arg, torch.fx.Node):
            return names.get(arg, arg.name)
        if isinstance(arg, (list, tuple)):
            inner = ", ".join(fmt(a) for a in arg)
            return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
        if isinstance(arg, dict):
            return "{" + ", ".join(f"{k!r}: {fmt(v)}" for k, v in arg.items()) + "}"
        if isinstance(arg, torch.dtype):
            return str(arg)
        if isinstance(arg, float):
            return repr(arg)
        return repr(arg)

    def call_args(args, kwargs) -> str:
        parts = [fmt(a) for a in args] + [f"{k}={fmt(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)

    regions: dict[int, int] = {}

    def checkpoint_mark(node: torch.fx.Node) -> str:
        graph_id = _checkpoint_graph_id(node)
        if graph_id is None:
            return ""
        return f"  # checkpoint {regions.setdefault(graph_id, len(regions))}"

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = _placeholder_name(node)
            if not _is_param_placeholder(node) and node.users:
                inputs.append(names[node])
            continue
        if node.op == "get_attr":
            names[node] = node.target
            continue
        if node.op == "output":
            lines.append(f"return {fmt(node.args[0])}")
            continue
        if is_prefetch_node(node):
            params, leaf = node.args[0], node.args[1]
            lines.append(f"prefetch_all {leaf} ({len(params)} params){checkpoint_mark(node.next)}")
            continue
        if is_prefetch_start_node(node):
            lines.append(f"prefetch_start {node.args[0]}")
            continue
        name = f"t{counter}"
        counter += 1
        names[node] = name
        if node.op == "call_module":
            marker = "" if leaf_call_of(node) is not None else "  # not a leaf"
            lines.append(f"{name} = {node.target}({call_args(node.args, node.kwargs)}){marker}{checkpoint_mark(node)}")
        elif node.op == "call_method":
            self_arg, *rest = node.args
            lines.append(f"{name} = {fmt(self_arg)}.{node.target}({call_args(rest, node.kwargs)}){checkpoint_mark(node)}")
        elif node.target == torch.ops.leafpass.gather_start.default:
            info = node.meta.get(GATHER_META)
            size = f" ({info.numel} elements)" if info is not None else ""
            lines.append(f"{name} = gather_start {fmt(node.args[0])}{size}")
        elif node.target == torch.ops.leafpass.gather_wait.default:
            lines.append(f"{name} = gather_wait {fmt(node.args[0])}")
        else:
            lines.append(f"{name} = {_target_name(node.target)}({call_args(node.args, node.kwargs)}){checkpoint_mark(node)}")
    header = f"inputs: {', '.join(inputs)}" if inputs else "inputs: (none)"
    return "\n".join([header, *lines]) + "\n"


def _checkpoint_graph_id(node: torch.fx.Node) -> int | None:
    """The checkpoint region ``inline_checkpoint`` took ``node`` out of, if any."""
    region = checkpoint_region_of(node)
    return None if region is None else region.graph_id
