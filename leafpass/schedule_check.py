"""Check, across ranks, that every rank compiled the same leaf schedule.

Ranks that disagree about which modules are leaves, or prefetch them in another
order, would issue different collectives and abort (gloo: size mismatch) or hang.
On the first call of every program compiled for a frame's *first* compile, each
rank shares that program's schedule, a list of ``(leaf, parameter count)`` in
prefetch order (empty for a program without leaves); ranks compare a fingerprint
with one all-reduce (min and max of a hash) and only on a mismatch gather the
schedules to name the leaves that differ. The error is raised on every rank.

First compiles happen in the same order on every rank (the same code runs
everywhere in the first step), so the checks pair up. Recompiles are not checked:
they may happen on one rank only (a new input shape there), and a check there would
have no partner.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.fx

from .leaf_call import leaf_call_of

__all__ = ["LeafScheduleMismatch", "leaf_schedule", "check_same_gather", "check_same_schedule"]


class LeafScheduleMismatch(RuntimeError):
    """Ranks compiled different leaf schedules."""


def leaf_schedule(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    """``(leaf qualified name, parameter count)`` of every prefetched leaf call, and
    ``("gather <modules>", elements)`` of every in-graph gather (``gather="module"``), in
    graph order: every collective the program issues at its own initiative."""
    from .passes.insert_gathers import GATHER_META

    schedule = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and (call := leaf_call_of(node)) is not None and call.params:
            schedule.append((call.name, len(call.params)))
        elif GATHER_META in node.meta:
            info = node.meta[GATHER_META]
            schedule.append((f"gather {'+'.join(info.modules)}", info.numel))
    return schedule


def _fingerprint(schedule) -> int:
    digest = hashlib.sha256(repr(schedule).encode()).digest()
    return int.from_bytes(digest[:7], "little")  # fits in int64


def _differing_positions(schedules: list[list]) -> list[int]:
    """Positions at which the ranks' schedules hold different entries (or one has none)."""
    longest = max(len(s) for s in schedules)
    return [i for i in range(longest) if len({tuple(s[i]) if i < len(s) else None for s in schedules}) > 1]


def _differing(schedules: list[list[tuple[str, int]]]) -> list[str]:
    names = []
    for i in _differing_positions(schedules):
        names.extend(sorted({s[i][0] for s in schedules if i < len(s)}))
    return list(dict.fromkeys(names))


def _schedules_if_different(schedule: list) -> list | None:
    """With world size > 1: every rank's ``schedule`` if they differ, else None (one all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    device = torch.device("cpu") if dist.get_backend() == "gloo" else torch.device("cuda", torch.cuda.current_device())
    fp = torch.tensor([_fingerprint(schedule), -_fingerprint(schedule)], dtype=torch.int64, device=device)
    dist.all_reduce(fp, op=dist.ReduceOp.MIN)
    if int(fp[0]) == -int(fp[1]):
        return None
    schedules: list = [None] * dist.get_world_size()
    dist.all_gather_object(schedules, schedule)
    return schedules


def check_same_schedule(schedule: list[tuple[str, int]]) -> None:
    """With world size > 1: raise on every rank if the ranks' ``schedule`` differ."""
    schedules = _schedules_if_different(schedule)
    if schedules is None:
        return
    lines = "; ".join(
        f"rank {r}: " + (", ".join(f"{name}({n})" for name, n in s) or "no leaves") for r, s in enumerate(schedules)
    )
    raise LeafScheduleMismatch(
        f"leafpass: ranks compiled different leaf schedules (leaf(parameter count) in prefetch "
        f"order) -- {lines}. Leaves that differ: {', '.join(_differing(schedules)) or '(order only)'}. "
        f"Flag the same modules on every rank, before deepspeed.initialize and torch.compile."
    )


def check_same_gather(gather: list[tuple[int, int, bool]]) -> None:
    """With world size > 1: raise on every rank if the ranks would gather different
    parameters before the compiled forward, or hand different ones to leaves
    (``(ds_id, numel, inside a leaf)`` in order)."""
    schedules = _schedules_if_different(gather)
    if schedules is None:
        return
    sizes = ", ".join(
        f"rank {r}: {len(s)} parameters, {sum(1 for e in s if e[2])} inside leaves" for r, s in enumerate(schedules)
    )
    first = next(iter(_differing_positions(schedules)), None)
    raise LeafScheduleMismatch(
        f"leafpass: ranks would gather different parameters in the compiled forward, or flag "
        f"different leaves (gather='step' or 'module') -- {sizes}; first difference at position {first}. "
        f"Flag the same modules on every rank, before deepspeed.initialize and torch.compile."
    )
