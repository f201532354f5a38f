"""``LeafCall``: what leafpass knows about one call of a leaf, kept in ``node.meta``."""

from __future__ import annotations

import dataclasses
import re

import torch.fx
from torch import nn

META_KEY = "leafpass_leaf"

__all__ = ["LeafCall", "META_KEY", "leaf_call_of", "qualname_from_source"]


@dataclasses.dataclass
class LeafCall:
    """One call of a flagged leaf in a graph.

    ``name`` is the leaf's qualified name (``model.named_modules()`` spelling),
    ``module`` the module itself, ``params`` the graph nodes of every parameter of
    its subtree, each once, in ``named_parameters()`` order.
    """

    name: str
    module: nn.Module
    params: list[torch.fx.Node]


def leaf_call_of(node: torch.fx.Node) -> LeafCall | None:
    return node.meta.get(META_KEY)


_MODULES_KEY = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")
_INDEX = re.compile(r"\[(\d+)\]")
_KEY = re.compile(r"\['([^']*)'\]")


_DICT_GETITEM = re.compile(r"dict\.__getitem__\((.*), '([^']*)'\)$")
_DUNDER_DICT = re.compile(r"\.__dict__\['(_modules|_parameters|_buffers)'\]")


def plain_source(name: str) -> str:
    """Undo the spellings Dynamo uses for dict subclasses it reads through ``dict.__getitem__``
    (DeepSpeed's ``ZeROOrderedDict`` of parameters):
    ``dict.__getitem__(L['self']._modules['l1'].__dict__['_parameters'], 'weight')`` ->
    ``L['self']._modules['l1']._parameters['weight']``."""
    for _ in range(32):
        match = _DICT_GETITEM.search(name)
        if match is None:
            break
        inner, key = match.groups()
        name = name[: match.start()] + f"{inner}['{key}']" + name[match.end():]
    return _DUNDER_DICT.sub(r".\1", name)


def qualname_from_source(source_name: str) -> str:
    """Turn a Dynamo source name into a qualified name.

    ``L['self']._modules['blocks']._modules['0']._parameters['w']`` -> ``blocks.0.w``,
    ``L['self'].moe1`` -> ``moe1``, ``L['x']`` -> ``x``, ``L['net'].moe`` -> ``net.moe``.
    The roots Dynamo gives a compiled module (``self``, ``fn``, ``mod``, ``model``) are dropped.
    """
    name = plain_source(source_name)
    name = re.sub(r"^[LG]\['(?:self|fn|mod|model)'\]", "", name)
    name = re.sub(r"^[LG]\['([^']*)'\]", r"\1", name)
    name = _MODULES_KEY.sub(r".\1", name)
    name = _INDEX.sub(r".\1", name)
    name = _KEY.sub(r".\1", name)
    return name.lstrip(".")
