"""DeepSpeed ZeRO-3's gradient reduction, done with fewer copies: ``grad_path="leafpass"``.

ZeRO-3 reduces gradients in buckets. At the end of backward (or when a bucket fills up)
``__reduce_and_partition_ipg_grads`` calls ``__avg_scatter_grads``, whose
``reduce_scatter_coalesced`` cuts every gradient into world-size chunks, pads them, joins
the chunks with ``torch.cat`` into one interleaved buffer (chunk r of every gradient
together), divides it by the world size and reduce-scatters it. ``partition_grads`` then
copies this rank's chunks into the flat buffer the optimizer reads, and the optimizer's
step joins those partitions once more with ``_flatten_dense_tensors``.

On CPU most of that time is not communication. Measured on 2 gloo ranks, 14e6 fp32
elements (the medium Mixtral's gradients), one thread a rank:

=========================================  =======
``torch.cat`` of 100 pieces                37 ms
the same layout by 100 strided copies      6 ms
gloo ``reduce_scatter_tensor``             97 ms
gloo ``all_reduce`` of the whole buffer    59 ms
=========================================  =======

and on one rank, where there is nothing to communicate, the cat, a reduce-scatter that
copies, and the optimizer's flatten took about 85 ms of a 390 ms step.

:func:`install` replaces, on one optimizer instance, the two methods that pay for this
(instance attributes shadowing them; :func:`uninstall` takes them away again). The
reduction stays DeepSpeed's: the same buckets in the same order, the same division by the
world size before the sum, the same partitions in the same buffer, and everything around
it (hooks, leaf modules' zero gradients for experts that got no token, accumulation,
averaging world size, dtype conversions) untouched. What changes is how the bucket is
reduced:

* **one rank**: no collective and no copy. A one-rank reduction is the gradient itself
  (``x / 1 == x`` exactly), so each partition is a view of the gradient.
* **gloo**: DeepSpeed has already copied the gradients into its contiguous bucket. The
  bucket is divided and all-reduced in place; each rank reads its chunks of each gradient
  from it (DeepSpeed's own ``reduce_scatter: false`` path does the same).
* **other backends** (NCCL): the interleaved buffer is filled with one strided copy per
  gradient instead of the cat, then one ``reduce_scatter_tensor``.

With 2 ranks the sums are bitwise DeepSpeed's (a + b is b + a); with more, each element's
sum may be taken in another order (the collective's), as between any two collectives.

In the optimizer's step, DeepSpeed flattens this rank's gradient partitions, which are
already adjacent views of one flat buffer, into a new fp32 tensor (on one CPU rank most of
its 30 ms are page faults of that fresh 55 MB allocation). When their dtype is already the
fp32 partition's, leafpass hands the optimizer a view of the run instead. DeepSpeed's
``unscale_and_clip_grads`` then scales that gradient in place; leafpass copies it first
unless the scale is 1 for sure (no clipping, loss scale 1), so the partition buffer keeps
DeepSpeed's values either way (DeepSpeed reads it again for a parameter that gets no
gradient in the next step).

Configurations that read more of the reduction (CPU/NVMe optimizer offload, ZenFlow, Muon,
quantized all-to-all gradients, ``gradient_predivide_factor``) keep DeepSpeed's path;
:func:`unsupported_reason` says which applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["STRATEGIES", "install", "installed", "uninstall", "unsupported_reason", "usage"]

# deepspeed/runtime/zero/stage3.py (0.19.x): DeepSpeedZeroOptimizer_Stage3.__avg_scatter_grads,
# a double-underscore method, so its name is mangled; the class calls it as self.__avg_scatter_grads,
# which an instance attribute of the mangled name shadows.
_AVG_SCATTER = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
_MARK = "_leafpass_grad_path"


def unsupported_reason(optimizer) -> str | None:
    """Why ``optimizer`` keeps DeepSpeed's gradient path, or None when leafpass's applies."""
    if not hasattr(type(optimizer), _AVG_SCATTER):
        return f"{type(optimizer).__name__} is not DeepSpeed's ZeRO-3 optimizer"
    checks = (
        ("offload_optimizer", "optimizer offload (offload_optimizer) copies partitions as they are reduced"),
        ("zenflow", "ZenFlow selects channels from the reduced partitions"),
        ("use_muon", "Muon reduces full gradients"),
    )
    for attr, why in checks:
        if getattr(optimizer, attr, False):
            return why
    if getattr(optimizer, "all2all_process_group", None) is not None:
        return "quantized gradients (zero_quantized_gradients) reduce through all-to-all"
    if float(getattr(optimizer, "gradient_predivide_factor", 1.0)) != 1.0:
        return "gradient_predivide_factor is not 1.0"
    return None


def installed(optimizer) -> bool:
    return _MARK in vars(optimizer)


def usage(optimizer) -> dict[str, int]:
    """How often each way ran on ``optimizer`` since :func:`install`: the bucket reductions
    (``"one rank"``, ``"bucket"``, ``"interleave"``) and the optimizer steps that read the
    partitions in place (``"partition views"``) or through DeepSpeed's flatten (``"flatten"``).
    Empty when leafpass's path is not installed."""
    return dict(vars(optimizer).get(_MARK) or {})


