"""Inline activation-checkpoint regions that hold a leaf, keeping what to recompute.

Dynamo records ``torch.utils.checkpoint.checkpoint(fn, ...)`` (reentrant or not, and
transformers' ``gradient_checkpointing_enable``) as one
``torch.ops.higher_order.tag_activation_checkpoint`` node whose first argument is a
body graph. A leaf called inside ``fn`` is an ``invoke_leaf_function`` node *in that
body*, where the later passes and the lowering cannot reach it (aot_autograd would
run the body through checkpoint's caching dispatch mode, which has no rule for it).

For every such node whose body (or a body nested in it) calls a leafpass leaf, the
body is copied into the outer graph in its place::

    before                                          after
    ------                                          -----
    h = linear(x, inp.w, inp.b)                     h = linear(x, inp.w, inp.b)
    ckpt = tag_activation_checkpoint(               n = layer_norm(h, ...)         # recompute, region 7
        wrap_body_0, h, norm.w, ..., lin.b)         invoke = invoke_leaf_function(  # checkpointed leaf, region 7
    h1 = ckpt[0]                                        real_fn, ..., n)
                                                    g = invoke[0]
      wrap_body_0:                                  y = linear(g, lin.w, lin.b)    # recompute, region 7
        n = layer_norm(h, ...)                      h1 = add(h, y)                 # recompute, region 7
        invoke = invoke_leaf_function(..., n)
        g = invoke[0]
        y = linear(g, lin.w, lin.b)
        return (add(h, y),)

Every copied node that is not the leaf call gets the tags the checkpoint op itself
would have given it while aot_autograd traced it (``meta["recompute"] =
CheckpointPolicy.PREFER_RECOMPUTE`` and the region's ``meta["ac_graph_id"]``), so the
partitioner of the inner compiler (inductor, aot_eager) recomputes those ops in
backward instead of saving their outputs. Every copied node carries the region's
:class:`CheckpointRegion` in ``meta["leafpass_checkpoint"]`` (``format_graph`` marks
them); ``leaf_call_module`` carries it to the leaf's
``call_module`` and ``lower`` runs that leaf piece (``prefetch_all`` + the leaf) under
non-reentrant ``torch.utils.checkpoint``, so backward runs the leaf's forward again,
hooks included, as eager checkpointing does.

Regions without a leaf are left as they are. A region given a selective-checkpointing
policy (``context_fn``) around a leaf is refused: the policy chooses per ATen op, and
a leaf is not traced into ATen ops.

Provides: ``checkpoint_regions_inlined`` (no leafpass leaf sits inside a
``tag_activation_checkpoint`` body).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

from ..dynamo_internals import next_checkpoint_graph_id
from ..graph_nodes import CHECKPOINT_META, CheckpointRegion, checkpoint_region_of
from .leaf_call_module import is_leafpass_leaf_node, leaf_module_of

__all__ = [
    "CHECKPOINT_META",
    "CheckpointPolicyError",
    "CheckpointRegion",
    "checkpoint_region_of",
    "inline_checkpoint_pass",
]

class CheckpointPolicyError(RuntimeError):
    """A checkpoint region around a leaf asks for something leafpass cannot honour."""


def _is_checkpoint_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.higher_order.tag_activation_checkpoint


def _body(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.GraphModule:
    return getattr(gm, node.args[0].target)


def _holds_leaf(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if is_leafpass_leaf_node(gm, node):
            return True
        if _is_checkpoint_node(node) and _holds_leaf(_body(gm, node)):
            return True
    return False


def _leaf_names(gm: torch.fx.GraphModule) -> list[str]:
    """Class names of the leaves called in ``gm`` and the regions nested in it."""
    names = []
    for node in gm.graph.nodes:
        if is_leafpass_leaf_node(gm, node):
            names.append(type(leaf_module_of(gm, node)).__name__)
        elif _is_checkpoint_node(node):
            names += _leaf_names(_body(gm, node))
    return names


def _fresh_attr(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    body = _body(gm, node)
    if "_checkpoint_context_fn" in body.meta:
        raise CheckpointPolicyError(
            f"leafpass: torch.utils.checkpoint with a selective-checkpointing context_fn around "
            f"leaf {', '.join(_leaf_names(body))} is not supported: the policy picks per ATen op, "
            f"and a leaf stays one opaque call. Drop context_fn (plain checkpointing recomputes "
            f"the whole region, the leaf included), or checkpoint a region without a leaf."
        )
    region = CheckpointRegion(
        graph_id=next_checkpoint_graph_id(),
        preserve_rng_state=bool(node.kwargs.get("preserve_rng_state", True)),
    )
    graph = gm.graph
    inputs = list(node.args[1:])
    env: dict[torch.fx.Node, object] = {}
    outputs = None
    leaf_values: set[torch.fx.Node] = set()
    with graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = inputs.pop(0)
                continue
            if inner.op == "output":
                outputs = torch.fx.map_arg(inner.args[0], lambda n: env[n])
                continue
            if inner.op == "get_attr":
                name = _fresh_attr(gm, inner.target)
                setattr(gm, name, getattr(body, inner.target))
                # create_node: get_attr() warns for attributes that are not modules,
                # parameters or buffers (the leaf's callables and input spec)
                env[inner] = graph.create_node("get_attr", name)
                env[inner].meta = dict(inner.meta)
                continue
            copied = graph.node_copy(inner, lambda n: env[n])
            env[inner] = copied
            copied.meta[CHECKPOINT_META] = region
            if is_leafpass_leaf_node(body, inner):
                leaf_values.add(copied)
            elif inner.target is operator.getitem and env[inner.args[0]] in leaf_values:
                leaf_values.add(copied)  # unpacks the leaf's output: part of the leaf piece
            else:
                copied.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                copied.meta["ac_graph_id"] = region.graph_id
    if inputs:
        raise AssertionError(f"leafpass: checkpoint body {node.args[0].target} got {len(inputs)} extra inputs")
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(outputs, (tuple, list)):
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        else:
            raise AssertionError(f"leafpass: unexpected use {user.format_node()} of a checkpoint region")
    body_attr = node.args[0]
    graph.erase_node(node)
    if not body_attr.users:
        graph.erase_node(body_attr)
        delattr(gm, body_attr.target)


def inline_checkpoint_pass(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Inline every checkpoint region that holds a leaf (nested regions too), outermost first."""
    changed = True
    while changed:  # a region inlined may bring nested regions into the outer graph
        changed = False
        for node in list(gm.graph.nodes):
            if _is_checkpoint_node(node) and _holds_leaf(_body(gm, node)):
                _inline(gm, node)
                changed = True
    gm.graph.lint()
    gm.recompile()
    return gm
