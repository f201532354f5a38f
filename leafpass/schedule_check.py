"""Check, across ranks, that every rank compiled the same leaf schedule.

Ranks that disagree about which modules are leaves, or prefetch them in another
order, would issue different collectives and abort (gloo: size mismatch) or hang.
On the first call of every program compiled for a frame's *first* compile that issues
collectives of its own (leaves, or in-graph gathers under ``gather="module"``), each
rank shares that program's schedule, a list of ``(leaf, parameter count)`` in prefetch
order; ranks compare a fingerprint with one all-reduce (min and max of a hash) and only
on a mismatch gather the schedules to name the leaves and the frames that differ. The
error is raised on every rank.

First compiles happen in the same order on every rank (the same code runs
everywhere in the first step), so the checks pair up. Programs without collectives of
their own are not checked: a frame only some ranks compile (a function called on rank 0
only, say) cannot desynchronise the ranks when it issues no collective, and a check
there would have no partner. Recompiles are not checked for the same reason (a new
input shape on one rank only). A check whose partner never comes fails after
:func:`check_timeout` instead of hanging, naming the frame.

The all-reduce runs on the process group's own device: CPU when its backend takes CPU
tensors (gloo), else the accelerator DeepSpeed uses (when DeepSpeed is imported) or
torch's current one (:func:`collective_device`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys

import torch
import torch.distributed as dist
import torch.fx

from .graph_nodes import GATHER_META
from .leaf_call import leaf_call_of

__all__ = [
    "LeafScheduleMismatch",
    "check_same_gather",
    "check_same_leaves",
    "check_same_schedule",
    "check_timeout",
    "collective_device",
    "device_for_backend",
    "leaf_schedule",
]

TIMEOUT_ENV = "LEAFPASS_CHECK_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 1800.0  # gloo's default process-group timeout


class LeafScheduleMismatch(RuntimeError):
    """Ranks compiled different leaf schedules."""


def leaf_schedule(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    """``(leaf qualified name, parameter count)`` of every prefetched leaf call, and
    ``("gather <modules>", elements)`` of every in-graph gather (``gather="module"``), in
    graph order: every collective the program issues at its own initiative."""
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


def device_for_backend(backend: str, accelerator: str | None = None) -> torch.device:
    """The device whose tensors a process group of ``backend`` reduces.

    CPU when the backend takes CPU tensors (gloo, mpi, ucc), else ``accelerator`` (a device
    name such as DeepSpeed's ``get_accelerator().current_device_name()``, ``"hpu"``,
    ``"npu:0"``) when the backend takes that device type or is unknown to torch, else the
    backend's own device type as torch registered it (nccl -> cuda, xccl -> xpu), else torch's
    current accelerator. A device type without an index means the current device."""
    devices = _backend_devices(backend)
    if devices is not None and "cpu" in devices:
        return torch.device("cpu")
    if accelerator is not None:
        device = torch.device(accelerator)
        if devices is None or device.type in devices:
            return device
    if devices:
        return torch.device(devices[0])
    current = torch.accelerator.current_accelerator()
    if current is not None:
        return torch.device(current.type)
    raise ValueError(
        f"leafpass: cannot tell which device the process group backend {backend!r} reduces on "
        f"(torch does not know the backend and no accelerator is available); register it with "
        f"torch.distributed.Backend.register_backend(..., devices=[...]) or import DeepSpeed first"
    )


def _backend_devices(backend: str) -> list[str] | None:
    """Device types ``backend`` takes, as torch knows them; None if torch does not know it.
    ``"cpu:gloo,cuda:nccl"`` (one backend per device) gives ``["cpu", "cuda"]``."""
    name = str(backend).lower()
    if ":" in name:
        return [part.split(":", 1)[0] for part in name.split(",")]
    found = dist.Backend.backend_capability.get(name)
    return list(found) if found is not None else None


def _deepspeed_device() -> str | None:
    # only when the program uses DeepSpeed already: never import it for this
    if "deepspeed.accelerator" not in sys.modules:
        return None
    try:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().current_device_name()
    except Exception:  # an accelerator DeepSpeed cannot set up here: torch decides
        return None


def collective_device(group=None) -> torch.device:
    """The device for a small collective on ``group`` (default: the default group)."""
    return device_for_backend(dist.get_backend(group), _deepspeed_device())


def check_timeout() -> datetime.timedelta:
    """How long a check waits for the other ranks (``LEAFPASS_CHECK_TIMEOUT_S``, default
    1800 s): ranks compile at different speeds, so it is generous."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(value) if value else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"leafpass: {TIMEOUT_ENV} must be a number of seconds; got {value!r}") from None
    return datetime.timedelta(seconds=seconds)


