"""The in-graph gather ops of ``gather="module"``: ``gather_start`` and ``gather_wait``.

A *bucket* is a list of partitioned parameters gathered by one collective. In the graph
the passes produce, a bucket is gathered by a pair of ops::

    buf = torch.ops.leafpass.gather_start([w1, w2], 3)          # issue the all-gather
    ws  = torch.ops.leafpass.gather_wait(buf, [w1, w2], 3)      # wait, unpack full weights
    w1_full, w2_full = ws[0], ws[1]

``w1, w2`` are the parameters as graph inputs; while the compiled call runs they hold
*stand-ins* (their full shape over one element of memory, set up by the gatherer), so
the ops read no values from them: the bucket id finds the real shards in the registry
below. They are inputs so that (a) the ops have the shapes at trace time and (b)
autograd links the gathered weights to the parameters: the backward of
``gather_wait`` passes each full gradient straight through to its parameter, whose
``AccumulateGrad`` (and the engine's gradient hook on it) receives it as in eager.

The gathered weights are ordinary graph values: the compiled code frees each one after
its last use. The passes mark both ops "must recompute", so the partitioner does not
save them for backward; it gathers them again right before backward needs them.

What a bucket does when run is up to the runtime that made it (an object with
``numel``, ``dtype``, ``shapes``, ``start() -> (buffer, handle)`` and
``finish(buffer, handle) -> list[Tensor]``); leafpass's DeepSpeed one reads each
parameter's shard (:mod:`leafpass.runtime.deepspeed_module`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "LiveGathered",
    "gather_start",
    "gather_wait",
    "live_gathered",
    "lookup_bucket",
    "register_bucket",
]

_ids = itertools.count(1)
# bucket id -> bucket, held weakly: what holds a bucket is the program whose graph gathers it
# (the passes keep it in the gather node's meta; leafpass's backend keeps the buckets of a
# compiled program on it), so dropping the program (the model, torch._dynamo.reset()) drops
# its buckets and their entries here
_buckets: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
# bucket id -> the handles of its starts not yet waited for (a program never interleaves two
# starts of one bucket: each start is followed by its own wait before the bucket starts
# again); an entry is removed once empty
_in_flight: dict[int, collections.deque] = {}


def register_bucket(bucket: Any) -> int:
    """A new id under which the ops find ``bucket`` while something else holds it."""
    bucket_id = next(_ids)
    _buckets[bucket_id] = bucket
    return bucket_id


def lookup_bucket(bucket_id: int) -> Any:
    bucket = _buckets.get(bucket_id)
    if bucket is None:
        raise RuntimeError(
            f"leafpass: gather bucket {bucket_id} is unknown in this process; the compiled program "
            f"outlived the gatherer that built it. Compile the model again (torch._dynamo.reset())."
        )
    return bucket


class LiveGathered:
    """Elements gathered by the ops and still alive (not yet freed by the compiled code):
    receive buffers from ``gather_start`` on and the whole weights ``gather_wait`` cuts
    from them.

    ``listeners`` are called with the live count after every gather (memory probes use it
    to sample at the moments the count peaks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = 0
        self.listeners: list[Callable[[int], None]] = []

    def add(self, tensors: list[torch.Tensor]) -> None:
        """Count ``tensors`` as gathered until each is freed."""
        for t in tensors:
            n = t.numel()
            with self._lock:
                self.live += n
            weakref.finalize(t, self._sub, n)
        self.changed()

    def changed(self) -> None:
        """Tell the listeners that what is gathered grew (here, or in an engine's own gather)."""
        for listener in tuple(self.listeners):
            listener(self.live)

    def _sub(self, n: int) -> None:
        with self._lock:
            self.live -= n


live_gathered = LiveGathered()


@torch.library.custom_op("leafpass::gather_start", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def gather_start(params: list[torch.Tensor], bucket: int) -> torch.Tensor:
    """Issue the all-gather of bucket ``bucket``; returns the buffer it fills."""
    pending = _in_flight.pop(bucket, None)
    while pending:  # a start whose wait never ran (its call raised in between): drain it
        pending.popleft().wait()
    buffer, handle = lookup_bucket(bucket).start()
    _in_flight.setdefault(bucket, collections.deque()).append(handle)
    live_gathered.add([buffer])  # the whole bucket is held from now on
    return buffer


@gather_start.register_fake
def _gather_start_fake(params: list[torch.Tensor], bucket: int) -> torch.Tensor:
    found = lookup_bucket(bucket)
    return params[0].new_empty(found.buffer_numel, dtype=found.dtype)


@torch.library.custom_op("leafpass::gather_wait", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def gather_wait(buffer: torch.Tensor, params: list[torch.Tensor], bucket: int) -> list[torch.Tensor]:
    """Wait for bucket ``bucket``'s all-gather; return each parameter whole."""
    pending = _in_flight.get(bucket)
    if not pending:
        raise RuntimeError(f"leafpass: gather_wait of bucket {bucket} without a gather_start before it")
    found = lookup_bucket(bucket)
    handle = pending.popleft()
    if not pending:
        del _in_flight[bucket]
    out = found.finish(buffer, handle)
    live_gathered.add(out)
    found.counted(sum(t.numel() for t in out))
    return out


@gather_wait.register_fake
def _gather_wait_fake(buffer: torch.Tensor, params: list[torch.Tensor], bucket: int) -> list[torch.Tensor]:
    return [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]


def _start_context(ctx, inputs, output) -> None:
    ctx.n = len(inputs[0])


def _start_backward(ctx, grad):
    return [None] * ctx.n, None


def _wait_context(ctx, inputs, output) -> None:
    pass


def _wait_backward(ctx, grads):
    # each gathered weight's gradient is its parameter's gradient, full size
    return None, list(grads), None


gather_start.register_autograd(_start_backward, setup_context=_start_context)
gather_wait.register_autograd(_wait_backward, setup_context=_wait_context)
