"""Put exactly one ``prefetch_all`` at each leaf's entry.

Requires: ``leaf_call_modules`` (each leaf call is a ``call_module`` carrying a
:class:`LeafCall`). For every such call with parameters, inserts immediately
before it one ``torch.ops.leafpass.prefetch_all`` whose inputs are every
parameter of the leaf's subtree, each once::

    before                                   after
    ------                                   -----
    moe1 = call_module[moe1](linear)         prefetch_all([moe1.router.weight, ...], 'moe1', 7)
                                             moe1 = call_module[moe1](linear)

A leaf called twice gets two prefetches; a leaf without parameters gets none.
The op is effectful, so no later pass may drop or reorder it.

Provides: ``prefetch_at_leaf_entry``.
"""

from __future__ import annotations

import torch
import torch.fx

from ..graph_nodes import is_prefetch_node
from ..leaf_call import leaf_call_of
from ..ops import register_leaf

__all__ = ["insert_prefetch_pass", "is_prefetch_node"]


def insert_prefetch_pass(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Insert one ``prefetch_all`` before every leaf ``call_module`` that has parameters."""
    graph = gm.graph
    for node in list(graph.nodes):
        call = leaf_call_of(node) if node.op == "call_module" else None
        if call is None or not call.params:
            continue
        if node.prev is not None and is_prefetch_node(node.prev):
            raise AssertionError(f"leafpass: leaf {call.name!r} already has a prefetch_all")
        with graph.inserting_before(node):
            prefetch = graph.call_function(
                torch.ops.leafpass.prefetch_all.default,
                (list(call.params), call.name, register_leaf(call.module)),
            )
        prefetch.meta["leafpass_prefetch"] = call
    graph.lint()
    gm.recompile()
    return gm
