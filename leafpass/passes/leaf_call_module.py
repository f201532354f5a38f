"""Turn each captured leaf call into a ``call_module`` of the leaf.

Dynamo records a flagged leaf (see ``leafpass.capture``) as one opaque
``invoke_leaf_function`` node whose flat inputs are the leaf's parameters,
buffers and call arguments, and whose users index its flat outputs::

    before                                          after
    ------                                          -----
    real_fn = get_attr[real_fn]                     moe1 = call_module[moe1](linear)
    fake_fn = get_attr[fake_fn]                     getitem = moe1            # one tensor out
    input_spec = get_attr[input_spec]
    invoke = invoke_leaf_function(real_fn, fake_fn, input_spec, '', 0,
                                  moe1.router.weight, ..., linear)
    getitem = invoke[0]

(That is torch 2.13's node; torch 2.11's is ``invoke_leaf_function(real_fn_spec,
fake_fn_spec, 0, moe1.router.weight, ..., linear)``. The pass reads either through
``dynamo_internals.leaf_node_parts`` and never indexes ``node.args`` itself.)

The ``call_module`` targets the leaf by its qualified name and calls the real
module, so its hooks run and its parameters are the real ``nn.Parameter`` objects.
Structured outputs (``(tensor, dict)``) are unpacked with ``getitem`` chains in
place of the flat indexing. Each new node carries a :class:`LeafCall` in
``meta["leafpass_leaf"]`` with the leaf's parameter nodes, for the next pass, and
keeps the ``CheckpointRegion`` of a leaf that ``inline_checkpoint`` took out of a
checkpoint region (``meta["leafpass_checkpoint"]``).

Requires: ``checkpoint_regions_inlined`` (a leaf inside a checkpoint body is not seen here).

Provides: ``leaf_call_modules`` (every leafpass leaf is a ``call_module``; no
leafpass ``invoke_leaf_function`` remains).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..dynamo_internals import invoke_leaf_function_op, leaf_module_state_type, leaf_node_parts, module_by_index
from ..leaf_arguments import BuildArgument, ReadObjectStates, has_object_state, is_object_state
from ..leaf_call import META_KEY, LeafCall, qualname_from_source
from ..graph_nodes import ARGUMENT_META  # its home: the graph vocabulary (lowering reads it)
from ..names import qualname_of

__all__ = ["leaf_call_module_pass", "is_leafpass_leaf_node", "leaf_module_of"]


def is_leafpass_leaf_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not invoke_leaf_function_op():
        return False
    from ..capture import run_leaf

    return leaf_node_parts(gm, node).fn is getattr(run_leaf, "_torchdynamo_leaf_real_fn", run_leaf)


def _leaf_module_and_name(node: torch.fx.Node, state):
    module = module_by_index(state.nn_module_index)
    known = qualname_of(module)
    if known:
        return module, known
    stack = node.meta.get("nn_module_stack") or {}
    path = None
    for key, (source_name, _cls) in stack.items():
        if key == str(id(module)):
            path = source_name
    if path is None and stack:
        path = list(stack.values())[-1][0]
    name = qualname_from_source(path) if path else ""
    if not name or name.startswith("___"):  # a stack slot of a resumed frame, not a path
        name = type(module).__name__
    return module, name


def _emit_unflatten(graph: torch.fx.Graph, root: torch.fx.Node, spec) -> list[torch.fx.Node]:
    """Nodes that pick each flat output out of ``root`` following ``spec``."""
    n = spec.num_leaves
    skeleton = pytree.tree_unflatten(list(range(n)), spec)
    paths, _ = pytree.tree_flatten_with_path(skeleton)
    cache: dict[tuple, torch.fx.Node] = {(): root}
    flat: list[torch.fx.Node] = []
    for path, _ in paths:
        for depth in range(1, len(path) + 1):
            prefix = tuple(path[:depth])
            if prefix in cache:
                continue
            parent = cache[prefix[:-1]]
            entry = prefix[-1]
            if isinstance(entry, pytree.SequenceKey):
                key = entry.idx
            elif isinstance(entry, pytree.MappingKey):
                key = entry.key
            elif isinstance(entry, pytree.GetAttrKey):
                cache[prefix] = graph.call_function(getattr, (parent, entry.name))
                continue
            else:
                raise NotImplementedError(f"leafpass cannot unpack leaf output path entry {entry!r}")
            cache[prefix] = graph.call_function(operator.getitem, (parent, key))
        flat.append(cache[tuple(path)])
    return flat


class _BuiltArguments:
    """The ``call_module``'s ``(args, kwargs)``, and the build nodes of its object arguments."""

    def __init__(self) -> None:
        self.call: tuple[tuple, dict] = ((), {})
        self.objects: list[tuple[torch.fx.Node, object]] = []  # (build node, its template)


_WRITABLE_LEAVES = (torch.fx.Node, type(None), bool, int, float, str, torch.dtype, torch.device, slice,
                    type(Ellipsis))


def _writable(value) -> bool:
    """True when FX can write ``value`` as code: nodes, plain constants, tuples, lists, dicts
    of them (not an enum or a ``ModelOutput``: FX writes their ``repr``, or a plain dict)."""
    if type(value) in (tuple, list, dict) or (isinstance(value, tuple) and hasattr(value, "_fields")):
        children = value.values() if isinstance(value, dict) else value
        return all(_writable(v) for v in children)
    return isinstance(value, _WRITABLE_LEAVES)


