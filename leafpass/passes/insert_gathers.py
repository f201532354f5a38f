"""Gather each module's partitioned parameters inside the graph (``gather="module"``).

Requires: ``prefetch_at_leaf_entry``. Runs only when the compile was triggered by a call
under ``gather="module"`` (the gatherer's plan names the parameters to gather). A
partitioned parameter outside the leaves reaches the graph as an input that holds a
stand-in (full shape, no data). For every compiled stretch of the graph (the ops between
two leaf calls, which ``lower`` compiles as one piece) and every module whose parameters
that stretch uses, the pass inserts one gather right before the first use and points
every use in the stretch at the gathered value::

    before                                        after
    ------                                        -----
                                                  s0 = gather_start([mlp.up.w, mlp.up.b], 1)
                                                  g0 = gather_wait(s0, [mlp.up.w, mlp.up.b], 1)
    up = linear(x, mlp.up.w, mlp.up.b)            up = linear(x, g0[0], g0[1])
    act = gelu(up)                                act = gelu(up)
                                                  s1 = gather_start([mlp.down.w, mlp.down.b], 2)
                                                  g1 = gather_wait(s1, [mlp.down.w, mlp.down.b], 2)
    y = linear(act, mlp.down.w, mlp.down.b)       y = linear(act, g1[0], g1[1])

A parameter used in several stretches is gathered in each: a gathered value never crosses
a leaf, so each compiled piece frees what it gathered. The gather nodes are marked
"must recompute": the partitioner does not save gathered weights for backward but runs
the gather again right before backward uses them (see ``leafpass.gather_ops``).

A parameter used both inside a leaf and outside it (tied weights) is refused with an
error naming it: the leaf's engine gathers it in place while the ops hand its gradient
over as a stand-in, and the two cannot share one parameter.

Provides: ``gathers_at_first_use``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

from ..gather_ops import register_bucket
from ..graph_nodes import GATHER_META, GatherInfo, gather_pairs, is_leaf_call_node, is_prefetch_node, leaf_partitions
from ..leaf_call import qualname_from_source

__all__ = ["GATHER_META", "GatherInfo", "gather_pairs", "insert_gathers_pass", "mark_gather_node"]

def mark_gather_node(node: torch.fx.Node) -> None:
    # the partitioner regathers instead of saving (torch.utils.checkpoint's policy tags)
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    node.meta["ac_graph_id"] = 0


def _is_leaf_use(node: torch.fx.Node) -> bool:
    return is_prefetch_node(node) or is_leaf_call_node(node)


def _param_name(node: torch.fx.Node) -> str:
    source = node.meta.get("leafpass_source")
    return qualname_from_source(source) if source else node.name


def emit_gather(graph: torch.fx.Graph, before: torch.fx.Node, param_nodes: list, bucket, modules: list[str]):
    """Insert a gather pair for ``param_nodes`` before ``before``; returns (start, [gathered])."""
    bucket_id = register_bucket(bucket)
    with graph.inserting_before(before):
        start = graph.call_function(torch.ops.leafpass.gather_start.default, (list(param_nodes), bucket_id))
        wait = graph.call_function(torch.ops.leafpass.gather_wait.default, (start, list(param_nodes), bucket_id))
        gathered = [graph.call_function(operator.getitem, (wait, i)) for i in range(len(param_nodes))]
    for node in (start, wait, *gathered):
        mark_gather_node(node)
    start.meta[GATHER_META] = GatherInfo(bucket, modules)
    return start, gathered


def insert_gathers_pass(gm: torch.fx.GraphModule, example_inputs: list, plan) -> torch.fx.GraphModule:
    """Gather, per compiled stretch and module, the parameters ``plan`` names, at first use."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    params = {
        node: ex for node, ex in zip(placeholders, example_inputs)
        if isinstance(ex, torch.Tensor) and id(ex) in plan.gather_ids
    }
    if not params:
        return gm
    piece = leaf_partitions(gm)
    order = {n: i for i, n in enumerate(graph.nodes)}
    # (piece, module, dtype) -> {param node: [uses]}
    groups: dict[tuple, dict[torch.fx.Node, list[torch.fx.Node]]] = {}
    for node, p in params.items():
        name = _param_name(node)
        module = name.rsplit(".", 1)[0] if "." in name else "<root>"
        for user in node.users:
            if user.op == "output":  # the parameter itself is returned: it stays the parameter
                continue
            if _is_leaf_use(user):
                raise NotImplementedError(
                    f"leafpass: gather='module' cannot gather parameter {name!r}: it is used both by "
                    f"a leaf and by ordinary ops of the compiled forward. Use options={{'gather': 'step'}} "
                    f"for this model, or do not share the parameter across a leaf's boundary."
                )
            groups.setdefault((piece[user], module, p.dtype), {}).setdefault(node, []).append(user)
    for (_, module, _), uses in sorted(groups.items(), key=lambda kv: min(order[u] for us in kv[1].values() for u in us)):
        first = min((u for us in uses.values() for u in us), key=order.__getitem__)
        nodes = sorted(uses, key=order.__getitem__)
        bucket = plan.make_bucket([params[n] for n in nodes], [_param_name(n) for n in nodes])
        _, gathered = emit_gather(graph, first, nodes, bucket, [module])
        for node, value in zip(nodes, gathered):
            for user in uses[node]:
                user.replace_input_with(node, value)
    graph.lint()
    gm.recompile()
    return gm