def _count(optimizer, what: str) -> None:
    counts = vars(optimizer).get(_MARK)
    if counts is not None:
        counts[what] = counts.get(what, 0) + 1


STRATEGIES = ("auto", "bucket", "interleave")


def install(optimizer, strategy: str = "auto") -> str | None:
    """Put leafpass's gradient path on ``optimizer``; returns why not (and changes nothing)
    when its configuration keeps DeepSpeed's. Installing twice is a no-op.

    ``strategy`` picks the reduction of a bucket on more than one rank: ``"auto"`` (gloo:
    ``"bucket"``, else ``"interleave"``), ``"bucket"`` (all-reduce DeepSpeed's contiguous
    bucket in place, when the gradients are in it) or ``"interleave"`` (strided copies
    into an interleaved buffer, one reduce-scatter)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"leafpass grad path: strategy must be one of {STRATEGIES}, got {strategy!r}")
    reason = unsupported_reason(optimizer)
    if reason is not None or installed(optimizer):
        return reason
    prepare, unscale = optimizer._prepare_fp32_grad_for_sub_group, optimizer.unscale_and_clip_grads
    views: set[int] = set()  # sub-groups whose fp32 gradient is a view of the partition buffer
    setattr(optimizer, _AVG_SCATTER, lambda params, dtype: _avg_scatter(optimizer, params, dtype, strategy))
    optimizer._prepare_fp32_grad_for_sub_group = lambda i: _prepare_fp32_grad(optimizer, i, prepare, views)
    optimizer.unscale_and_clip_grads = lambda i, norm: _unscale_and_clip(optimizer, i, norm, unscale, views)
    setattr(optimizer, _MARK, {})
    return None


def uninstall(optimizer) -> None:
    """Give ``optimizer`` back DeepSpeed's gradient path."""
    if vars(optimizer).pop(_MARK, None) is None:
        return
    for name in (_AVG_SCATTER, "_prepare_fp32_grad_for_sub_group", "unscale_and_clip_grads"):
        vars(optimizer).pop(name, None)


# ------------------------------------------------------------------ the reduction


@torch.no_grad()
def _avg_scatter(optimizer, params: Sequence[torch.nn.Parameter], comm_dtype: torch.dtype,
                 strategy: str = "auto") -> list[torch.Tensor]:
    """``__avg_scatter_grads(params, comm_dtype)``: this rank's averaged partition of each
    parameter's gradient (its real elements only, as ``reduce_scatter_coalesced`` returns)."""
    optimizer._assert_same_partition_group(params)
    group = optimizer._get_param_partition_group(params[0])
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    grads = [p.grad for p in params]
    if comm_dtype != optimizer.dtype:
        grads = [g.to(comm_dtype) for g in grads]
    if world == 1:
        parts = [g.reshape(-1) for g in grads]
        _count(optimizer, "one rank")
    else:
        bucket = _bucket_region(optimizer, grads, comm_dtype)
        if strategy == "auto":
            strategy = "bucket" if dist.get_backend(group) == "gloo" else "interleave"
        if bucket is not None and strategy == "bucket":
            parts = _all_reduce_in_bucket(bucket, grads, world, rank, group)
            _count(optimizer, "bucket")
        else:
            parts = _reduce_scatter_interleaved(grads, world, rank, group)
            _count(optimizer, "interleave")
    averaging = optimizer._gradient_averaging_world_size(params, world)
    if averaging != world:
        scale = world / float(averaging)
        parts = [g.mul(scale) for g in parts]
    if comm_dtype != optimizer.gradient_accumulation_dtype:
        parts = [g.to(optimizer.gradient_accumulation_dtype) for g in parts]
    return parts


