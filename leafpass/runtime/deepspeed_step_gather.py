"""The whole-model gather of ``gather="step"`` on gloo, as one all-reduce into place.

``gather="step"`` gathers every partitioned parameter once before the compiled forward.
Through DeepSpeed (``all_gather_coalesced``) that is one all-gather into a rank-major buffer
(rank 0's partitions of every parameter, then rank 1's, ...) followed, per parameter, by a
``torch.cat`` of its world-size pieces into a new tensor. On CPU ranks the model then lands
in fresh memory twice, and most of the cost is page faults, not communication (medium
Mixtral, 2 gloo ranks: about 40 ms a step in those ``torch.cat`` calls, beside 66 ms for
gloo's all-gather of the 55 MB where its all-reduce takes 59).

Here instead, each rank writes its partition of every parameter into its place in one
zeroed, parameter-major buffer (parameter after parameter, each whole), the buffer is
all-reduced, and every parameter's data becomes a view of its place: the model lands in
memory once, with no reassembly, and into the same memory every step (:class:`GatherBuffer`).
A sum with zeros is exact, so the values are the
partitions' (a ``-0.0`` comes back as ``0.0``, the only bit that can differ). Releasing is
DeepSpeed's as before (a released parameter gets new, empty data); the buffer is reused when
its last parameter is released, which under ``gather="step"`` is after backward, with the
rest. Between steps the process keeps that memory (the model's size), as CUDA's caching
allocator keeps DeepSpeed's gather buffers on a GPU.

Only where that wins and nothing else reads the gather: several ranks on gloo, no
quantized weights, no hpZ secondary partitions, no NVMe-swapped partitions, one process
group and one dtype. Elsewhere DeepSpeed gathers (on NCCL an all-reduce moves twice the
bytes of an all-gather; the reassembly there is a device copy into the caching allocator).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import deepspeed as ds

__all__ = ["GatherBuffer", "gather_in_place", "unsupported_reason"]


def unsupported_reason(owner, params: list[nn.Parameter]) -> str | None:
    """Why ``params`` are gathered by DeepSpeed, or None when :func:`gather_in_place` applies."""
    if not params:
        return "nothing to gather"
    group = getattr(params[0], "ds_process_group", None)
    if any(getattr(p, "ds_process_group", None) is not group for p in params):
        return "parameters in several process groups"
    if dist.get_world_size(group) == 1:
        return "one rank (DeepSpeed gathers nothing)"
    if dist.get_backend(group) != "gloo":
        return f"backend {dist.get_backend(group)!r} (an all-gather moves half the bytes of an all-reduce)"
    if ds.quantized_weights(owner) or any(hasattr(p.ds_tensor, "ds_quant_scale") for p in params):
        return "quantized weights"
    first = params[0].ds_tensor
    for p in params:
        if getattr(p, "ds_secondary_tensor", None) is not None:
            return "hpZ secondary partitions"
        shard = p.ds_tensor
        if shard.numel() != shard.ds_numel or shard.device.type != "cpu":
            return "partitions not in CPU memory (NVMe swap or offload in flight)"
        if shard.dtype != first.dtype or p.dtype != shard.dtype:
            return "parameters of several dtypes"
    return None


class GatherBuffer:
    """The buffer of the last in-place gather, kept for the next one (what CUDA's caching
    allocator does for DeepSpeed's gathers on a GPU): fresh memory on CPU costs a page fault
    per 4 KiB page, about 30 ms a step for the medium Mixtral's 55 MB. It is reused only when
    no parameter's data lies in it any more (every one released) and the size matches."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype, device: torch.device, users: list[nn.Parameter]) -> torch.Tensor:
        t = self.tensor
        if (t is not None and t.numel() == numel and t.dtype == dtype and t.device == device
                and not any(u.data.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for u in users)):
            return t.zero_()
        self.tensor = torch.zeros(numel, dtype=dtype, device=device)
        return self.tensor


@torch.no_grad()
def gather_in_place(owner, params: list[nn.Parameter], buffer: GatherBuffer | None = None,
                    users: list[nn.Parameter] | None = None) -> str | None:
    """Gather the NOT_AVAILABLE ZeRO-3 ``params`` by one all-reduce into place; returns why
    not (and does nothing) when :func:`unsupported_reason` says DeepSpeed should.

    ``buffer`` keeps the memory for the next call; it is reused only when no parameter of
    ``users`` (every parameter that may still hold a view of it; default ``params``) does."""
    reason = unsupported_reason(owner, params)
    if reason is not None:
        return reason
    status = ds._zero_param_status()
    params = sorted(params, key=lambda p: p.ds_id)  # the same order on every rank
    group = params[0].ds_process_group
    rank = dist.get_rank(group)
    total = sum(int(p.ds_numel) for p in params)
    dtype, device = params[0].ds_tensor.dtype, params[0].ds_tensor.device
    if buffer is None:
        flat = torch.zeros(total, dtype=dtype, device=device)
    else:
        flat = buffer.take(total, dtype, device, params if users is None else users)
    offset = 0
    for p in params:
        if p.ds_status != status.NOT_AVAILABLE:
            raise RuntimeError(f"leafpass: gather of a parameter that is not partitioned: {p.ds_summary()}")
        p.ds_status = status.INFLIGHT
        chunk = int(p.ds_tensor.ds_numel)
        start = rank * chunk
        if start < p.ds_numel:  # this rank's real elements, without the padding
            real = min(chunk, int(p.ds_numel) - start)
            flat[offset + start:offset + start + real].copy_(p.ds_tensor.data.reshape(-1)[:real])
        offset += int(p.ds_numel)
    ds.count_gathered(owner, total)
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        p.data = flat[offset:offset + int(p.ds_numel)].view(p.ds_shape)
        p.ds_status = status.AVAILABLE
        offset += int(p.ds_numel)
    return None
