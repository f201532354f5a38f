"""The graph vocabulary: what leafpass's nodes are, shared by every stage that reads a graph.

The passes write these nodes and marks, lowering cuts the graph at them, the schedule
check fingerprints them and ``format_graph`` prints them; each asks here instead of asking
the stage that wrote them, so no stage imports a later one::

    prefetch_all moe1 (17 params)          is_prefetch_node          (insert_prefetch)
    moe1 = call_module[moe1](x)            is_leaf_call_node         (leaf_call_module)
    prefetch_start moe2                    is_prefetch_start_node    (bucket_gathers)
    s0 = gather_start([...], 3)            gather_info_of -> GatherInfo  (insert_gathers)
    t1 = layer_norm(...)  # checkpoint 0   checkpoint_region_of      (inline_checkpoint)

and :func:`leaf_partitions`, the pieces ``lower`` compiles (stretches of ordinary ops)
and runs eagerly (a leaf with its prefetch, the nodes building its object arguments
(``ARGUMENT_META``) and the nodes unpacking its output).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from .leaf_arguments import BuildArgument
from .leaf_call import leaf_call_of

__all__ = [
    "ARGUMENT_META",
    "CHECKPOINT_META",
    "CheckpointRegion",
    "GATHER_META",
    "GatherInfo",
    "checkpoint_region_of",
    "gather_info_of",
    "gather_pairs",
    "is_leaf_call_node",
    "is_prefetch_node",
    "is_prefetch_start_node",
    "leaf_partitions",
]

GATHER_META = "leafpass_gather"
CHECKPOINT_META = "leafpass_checkpoint"
# a node that builds a leaf's object argument before its call or reads it back after
# (``passes.leaf_call_module``): it belongs to the leaf's piece
ARGUMENT_META = "leafpass_leaf_argument"


def is_leaf_call_node(node: torch.fx.Node) -> bool:
    """A ``call_module`` of a flagged leaf (carries a ``LeafCall``)."""
    return node.op == "call_module" and leaf_call_of(node) is not None


def is_prefetch_node(node: torch.fx.Node) -> bool:
    """A ``torch.ops.leafpass.prefetch_all`` call (overload or packet, as Dynamo records it)."""
    return node.op == "call_function" and node.target in (
        torch.ops.leafpass.prefetch_all.default,
        torch.ops.leafpass.prefetch_all,
    )


def is_prefetch_start_node(node: torch.fx.Node) -> bool:
    """A ``torch.ops.leafpass.prefetch_start`` call: a leaf's gather issued early."""
    return node.op == "call_function" and node.target == torch.ops.leafpass.prefetch_start.default


class GatherInfo:
    """What one in-graph gather pair gathers (kept in the ``gather_start`` node's meta)."""

    def __init__(self, bucket, modules: list[str]) -> None:
        self.bucket = bucket
        self.modules = modules

    @property
    def numel(self) -> int:
        return self.bucket.numel

    def __repr__(self) -> str:
        return f"GatherInfo({self.modules}, {self.numel} elements)"


def gather_info_of(node: torch.fx.Node) -> GatherInfo | None:
    """The :class:`GatherInfo` of a ``gather_start`` node, else None."""
    return node.meta.get(GATHER_META)


def gather_pairs(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(gather_start, gather_wait)`` node pairs in graph order."""
    pairs = []
    for node in gm.graph.nodes:
        if GATHER_META in node.meta:
            wait = next(u for u in node.users if u.target == torch.ops.leafpass.gather_wait.default)
            pairs.append((node, wait))
    return pairs


@dataclasses.dataclass(frozen=True)
class CheckpointRegion:
    """The checkpoint region a node was copied out of: ``graph_id`` is the ``ac_graph_id``
    its recomputed ops carry; ``preserve_rng_state`` the flag checkpoint was given."""

    graph_id: int
    preserve_rng_state: bool = True


def checkpoint_region_of(node: torch.fx.Node) -> CheckpointRegion | None:
    return node.meta.get(CHECKPOINT_META)


def leaf_partitions(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int]:
    """Partition id of every node, in graph order.

    A leaf piece holds a leaf's ``prefetch_all``, its ``call_module`` and the
    ``getitem``/``getattr`` nodes unpacking its output, and the nodes that build its
    object arguments before it and read them back after it (``ARGUMENT_META``);
    every other stretch of nodes is one compiled piece.
    """
    part: dict[torch.fx.Node, int] = {}
    current, current_is_leaf = 0, False
    leaf_values: set[torch.fx.Node] = set()
    previous = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _builds_argument(node):
            if not (previous is not None and _builds_argument(previous)):
                current, current_is_leaf = current + 1, True
        elif is_prefetch_node(node):
            if not (previous is not None and _builds_argument(previous)):
                current, current_is_leaf = current + 1, True
        elif is_leaf_call_node(node):
            if not (previous is not None and (is_prefetch_node(previous) or _builds_argument(previous))):
                current, current_is_leaf = current + 1, True
            leaf_values.add(node)
        elif current_is_leaf and (_unpacks(node, leaf_values) or ARGUMENT_META in node.meta):
            leaf_values.add(node)
        elif current_is_leaf:
            current, current_is_leaf = current + 1, False
        part[node] = current
        previous = node
    return part


def _builds_argument(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, BuildArgument)


def _unpacks(node: torch.fx.Node, values: set[torch.fx.Node]) -> bool:
    return (
        node.op == "call_function"
        and node.target in (operator.getitem, getattr)
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0] in values
    )
