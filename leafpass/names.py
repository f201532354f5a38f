"""Qualified names of leaf modules, as ``model.named_modules()`` spells them.

Inside a graph Dynamo knows a module by the path it was reached through, which is
relative to the frame being compiled: ``moe1`` when the frame is the model's
forward, but a stack slot such as ``___stack0`` in a frame resumed after a graph
break (as under DeepSpeed ZeRO-3, whose module hooks break the graph). Snapshots,
``explain`` and the cross-rank check need the name in the whole model, so leafpass
asks, in order:

1. the runtime that owns the leaf's parameters (DeepSpeed knows the model it wraps);
2. names remembered when leafpass's flag API was given the model;
3. the path Dynamo recorded, when it is a real attribute path.
"""

from __future__ import annotations

import weakref

from torch import nn

__all__ = ["remember_names", "qualname_of"]

_names: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def remember_names(model: nn.Module, modules) -> None:
    """Remember the qualified names in ``model`` of ``modules`` (flagged by leafpass's API)."""
    wanted = {id(m) for m in modules}
    if not wanted:
        return
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in wanted and module not in _names:
            _names[module] = name


def qualname_of(module: nn.Module) -> str | None:
    """The qualified name of ``module`` in its whole model, when some owner knows it."""
    from .runtime import runtime_for

    params = list(module.parameters())
    name_of = getattr(runtime_for(params), "qualname", None) if params else None
    if name_of is not None:
        name = name_of(module)
        if name:
            return name
    return _names.get(module)
