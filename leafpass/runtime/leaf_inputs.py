"""Make DeepSpeed's per-leaf gradient reduction fire after the leaf's backward.

DeepSpeed ZeRO-3 reduces the gradients of a leaf's parameters in a *full backward hook*
on the leaf (``register_full_backward_hook`` in ``stage3.py``): it zero-fills the
parameters that got no gradient (experts no token picked) and reduce-scatters them all.
PyTorch fires a full backward hook when the gradients of the module's *inputs* are
ready, and when no input requires a gradient, as soon as the gradients of its *outputs*
are: before autograd has reached the leaf's parameters. That happens whenever
everything before a leaf is frozen (LoRA-style fine-tuning with frozen embeddings,
attention and norms, trainable experts): DeepSpeed then zero-fills and reduces too
early and the parameters' real gradients arrive after their partition was released
(``The size of tensor a (0) must match the size of tensor b (...)`` in
``AccumulateGrad``), in eager ZeRO-3 as well.

Before calling such a leaf, leafpass hands it a copy of its first floating-point input
that requires a gradient (``x.detach().requires_grad_()``, the same idea as transformers'
``enable_input_require_grads``): the hook then fires after the leaf's backward, as
DeepSpeed expects. The gradient of that copy is computed and dropped; nothing upstream
changes, since the original input needed no gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["leaf_input_for_deepspeed_backward_hook"]


def _trains_zero3_parameters(leaves: Iterable[nn.Module]) -> bool:
    return any(p.requires_grad and hasattr(p, "ds_id") for leaf in leaves for p in leaf.parameters())


def leaf_input_for_deepspeed_backward_hook(leaves: Iterable[nn.Module], args: tuple) -> tuple:
    """``args`` with the first floating-point activation made to require a gradient, when
    the leaves train ZeRO-3 parameters and no activation in ``args`` requires one; else
    ``args`` unchanged. Parameters among ``args`` do not count as activations."""
    if not torch.is_grad_enabled():
        return args
    first = None
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor) or isinstance(a, nn.Parameter):
            continue
        if a.requires_grad:
            return args
        if first is None and a.is_floating_point():
            first = i
    if first is None or not _trains_zero3_parameters(leaves):
        return args
    args = list(args)
    args[first] = args[first].detach().requires_grad_()
    return tuple(args)