def _build_arguments(graph: torch.fx.Graph, leaf: str, call_args, call_kwargs) -> _BuiltArguments:
    """Pass each argument FX cannot write (a ``ModelOutput``, an object passed by state,
    see ``leafpass.leaf_arguments``) through a node that builds it from its flat values."""
    built = _BuiltArguments()

    def build(value, label: str):
        if _writable(value):
            return value
        flat, spec = pytree.tree_flatten(value)
        kind = type(value).__name__ if not is_object_state(value) else value.cls.__name__
        node = graph.call_function(BuildArgument(spec, kind), tuple(flat))
        node.meta[ARGUMENT_META] = label
        if has_object_state(value):
            built.objects.append((node, value))
        return node

    args = tuple(build(v, f"args[{i}]") for i, v in enumerate(call_args))
    kwargs = {k: build(v, k) for k, v in dict(call_kwargs).items()}
    built.call = (args, kwargs)
    return built


def _emit_read_states(graph: torch.fx.Graph, leaf: str, built: _BuiltArguments, states_spec) -> list[torch.fx.Node]:
    """Nodes that read the new states of the leaf's object arguments after its call, one
    flat node per tensor, in the order of the states' spec."""
    flat: list[torch.fx.Node] = []
    first = 0
    for node, template in built.objects:
        count = sum(1 for s in pytree.tree_leaves(template, is_leaf=is_object_state) if is_object_state(s))
        expected = [states_spec.child(i) for i in range(first, first + count)]
        first += count
        kind = node.target.__name__.removeprefix("build_")
        read = graph.call_function(ReadObjectStates(template, expected, leaf, kind), (node,))
        read.meta[ARGUMENT_META] = node.meta[ARGUMENT_META]
        for j in range(sum(spec.num_leaves for spec in expected)):
            item = graph.call_function(operator.getitem, (read, j))
            item.meta[ARGUMENT_META] = node.meta[ARGUMENT_META]
            flat.append(item)
    return flat


def _leaf_call_parts(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """``(LeafModuleState, call args, call kwargs)`` of a leafpass leaf node."""
    state, call_args, call_kwargs = leaf_node_parts(gm, node).args
    if not isinstance(state, leaf_module_state_type()):
        raise AssertionError(f"leafpass: unexpected leaf state {type(state).__name__}")
    return state, call_args, call_kwargs


def leaf_module_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.nn.Module:
    """The module a leafpass leaf node calls (valid while compiling)."""
    state, _args, _kwargs = _leaf_call_parts(gm, node)
    return module_by_index(state.nn_module_index)


def leaf_call_module_pass(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite every leafpass ``invoke_leaf_function`` node into ``call_module``."""
    from ..graph_nodes import CHECKPOINT_META

    graph = gm.graph
    calls_per_leaf: dict[str, int] = {}
    for node in list(graph.nodes):
        if not is_leafpass_leaf_node(gm, node):
            continue
        parts = leaf_node_parts(gm, node)
        out_spec = parts.out_spec
        state, call_args, call_kwargs = _leaf_call_parts(gm, node)
        module, name = _leaf_module_and_name(node, state)
        if out_spec is None:
            raise AssertionError(f"leafpass: no output structure was captured for leaf {name!r}")

        existing = _get_submodule_or_none(gm, name)
        if existing is None:
            gm.add_submodule(name, module)
        elif existing is not module:
            raise RuntimeError(
                f"leafpass: two different modules are both called {name!r} in one graph; "
                f"give them distinct attribute names"
            )
        call_no = calls_per_leaf.get(name, 0)
        calls_per_leaf[name] = call_no + 1
        params = list(dict.fromkeys(state.named_parameters.values()))

        with graph.inserting_before(node):
            built = _build_arguments(graph, name, call_args, call_kwargs)
            call = graph.call_module(name, *built.call)
            call.meta[META_KEY] = LeafCall(name=name, module=module, params=params)
            call.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            if CHECKPOINT_META in node.meta:  # a leaf from a checkpoint region (inline_checkpoint)
                call.meta[CHECKPOINT_META] = node.meta[CHECKPOINT_META]
            if built.objects:  # the leaf returned (output, new states of its object arguments)
                flat_outs = _emit_unflatten(graph, call, out_spec.child(0))
                flat_outs += _emit_read_states(graph, name, built, out_spec.child(1))
            else:
                flat_outs = _emit_unflatten(graph, call, out_spec)

        example = node.meta.get("example_value")
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                idx = parts.out_at[user.args[1]]
                user.replace_all_uses_with(flat_outs[idx])
                if "example_value" in user.meta:
                    flat_outs[idx].meta.setdefault("example_value", user.meta["example_value"])
                graph.erase_node(user)
            else:
                raise AssertionError(f"leafpass: unexpected use {user.format_node()} of leaf {name!r}")
        if isinstance(example, (tuple, list)) and len(parts.out_at) == len(example):
            for idx, ev in zip(parts.out_at, example):
                flat_outs[idx].meta.setdefault("example_value", ev)
        attrs = parts.attr_nodes
        graph.erase_node(node)
        for attr in attrs:
            if not attr.users:
                graph.erase_node(attr)
                if hasattr(gm, attr.target):
                    delattr(gm, attr.target)
    graph.lint()
    gm.recompile()
    return gm


def _get_submodule_or_none(gm: torch.fx.GraphModule, name: str):
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None
