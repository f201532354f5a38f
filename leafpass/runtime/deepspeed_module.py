"""``gather="module"`` on DeepSpeed ZeRO-3: what the gather ops and the gatherer need.

* :class:`ShardBucket`: one bucket of the in-graph gather ops
  (:mod:`leafpass.gather_ops`). It all-gathers the ranks' shards of its parameters
  (``ds_tensor``) in ONE ``all_gather_into_tensor`` and cuts the result into whole
  parameters, new tensors the compiled code owns and frees. DeepSpeed's parameter
  status is never touched: the parameter stays partitioned (NOT_AVAILABLE) throughout.
* :class:`StandIns`: while a compiled call runs, every partitioned parameter that the
  ops gather holds a *stand-in*: its full shape, zero strides, one element of memory.
  Dynamo guards each parameter's size and strides at frame entry; the stand-in makes them
  the same every step (a partitioned parameter is ``[0]``), and its full shape lets
  autograd hand each full-size gradient to the parameter's ``AccumulateGrad``, which
  DeepSpeed's gradient hook then reduce-scatters exactly as in eager ZeRO-3. The real
  (empty) data is put back once backward has finished.
* :class:`ShardPlan`: the :class:`~leafpass.module_plan.ModulePlan` whose buckets are
  :class:`ShardBucket`.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..module_plan import ModulePlan
from .deepspeed_shards import shard

__all__ = ["ShardBucket", "ShardPlan", "StandIns"]


class ShardBucket:
    """Parameters of one dtype and partition group, gathered by one collective."""

    def __init__(self, params: list[nn.Parameter], names: list[str], counter) -> None:
        shards = [shard(p) for p in params]
        groups = {id(g) for _, g in shards}
        dtypes = {p.dtype for p in params}
        if len(groups) != 1 or len(dtypes) != 1:
            raise AssertionError(f"leafpass: bucket {names} mixes dtypes or process groups")
        self.group = shards[0][1]
        self.world = dist.get_world_size(self.group)
        self._params = [weakref.ref(p) for p in params]
        self.names = names
        self.dtype = params[0].dtype
        self.shapes = [torch.Size(p.ds_shape) for p in params]
        self.numels = [int(p.ds_numel) for p in params]
        self.parts = [int(s.numel()) for s, _ in shards]
        self.part_numel = sum(self.parts)
        self.buffer_numel = self.part_numel * self.world
        self.numel = sum(self.numels)
        self._counter = counter

    def params(self) -> list[nn.Parameter]:
        found = [r() for r in self._params]
        if any(p is None for p in found):
            raise RuntimeError(f"leafpass: parameters {self.names} of a compiled gather no longer exist; "
                               f"compile the model again (torch._dynamo.reset())")
        return found

    @torch.no_grad()
    def start(self):
        # the shards' layout was checked (deepspeed_shards.shard) when the bucket was made
        shards = [p.ds_tensor for p in self.params()]
        send = torch.cat([s.reshape(-1) for s in shards]) if len(shards) > 1 else shards[0].reshape(-1)
        buffer = torch.empty(self.buffer_numel, dtype=self.dtype, device=send.device)
        handle = dist.all_gather_into_tensor(buffer, send, group=self.group, async_op=True)
        return buffer, handle

    @torch.no_grad()
    def finish(self, buffer: torch.Tensor, handle) -> list[torch.Tensor]:
        handle.wait()
        by_rank = buffer.view(self.world, self.part_numel)
        out, offset = [], 0
        for shape, numel, part in zip(self.shapes, self.numels, self.parts):
            whole = torch.empty(self.world, part, dtype=self.dtype, device=buffer.device)
            whole.copy_(by_rank[:, offset:offset + part])
            out.append(whole.view(-1)[:numel].view(shape))
            offset += part
        return out

    def counted(self, numel: int) -> None:
        self._counter(numel)


class StandIns:
    """Put full-shape, zero-stride stand-ins into partitioned parameters, and take them out."""

    def __init__(self) -> None:
        self._by_param: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> its stand-in
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    def stand_in(self, p: nn.Parameter) -> torch.Tensor:
        s = self._by_param.get(p)
        if s is None:
            # its own element: stand-ins sharing memory would look like aliased inputs
            s = self._by_param[p] = torch.zeros(1, dtype=p.dtype, device=p.device).expand(p.ds_shape)
        return s

    def is_stand_in(self, p: nn.Parameter) -> bool:
        s = self._by_param.get(p)
        return s is not None and p.data.data_ptr() == s.data_ptr() and p.data.shape == s.shape

    @torch.no_grad()
    def put_in(self, params: list[nn.Parameter]) -> None:
        for p in params:
            if self.is_stand_in(p):
                continue
            if p.data.numel() != 0:
                raise AssertionError(f"leafpass: parameter {p.ds_summary()} is not partitioned at the call")
            self._saved.append((p, p.data))
            p.data = self.stand_in(p)

    @torch.no_grad()
    def take_out(self) -> None:
        saved, self._saved = self._saved, []
        for p, data in saved:
            if self.is_stand_in(p):
                p.data = data


class ShardPlan(ModulePlan):
    """A :class:`~leafpass.module_plan.ModulePlan` whose buckets gather DeepSpeed shards."""

    def make_bucket(self, params: list[nn.Parameter], names: list[str]) -> ShardBucket:
        return ShardBucket(params, names, self.counter)
