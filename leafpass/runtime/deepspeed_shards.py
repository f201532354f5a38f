"""DeepSpeed ZeRO-3's shard layout, as ``gather="module"``'s in-graph gathers read it.

Each rank keeps one contiguous slice of every partitioned parameter (``ds_tensor``);
:func:`shard` checks that a parameter's shard follows that layout (not quantized, not on
NVMe, no hpZ secondary copy) and returns it with its process group, so that one
``all_gather_into_tensor`` of the ranks' shards, cut at ``ds_numel``, gives the whole
parameter. :func:`persistent` says which parameters DeepSpeed never partitions.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["persistent", "shard"]


def shard(param: nn.Parameter) -> tuple[torch.Tensor, object]:
    """``(this rank's shard, partition process group)`` of a ZeRO-3 ``param``.

    partition_parameters.py (0.19.x), ``Init._partition_param``: the flat parameter is
    padded to ``partition_size * world`` (``_aligned_size``) and rank ``r`` of
    ``param.ds_process_group`` keeps elements ``[r * partition_size, (r + 1) *
    partition_size)`` in ``param.ds_tensor`` (``ds_tensor.ds_numel == partition_size``).
    So concatenating the ranks' shards in rank order and cutting at ``ds_numel`` gives the
    parameter. Quantized shards, hpZ secondary shards and NVMe-offloaded shards do not
    follow that layout in memory; they are refused with the way out.
    """
    t = getattr(param, "ds_tensor", None)
    why = None
    if t is None:
        why = "it has no ds_tensor (not partitioned by deepspeed.zero.Init)"
    elif t.dtype != param.dtype or hasattr(t, "ds_quant_scale"):
        why = "its shard is stored quantized (zero_quantized_weights / quantized_nontrainable_weights)"
    elif getattr(param, "ds_secondary_tensor", None) is not None:
        why = "it has an hpZ secondary shard (zero_hpz_partition_size > 1)"
    elif _on_nvme(t):
        why = "its shard lives on NVMe (offload_param to nvme)"
    elif t.device != param.device:
        why = f"its shard lives on {t.device} (offload_param) while the parameter is used on {param.device}"
    elif int(t.numel()) != int(getattr(t, "ds_numel", t.numel())):
        why = "its shard's size differs from ds_tensor.ds_numel"
    if why is not None:
        raise NotImplementedError(
            f"leafpass: gather='module' cannot gather ZeRO-3 parameter {param.ds_summary() if hasattr(param, 'ds_summary') else ''}: "
            f"{why}. Use options={{'gather': 'step'}} or {{'gather': 'hooks'}} for this model."
        )
    return t, param.ds_process_group


def _on_nvme(shard_tensor: torch.Tensor) -> bool:
    """partition_parameters.py (0.19.x) sets ``ds_tensor.final_location`` to
    ``OffloadDeviceEnum.nvme`` (a ``str`` enum) for an NVMe-offloaded shard, None otherwise;
    stage3.py (``_move_to_flat_buffer``) sets it to ``'not-nvme'``
    for the shards it moves into its own flat buffers (``offload_param`` to cpu, say)."""
    return getattr(shard_tensor, "final_location", None) == "nvme"


def persistent(param: nn.Parameter) -> bool:
    """DeepSpeed keeps ``param`` gathered at all times (``stage3_param_persistence_threshold``)."""
    return bool(getattr(param, "ds_persist", False))