def _own_chunk(flat: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    chunk = math.ceil(flat.numel() / world)
    start = min(rank * chunk, flat.numel())
    return flat[start:min(start + chunk, flat.numel())]


def _bucket_region(optimizer, grads: Sequence[torch.Tensor], comm_dtype: torch.dtype) -> torch.Tensor | None:
    """The part of DeepSpeed's contiguous reduce bucket that holds exactly ``grads``, or None.

    stage3.py (0.19.x), ``__add_grad_to_ipg_bucket``: with ``contiguous_gradients`` each
    gradient is copied into ``ipg_buckets[comm_dtype].buffer`` at the bucket's running
    offset and ``param.grad`` becomes that view; ``bucket.elements`` counts what is in it.
    """
    bucket = getattr(optimizer, "ipg_buckets", {}).get(comm_dtype)
    buffer = getattr(bucket, "buffer", None)
    if buffer is None or not grads or bucket.elements > buffer.numel():
        return None  # (a gradient too large for the bucket is counted in it but not copied into it)
    region = buffer.narrow(0, 0, bucket.elements)
    start = buffer.storage_offset()
    spans = []
    for g in grads:
        if g.dtype != buffer.dtype or not g.is_contiguous() or g.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr():
            return None
        spans.append((g.storage_offset() - start, g.numel()))
    spans.sort()
    at = 0
    for offset, numel in spans:  # the gradients tile the region, no gap, no overlap
        if offset != at:
            return None
        at += numel
    return region if at == bucket.elements else None


def _all_reduce_in_bucket(region: torch.Tensor, grads, world: int, rank: int, group) -> list[torch.Tensor]:
    region.div_(world)  # DeepSpeed divides before the sum (reduce_scatter_coalesced's pre-divide)
    dist.all_reduce(region, group=group)
    return [_own_chunk(g.reshape(-1), world, rank) for g in grads]


def _reduce_scatter_interleaved(grads, world: int, rank: int, group) -> list[torch.Tensor]:
    chunks = [math.ceil(g.numel() / world) for g in grads]
    total = sum(chunks)
    buffer = torch.empty(world * total, dtype=grads[0].dtype, device=grads[0].device)
    rows = buffer.view(world, total)
    offset = 0
    for g, chunk in zip(grads, chunks):
        flat, numel = g.reshape(-1), g.numel()
        if chunk:
            full = numel // chunk
            if full:
                rows[:full, offset:offset + chunk].copy_(flat[:full * chunk].view(full, chunk))
            rest = numel - full * chunk
            if full < world:  # the last rows hold the short chunk, then padding
                if rest:
                    rows[full, offset:offset + rest].copy_(flat[full * chunk:])
                rows[full, offset + rest:offset + chunk].zero_()
                rows[full + 1:, offset:offset + chunk].zero_()
        offset += chunk
    buffer.div_(world)
    mine = torch.empty(total, dtype=buffer.dtype, device=buffer.device)
    dist.reduce_scatter_tensor(mine, buffer, group=group)
    parts, offset = [], 0
    for g, chunk in zip(grads, chunks):
        real = max(0, min(chunk, g.numel() - rank * chunk))
        parts.append(mine[offset:offset + real])
        offset += chunk
    return parts


# ------------------------------------------------------------------ the optimizer's step


def _prepare_fp32_grad(optimizer, sub_group: int, original: Callable, views: set[int]) -> None:
    """``_prepare_fp32_grad_for_sub_group``: when the gradient partitions are adjacent views of
    one buffer, the fp32 partition's ``.grad`` becomes that run itself (same dtype) or one
    conversion of it (a new tensor), where DeepSpeed flattens them into a new tensor first (a
    CPU step spends most of that in page faults of the fresh allocation). Anything else (a
    frozen parameter's zeros in the list, say): DeepSpeed's own method."""
    grads = optimizer.averaged_gradients[sub_group]
    flat = optimizer.fp32_partitioned_groups_flat[sub_group]
    run = None if grads is None else _adjacent_run(grads)
    views.discard(sub_group)
    if run is None or run.device != flat.device or run.numel() != flat.numel():
        _count(optimizer, "flatten")
        return original(sub_group)
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_synchronized_device():  # as DeepSpeed does for what it flattens
        for g in grads:
            g.record_stream(get_accelerator().current_stream())
    if run.dtype == flat.dtype:
        flat.grad = run
        views.add(sub_group)
        _count(optimizer, "partition views")
    else:  # bf16/fp16 partitions: one conversion into a new fp32 tensor, no flatten before it
        flat.grad = run.to(flat.dtype)
        _count(optimizer, "partition conversion")
    optimizer.averaged_gradients[sub_group] = None


def _unscale_and_clip(optimizer, sub_group: int, total_norm, original: Callable, views: set[int]) -> None:
    """``unscale_and_clip_grads``, which scales the fp32 gradient in place. On a view of the
    partition buffer that would write into the buffer, which DeepSpeed reads again for a
    parameter that gets no gradient in the next step; so the view is copied first, unless
    the scale is 1 for sure (no clipping, loss scale 1: DeepSpeed multiplies by 1.0, which
    changes no value)."""
    if sub_group in views:
        views.discard(sub_group)
        if float(getattr(optimizer, "clip_grad", 0.0)) <= 0.0 and float(optimizer.loss_scale) == 1.0:
            return None
        flat = optimizer.fp32_partitioned_groups_flat[sub_group]
        flat.grad = flat.grad.clone()
    return original(sub_group, total_norm)


def _adjacent_run(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One 1-D view over ``tensors`` when they are contiguous views lying one after the other
    in one storage (the optimizer's gradient partitions: views of one flat buffer, in
    order), else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    at = first.storage_offset()
    for t in tensors:
        if (not isinstance(t, torch.Tensor) or t.dtype != first.dtype or t.device != first.device
                or not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.storage_offset() != at):
            return None
        at += t.numel()
    return torch.as_strided(first, (at - first.storage_offset(),), (1,), first.storage_offset())
