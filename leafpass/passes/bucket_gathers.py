"""Merge adjacent gathers into buckets and issue them early (``gather="module"``).

Requires: ``gathers_at_first_use``. Each all-gather has a fixed cost (about 2 ms on gloo
here) whatever its size, so one gather per module is slow; one gather per step holds the
whole model. This pass sits between the two:

1. **Bucketing.** Within one compiled stretch (no leaf in between), consecutive gathers
   are merged while their elements add up to at most ``bucket_elements``; the merged
   gather sits where the first one was. A gather larger than the bucket stays alone;
   ``bucket_elements=0`` keeps one gather per module.
2. **Prefetch.** With ``prefetch_distance=d``, bucket ``i``'s ``gather_start`` is moved
   right after bucket ``i-d``'s ``gather_wait``: its all-gather is in flight while the
   ops of the ``d`` buckets before it compute. ``d=0`` starts each gather right before it
   is waited for. The leaf at the end of the stretch is the stretch's last "bucket": its
   ``prefetch_all`` is issued early the same way, by a ``prefetch_start`` placed after the
   wait ``d`` buckets before the end (the leaf's engine waits for it at the leaf's entry).

The forward schedule of one stretch with three buckets, ``d=1`` (``S`` start, ``W``
wait, ``=`` all-gather in flight, ``#`` compute using the bucket, ``x`` last use, after
which the compiled code frees the bucket)::

    stretch ops:   S0 W0 S1 [ops of b0 ####x] W1 S2 [ops of b1 ####x] W2 P [ops of b2 ##x] | leaf
    bucket 0:      S0=W0 ####x
    bucket 1:            S1 ==========W1 ####x
    bucket 2:                             S2 =========W2 ###x
    next leaf:                                            P ==========================| leaf

    live gathered:  b0 | b0+b1 | b1+b2 | b2+leaf | leaf     (at most d+1 buckets and the leaf)

Backward (the partitioner's doing, not this pass's): every gather used by backward is
recomputed, start and wait together, right before its first use in backward, and freed
after its last one; the leaf's engine gathers the leaf again for its backward.

Provides: ``gathers_bucketed``.
"""

from __future__ import annotations

import torch
import torch.fx

from ..graph_nodes import GATHER_META, gather_pairs, is_prefetch_node, is_prefetch_start_node, leaf_partitions
from .insert_gathers import emit_gather

__all__ = ["bucket_gathers_pass", "is_prefetch_start_node"]


def _merge(gm: torch.fx.GraphModule, run: list[tuple[torch.fx.Node, torch.fx.Node]], plan) -> None:
    """Replace the gather pairs of ``run`` with one gather before the first of them."""
    graph = gm.graph
    infos = [start.meta[GATHER_META] for start, _ in run]
    param_nodes = [n for start, _ in run for n in start.args[0]]
    names = [name for info in infos for name in info.bucket.names]
    params = [p for info in infos for p in info.bucket.params()]
    bucket = plan.make_bucket(params, names)
    modules = [m for info in infos for m in info.modules]
    _, gathered = emit_gather(graph, run[0][0], param_nodes, bucket, modules)
    index = 0
    for start, wait in run:
        for item in sorted(wait.users, key=lambda n: n.args[1]):
            item.replace_all_uses_with(gathered[index + item.args[1]])
        index += len(start.args[0])
        for item in list(wait.users):
            graph.erase_node(item)
        graph.erase_node(wait)
        graph.erase_node(start)


def _stretches(gm: torch.fx.GraphModule, piece: dict[torch.fx.Node, int]) -> list[list[tuple[torch.fx.Node, torch.fx.Node]]]:
    """Gather pairs grouped by compiled stretch (``piece``: ``graph_nodes.leaf_partitions(gm)``), in graph order."""
    by_piece: dict[int, list] = {}
    for start, wait in gather_pairs(gm):
        by_piece.setdefault(piece[start], []).append((start, wait))
    return [by_piece[k] for k in sorted(by_piece)]


def bucket_gathers_pass(gm: torch.fx.GraphModule, plan) -> torch.fx.GraphModule:
    """Merge adjacent gathers up to ``plan.bucket_elements``; start each ``plan.prefetch_distance``
    buckets early; issue each leaf's gather early the same way."""
    limit = int(plan.bucket_elements)
    for pairs in _stretches(gm, leaf_partitions(gm)):
        run: list = []
        total = 0
        for start, wait in pairs:
            info = start.meta[GATHER_META]
            if run:
                first = run[0][0].meta[GATHER_META].bucket
                if total + info.numel > limit or info.bucket.dtype != first.dtype or info.bucket.group is not first.group:
                    if len(run) > 1:
                        _merge(gm, run, plan)
                    run, total = [], 0
            run.append((start, wait))
            total += info.numel
        if len(run) > 1:
            _merge(gm, run, plan)
    distance = int(plan.prefetch_distance)
    if distance > 0:
        _prefetch(gm, distance)
    gm.graph.lint()
    gm.recompile()
    return gm


def _prefetch(gm: torch.fx.GraphModule, distance: int) -> None:
    piece = leaf_partitions(gm)  # after the merges
    for pairs in _stretches(gm, piece):
        for i, (start, _) in enumerate(pairs):
            if i >= distance:
                pairs[i - distance][1].append(start)
        # the leaf right after this stretch: start its gather early too
        last_wait = pairs[-1][1]
        leaf_prefetch = _next_prefetch(last_wait, piece)
        if leaf_prefetch is None:
            continue
        anchor = pairs[len(pairs) - distance][1] if len(pairs) >= distance else pairs[0][0]
        with gm.graph.inserting_after(anchor):
            gm.graph.call_function(torch.ops.leafpass.prefetch_start.default, tuple(leaf_prefetch.args[1:]))


def _next_prefetch(node: torch.fx.Node, piece: dict) -> torch.fx.Node | None:
    """The ``prefetch_all`` that ends the stretch ``node`` is in, if a leaf follows it."""
    here = piece.get(node)
    cursor = node.next
    while cursor.op != "output":
        if cursor.op != "placeholder" and piece.get(cursor) != here:
            return cursor if is_prefetch_node(cursor) else None
        cursor = cursor.next
    return None