def _schedules_if_different(schedule: list, what: str) -> list | None:
    """With world size > 1: every rank's ``(schedule, what)`` if the schedules differ, else
    None (one all-reduce, waited for at most :func:`check_timeout`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    device = collective_device()
    fp = torch.tensor([_fingerprint(schedule), -_fingerprint(schedule)], dtype=torch.int64, device=device)
    timeout = check_timeout()
    work = dist.all_reduce(fp, op=dist.ReduceOp.MIN, async_op=True)
    try:
        work.wait(timeout=timeout)
    except RuntimeError as e:
        raise LeafScheduleMismatch(
            f"leafpass: rank {dist.get_rank()} found no other rank to check {what} with (it waited up "
            f"to {timeout.total_seconds():g} s: {e}). The other ranks compiled other code at this point "
            f"(a frame with leaves on some ranks only, or different leaf flags); flag the same modules "
            f"on every rank and run the same code path in the first steps. Set {TIMEOUT_ENV} to wait longer."
        ) from e
    if int(fp[0]) == -int(fp[1]):
        return None
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, (schedule, what))
    return found


def check_same_schedule(schedule: list[tuple[str, int]], frame: str | None = None) -> None:
    """With world size > 1: raise on every rank if the ranks' ``schedule`` differ.
    ``frame`` names the compiled frame in the message; an empty schedule (a program that
    issues no collective of its own) is not checked."""
    if not schedule:
        return
    mine = ", ".join(f"{name}({n})" for name, n in schedule)
    found = _schedules_if_different(schedule, f"frame {frame or '(unknown frame)'} (leaves and gathers: {mine})")
    if found is None:
        return
    schedules = [s for s, _ in found]
    lines = "; ".join(
        f"rank {r} in {what.split(' (leaves and gathers: ')[0]}: "
        + (", ".join(f"{name}({n})" for name, n in s) or "no leaves")
        for r, (s, what) in enumerate(found)
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
    found = _schedules_if_different(gather, "the parameters gathered for the compiled forward")
    if found is None:
        return
    schedules = [s for s, _ in found]
    sizes = ", ".join(
        f"rank {r}: {len(s)} parameters, {sum(1 for e in s if e[2])} inside leaves" for r, s in enumerate(schedules)
    )
    first = next(iter(_differing_positions(schedules)), None)
    raise LeafScheduleMismatch(
        f"leafpass: ranks would gather different parameters in the compiled forward, or flag "
        f"different leaves (gather='step' or 'module') -- {sizes}; first difference at position {first}. "
        f"Flag the same modules on every rank, before deepspeed.initialize and torch.compile."
    )


def check_same_leaves(leaves: list[str]) -> None:
    """With world size > 1: raise on every rank, naming the modules, if the ranks flag
    different leaf modules (``leaves``: qualified names, in module order). Run once at the
    first compiled call of a partitioned model under ``gather="hooks"``, where every rank
    calls the model, so the ranks meet there even when their compiled frames differ."""
    found = _schedules_if_different(leaves, "the leaf modules flagged in the model")
    if found is None:
        return
    lists = [list(s) for s, _ in found]
    differ = sorted(set().union(*lists) - set.intersection(*map(set, lists)))
    lines = "; ".join(f"rank {r}: {', '.join(s) or 'none'}" for r, s in enumerate(lists))
    raise LeafScheduleMismatch(
        f"leafpass: ranks flagged different leaf modules -- {lines}. Leaves that differ: "
        f"{', '.join(differ) or '(order only)'}. Flag the same modules on every rank, before "
        f"deepspeed.initialize and torch.compile."
    )
