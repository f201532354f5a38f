"""Count the collectives a process issues: how leafpass checks "one all-gather per leaf".

:func:`count_collectives` wraps the collective methods of
``torch.distributed.ProcessGroup`` while it is active. Every ``torch.distributed``
function and every DeepSpeed communication path ends in one of these methods, whatever
Python wrapper led there; this matters because DeepSpeed's ``TorchBackend`` keeps its own
reference to ``torch.distributed.all_gather_into_tensor`` from the moment it is built, so
wrapping the module-level functions would miss its calls.

What DeepSpeed 0.19.8's ZeRO-3 issues on CPU/gloo (read from
``deepspeed/runtime/zero/partition_parameters.py``, ``deepspeed/comm/torch.py`` and
``deepspeed/runtime/comm/coalesced_collectives.py``):

* parameter gathers: ``param.all_gather_coalesced(params)`` concatenates the local shards of
  all the parameters into one flat buffer and issues ONE ``all_gather_into_tensor``
  (``ProcessGroup.all_gather_single``) per communication dtype; a single parameter, or
  ``allgather_sequential``, takes one call per parameter;
* gradient reduction: ``reduce_scatter_coalesced`` issues one ``reduce_scatter_tensor``
  (``ProcessGroup.reduce_scatter_single``) per bucket;
* ``all_reduce`` for overflow checks and norms, and ``all_gather`` of small integer lists
  (``assert_ints_same_as_other_ranks``) while it records its trace in the first steps.

Counting rule: one call of a collective method of a process group is one collective, of the
kind its method names (``all_gather``, ``reduce_scatter``, ``all_reduce``, ...). So a
coalesced gather of N parameters issued as one flat ``all_gather_into_tensor`` counts as ONE
all-gather, and so does a batch issued through ``torch.distributed._coalescing_manager``
(it reaches the process group as one ``*_coalesced`` call); N separate per-parameter gathers
count N. Only calls made by this process while the counter is active are counted, from any
thread (autograd may run backward hooks on its own threads).

:class:`GatheredElementsTracker` measures the other side of a gather policy: the most
parameter elements gathered at once (DeepSpeed's gathered parameters plus the weights
leafpass's in-graph gather ops hold under ``gather="module"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

__all__ = ["CollectiveCounter", "CollectiveEvent", "GatheredElementsTracker", "count_collectives"]

# ProcessGroup method -> kind. Methods a torch build lacks are skipped.
_METHOD_KINDS = {
    "all_gather_single": "all_gather",
    "all_gather_single_coalesced": "all_gather",
    "allgather": "all_gather",
    "allgather_coalesced": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather",
    "_allgather_base": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_single_coalesced": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "allreduce": "all_reduce",
    "allreduce_coalesced": "all_reduce",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "alltoall": "all_to_all",
    "alltoall_base": "all_to_all",
    "all_to_all_single": "all_to_all",
    "gather": "gather",
    "scatter": "scatter",
    "barrier": "barrier",
}


@dataclasses.dataclass(frozen=True)
class CollectiveEvent:
    kind: str  # "all_gather", "reduce_scatter", "all_reduce", ...
    method: str  # the ProcessGroup method called
    numel: int  # elements in its first tensor argument (the output for gathers), 0 if none


class CollectiveCounter:
    """What :func:`count_collectives` saw. ``counts[kind]`` and ``events`` grow as calls happen."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.events: list[CollectiveEvent] = []
        self._lock = threading.Lock()

    def _record(self, event: CollectiveEvent) -> None:
        with self._lock:
            self.counts[event.kind] += 1
            self.events.append(event)

    @property
    def all_gather(self) -> int:
        return self.counts["all_gather"]

    @property
    def reduce_scatter(self) -> int:
        return self.counts["reduce_scatter"]

    @property
    def all_reduce(self) -> int:
        return self.counts["all_reduce"]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        """The counts so far; subtract two snapshots with :meth:`delta` to count a span."""
        with self._lock:
            return dict(self.counts)

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        """Per-kind counts issued between two :meth:`snapshot` calls (kinds with none left out)."""
        diff = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
        return {k: n for k, n in diff.items() if n}

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.events.clear()

    def __repr__(self) -> str:
        return f"CollectiveCounter({dict(self.counts)})"


_install_lock = threading.Lock()
_active: list[CollectiveCounter] = []
_originals: dict[str, Any] = {}


def _numel(args: tuple) -> int:
    first = args[0] if args else None
    if isinstance(first, (list, tuple)):
        return sum(_numel((t,)) for t in first)
    numel = getattr(first, "numel", None)
    return int(numel()) if callable(numel) else 0


def _wrap(method: str, kind: str, raw: Any):
    @functools.wraps(raw)
    def counted(self, *args, **kwargs):
        event = CollectiveEvent(kind, method, _numel(args))
        for counter in tuple(_active):
            counter._record(event)
        return raw.__get__(self, type(self))(*args, **kwargs)

    return counted


