"""What the graphs show: the flagged leaves and their opaque calls, each graph's ops, leaf
calls and ``prefetch_all``s, named as in the model; and the sizes a report gives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import leafpass

from .explain_modules import ModuleIndex

__all__ = ["describe_inputs", "graph_details", "leaves_of", "param_stats", "qualname"]


def param_stats(module: nn.Module) -> tuple[int, int, int]:
    """(parameter tensors, elements, bytes) of ``module``'s subtree, each parameter once.

    Under ZeRO-3 a partitioned parameter's full size is ``ds_numel``."""
    tensors = elements = nbytes = 0
    for p in module.parameters():
        numel = int(getattr(p, "ds_numel", p.numel()))
        tensors += 1
        elements += numel
        nbytes += numel * p.element_size()
    return tensors, elements, nbytes


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_inputs(inputs: Any) -> list[dict[str, Any]]:
    def one(name: str, value: Any) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            return {"name": name, "type": "tensor", "dtype": str(value.dtype).replace("torch.", ""),
                    "shape": list(value.shape), "device": str(value.device)}
        return {"name": name, "type": type(value).__name__}

    if isinstance(inputs, Mapping):
        return [one(str(k), v) for k, v in inputs.items()]
    return [one(f"args[{i}]", v) for i, v in enumerate(inputs)]


def leaves_of(index: ModuleIndex, graphs: list[torch.fx.GraphModule]) -> list[dict[str, Any]]:
    calls: dict[str, int] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                name = _model_name_of_submodule(index, gm, node.target)
                calls[name] = calls.get(name, 0) + 1
    defaults = set(leafpass.DEFAULT_LEAF_MODULE_CLASSES)
    flagged = leafpass.get_z3_leaf_modules(index.model)
    names = [index.name_of[id(m)] for m in flagged if id(m) in index.name_of]
    leaves = []
    for name in names:
        module = index.by_name[name]
        tensors, elements, nbytes = param_stats(module)
        outer = [o for o in names if o != name and index.is_under(name, o)]
        entry = {
            "name": name,
            "class": type(module).__name__,
            "qualified_class": qualname(type(module)),
            "params": tensors,
            "numel": elements,
            "bytes": nbytes,
            "flagged_by": "deepspeed default class" if qualname(type(module)) in defaults else "flag attribute",
            "opaque_calls": calls.get(name, 0),
        }
        if outer:
            entry["inside_leaf"] = outer[0]
        leaves.append(entry)
    return leaves


def _model_name_of_submodule(index: ModuleIndex, gm: torch.fx.GraphModule, target: str) -> str:
    try:
        module = gm.get_submodule(target)
    except AttributeError:
        return target
    return index.name_of.get(id(module), target)


_is_prefetch = leafpass.is_prefetch_node  # the graph vocabulary's predicate (leafpass.graph_nodes)


def _prefetches_of(index: ModuleIndex, gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """``{leaf, params}`` of each ``prefetch_all`` of ``gm``, in graph order; the leaf named as in the model."""
    out = []
    for node in gm.graph.nodes:
        if not _is_prefetch(node):
            continue
        # prefetch_all(params, leaf, leaf_id) sits right before the leaf's call_module
        params, leaf = node.args[0], node.args[1]
        nxt = node.next
        name = _model_name_of_submodule(index, gm, nxt.target) if nxt.op == "call_module" else str(leaf)
        out.append({"leaf": name, "params": len(params)})
    return out


def graph_details(index: ModuleIndex, graphs, with_text: bool) -> list[dict[str, Any]]:
    details = []
    for i, gm in enumerate(graphs):
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        entry = {
            "index": i,
            "ops": len([n for n in nodes if not _is_prefetch(n)]),
            "leaf_calls": [_model_name_of_submodule(index, gm, n.target) for n in nodes if n.op == "call_module"],
            "prefetches": _prefetches_of(index, gm),
        }
        if with_text:
            entry["text"] = leafpass.format_graph(gm)
        details.append(entry)
    return details