def _install() -> None:
    from torch.distributed import ProcessGroup

    for method, kind in _METHOD_KINDS.items():
        raw = ProcessGroup.__dict__.get(method)
        if raw is None:
            continue
        _originals[method] = raw
        setattr(ProcessGroup, method, _wrap(method, kind, raw))


def _uninstall() -> None:
    from torch.distributed import ProcessGroup

    for method, raw in _originals.items():
        setattr(ProcessGroup, method, raw)
    _originals.clear()


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCounter]:
    """Count the collectives this process issues inside the ``with`` block.

    Counters may nest; each one counts every call made while it is active. See the
    module docstring for the counting rule::

        with count_collectives() as c:
            loss = engine(x).sum()
        assert c.all_gather == 2
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("count_collectives() needs a torch build with torch.distributed")
    counter = CollectiveCounter()
    with _install_lock:
        if not _active:
            _install()
        _active.append(counter)
    try:
        yield counter
    finally:
        with _install_lock:
            _active.remove(counter)
            if not _active:
                _uninstall()


class GatheredElementsTracker:
    """The most ZeRO-3 parameter elements gathered at once, over a span.

    Two kinds of gathered parameters are counted:

    * DeepSpeed's: the AVAILABLE, non-persistent parameters of the model (gathered by
      DeepSpeed's module hooks, by leafpass's ``prefetch_all`` for leaves, or by
      ``gather="step"``). Persistent parameters (below
      ``stage3_param_persistence_threshold``) are never partitioned and are left out.
    * leafpass's in-graph gathers (``gather="module"``): the whole weights the compiled
      graph's gather ops made and has not freed yet, ``leafpass.live_gathered.live``.
      These parameters stay partitioned (NOT_AVAILABLE) in DeepSpeed's eyes, so the first
      count misses them.

    :meth:`current` is their sum. It can only peak right after a gather, so it is sampled
    (:meth:`sample`) at the moments that follow one:

    * before each release of a DeepSpeed parameter: the tracker wraps each parameter's
      ``partition`` method (which DeepSpeed 0.19.x attaches to every ZeRO-3 parameter, in
      ``partition_parameters.py``, ``_convert_to_deepspeed_param``; every release ends
      there), so the DeepSpeed count is at its height for that parameter;
    * after each in-graph gather: a listener on ``live_gathered.listeners``;
    * whenever the caller calls :meth:`sample` (e.g. at the end of a step).

    Gathers in flight count too: they hold their memory from the moment they are issued.
    A DeepSpeed parameter whose all-gather was issued and not yet waited for (INFLIGHT: a
    leaf prefetched early) counts as gathered, and so does an in-graph bucket's receive
    buffer from its ``gather_start`` until the compiled code frees it (while
    ``gather_wait`` cuts it into whole weights, both are alive and both count). An early
    leaf prefetch (``prefetch_start``) also notifies the listeners. Use it as a context manager: ``__enter__`` installs the
    ``partition`` wrappers and the listener, ``__exit__`` removes them.
    """

    def __init__(self, model) -> None:
        self.params = [p for p in model.parameters() if hasattr(p, "ds_id")]
        self.peak = 0
        self._originals: list[tuple[Any, Any]] = []
        self._listener = None

    @staticmethod
    def _live_gathered():
        # imported here, not at the top, so that this module stays importable without torch
        from leafpass import live_gathered

        return live_gathered

    def deepspeed_gathered(self) -> int:
        """Elements of the AVAILABLE or INFLIGHT, non-persistent DeepSpeed parameters of the model."""
        return sum(int(p.ds_numel) for p in self.params
                   if not p.ds_persist and p.ds_status.name in ("AVAILABLE", "INFLIGHT"))

    def in_graph_gathered(self) -> int:
        """Elements gathered by leafpass's in-graph gather ops and still alive."""
        return int(self._live_gathered().live)

    def current(self) -> int:
        return self.deepspeed_gathered() + self.in_graph_gathered()

    def sample(self) -> int:
        now = self.current()
        self.peak = max(self.peak, now)
        return now

    def reset(self) -> None:
        self.peak = 0

    def __enter__(self) -> "GatheredElementsTracker":
        for p in self.params:
            original = p.partition

            @functools.wraps(original)
            def partition(*args, _original=original, **kwargs):
                self.sample()
                return _original(*args, **kwargs)

            self._originals.append((p, original))
            p.partition = partition

        def listener(_live: int) -> None:
            self.sample()

        self._listener = listener
        self._live_gathered().listeners.append(listener)
        return self

    def __exit__(self, *exc) -> None:
        for p, original in self._originals:
            p.partition = original
        self._originals.clear()
        if self._listener is not None:
            listeners = self._live_gathered().listeners
            if self._listener in listeners:
                listeners.remove(self._listener)
            self._listener = None
