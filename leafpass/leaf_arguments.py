"""Leaf calls whose arguments are Python objects, not only tensors.

Dynamo hands a leaf's call arguments to the opaque ``invoke_leaf_function`` as a
pytree: tensors become graph inputs, constants (``None``, ints, floats, strings,
enums, frozen dataclasses) are folded in and guarded. Any other object (a mutable
dataclass, a transformers ``DynamicCache``) is a pytree leaf Dynamo cannot put in a
graph, and tracing stops with ``NotImplementedError: UserDefinedObjectVariable``.

leafpass passes such an object *by state*, traced as ordinary Python in the capture
wrapper::

    traced (Dynamo)                         the leaf's call (opaque, eager)
    ---------------                         -------------------------------
    state = state_of(cache)                 copy = build(state)       # a fresh object
    out, new = run_leaf(layer, ..., state)  out = layer(..., copy)    # updates the copy
    apply_state(cache, new)                 new = state_of(copy)
    return out                              return out, new

A state (:class:`ObjectState`) is the object's class, its constant attributes and
its other attributes (tensors, containers, nested objects such as the cache's
layers) as pytree children, so the tensors travel through the graph and the
constants are compared when the leaf runs. The leaf mutates its own copy; the
changes come back as the call's extra outputs and Dynamo applies them to the real
object (``apply_state``: attribute writes Dynamo records as side effects, also on
a cache created inside the compiled frame). The graph after leafpass's passes::

    t3 = build_DynamicCache(t1, t2)            # the copy the leaf updates
    prefetch_all model.layers.0 (9 params)
    t4 = model.layers.0(t0, past_key_values=t3, ...)
    t5 = read_DynamicCache(t3)                 # its tensors after the call
    t6 = getitem(t5, 0)

Objects whose attributes are not plain data (a module, a function, a lock) cannot
be copied this way: :class:`LeafArgumentError` names the leaf, the argument and the
fix. An object reachable twice from one call is copied twice (aliasing is not kept).
"""

from __future__ import annotations

import dataclasses
import enum

import torch
import torch.utils._pytree as pytree
from torch import nn

from .dynamo_internals import FROZEN_DATACLASS_CONSTANTS

__all__ = [
    "LeafArgumentError",
    "ObjectState",
    "BuildArgument",
    "ReadObjectStates",
    "states_of_objects",
    "apply_states",
    "build_tree",
    "built_objects",
    "call_with_objects",
    "has_object_state",
    "is_object_state",
]


class LeafArgumentError(TypeError):
    """A leaf's call received an argument leafpass cannot pass through an opaque call."""


_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes, enum.Enum, torch.dtype, torch.device, type)
# Numbers inside an object are children, not constants: one that changes between calls is
# traced as a symbol (Dynamo's automatic dynamic), and Dynamo cannot tell a symbol from an int
# in an isinstance check, so every number goes the way a symbol must: through the graph.
_NUMBER_TYPES = (int, float, torch.SymInt, torch.SymFloat)


class ObjectState:
    """The state of one Python object passed to a leaf: class, constants, children.

    ``consts`` holds ``(name, value)`` of attributes that are constants (compared,
    never traced); ``children`` holds ``(name, value)`` of the others: tensors,
    containers and nested :class:`ObjectState` (pytree children).
    """

    __slots__ = ("cls", "consts", "children")

    def __init__(self, cls: type, consts: tuple, children: tuple) -> None:
        self.cls = cls
        self.consts = consts
        self.children = children

    def __repr__(self) -> str:
        return f"ObjectState({self.cls.__name__})"


def _flatten(state: ObjectState):
    return [value for _, value in state.children], (state.cls, state.consts, tuple(n for n, _ in state.children))


def _unflatten(values, context) -> ObjectState:
    cls, consts, names = context
    return ObjectState(cls, consts, tuple(zip(names, values)))


pytree.register_pytree_node(ObjectState, _flatten, _unflatten)


def is_object_state(value) -> bool:
    return isinstance(value, ObjectState)


def _is_frozen_dataclass(value) -> bool:
    if isinstance(value, _CONSTANT_TYPES):  # not asked of None & co: torch 2.11's Dynamo breaks
        return False  # the graph on hasattr(NoneType, "__dataclass_fields__")
    return dataclasses.is_dataclass(value) and not isinstance(value, type) and value.__dataclass_params__.frozen


def _is_constant(value) -> bool:
    if isinstance(value, _CONSTANT_TYPES):
        return True
    # torch 2.11 cannot fold a frozen dataclass into a leaf call: it goes by state there
    return FROZEN_DATACLASS_CONSTANTS and _is_frozen_dataclass(value)


def _is_passed_by_state(value) -> bool:
    """A pytree leaf Dynamo cannot put in a graph but leafpass can copy: a plain object."""
    if isinstance(value, (torch.Tensor, nn.Module)) or _is_constant(value):
        return False
    return hasattr(value, "__dict__") and not callable(value)


def _state_of_attribute(value, where: str, leaf: str):
    if isinstance(value, (torch.Tensor, *_NUMBER_TYPES)) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_state_of_attribute(v, f"{where}[{i}]", leaf) for i, v in enumerate(value))
    if type(value) is dict:
        return {k: _state_of_attribute(v, f"{where}[{k!r}]", leaf) for k, v in value.items()}
    if _is_passed_by_state(value) or _is_frozen_dataclass(value):
        return _state_of_object(value, where, leaf)
    raise LeafArgumentError(
        f"leafpass: leaf {leaf} is called with {where} = {type(value).__name__}, which cannot go "
        f"through the leaf's opaque call (leafpass copies objects attribute by attribute: tensors, "
        f"constants, lists/tuples/dicts and nested plain objects). Pass it differently (as tensors or "
        f"constants), or unflag the leaf (module._z3_leaf = False)."
    )


def _state_of_object(obj, where: str, leaf: str) -> ObjectState:
    consts, children = [], []
    for name, value in vars(obj).items():
        # a frozen dataclass inside an object goes by state too: Dynamo cannot hold one in the
        # TreeSpec of the call's inputs ("can't reconstruct arbitrary frozen dataclass instances")
        if _is_constant(value) and not _is_frozen_dataclass(value) and not (
            isinstance(value, _NUMBER_TYPES) and not isinstance(value, bool)
        ):
            consts.append((name, value))
        else:
            children.append((name, _state_of_attribute(value, f"{where}.{name}", leaf)))
    return ObjectState(type(obj), tuple(consts), tuple(children))


def states_of_objects(leaf: str, args: tuple, kwargs: dict):
    """``(args, kwargs, objects)`` with every object passed by state replaced by its
    :class:`ObjectState`; ``objects`` lists the originals in pytree order. Traced by Dynamo."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    objects = []
    replaced = []
    for i, value in enumerate(flat):
        if _is_passed_by_state(value):
            objects.append(value)
            replaced.append(_state_of_object(value, _argument_name(spec, i), leaf))
        else:
            replaced.append(value)
    if not objects:
        return args, kwargs, objects
    new_args, new_kwargs = pytree.tree_unflatten(replaced, spec)
    return new_args, new_kwargs, objects


def _argument_name(spec, index: int) -> str:
    """``past_key_values`` or ``args[1]`` for the flat leaf at ``index`` of ``(args, kwargs)``."""
    skeleton = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    path = pytree.tree_flatten_with_path(skeleton)[0][index][0]
    if path[0].idx == 0:
        return "args" + "".join(str(p) for p in path[1:])
    return str(path[1].key) + "".join(str(p) for p in path[2:])


# ----------------------------------------------------------------- traced: write back


def apply_states(objects: list, states) -> None:
    """Write each new state onto its original object, in place. Traced by Dynamo."""
    for obj, state in zip(objects, states):
        if not _is_frozen_dataclass(obj):  # passed by state on torch 2.11; never changes
            _apply(obj, state)


def _apply(obj, state: ObjectState) -> None:
    before = set(vars(obj).keys())  # .keys(): what torch 2.11's Dynamo can trace (dynamo_internals)
    after = set()
    current = vars(obj)
    for name, value in state.consts:
        if name not in current or current[name] is not value and current[name] != value:
            setattr(obj, name, value)  # only what changed: a class or dtype constant has no source
        after.add(name)
    for name, value in state.children:
        setattr(obj, name, _merged(getattr(obj, name, None), value))
        after.add(name)
    for name in before - after:
        delattr(obj, name)


def _merged(current, value):
    if isinstance(value, ObjectState):
        if type(current) is value.cls:
            if not _is_frozen_dataclass(current):  # by state on torch 2.11; never changes
                _apply(current, value)
            return current
        # a new object (a cache layer the leaf appended): its class is read from a global
        # table so that Dynamo can name it when it rebuilds the object after the graph
        cls = _classes_made_by_leaves[value.cls.__module__ + "." + value.cls.__qualname__]
        fresh = object.__new__(cls)
        _apply(fresh, value)
        return fresh
    if isinstance(value, list):
        old = current if isinstance(current, list) else []
        merged = [_merged(old[i] if i < len(old) else None, v) for i, v in enumerate(value)]
        if isinstance(current, list):
            current[:] = merged  # keep the list's identity (others may hold it)
            return current
        return merged
    if isinstance(value, tuple):
        old = current if isinstance(current, tuple) and len(current) == len(value) else (None,) * len(value)
        return tuple(_merged(c, v) for c, v in zip(old, value))
    if isinstance(value, dict):
        old = current if isinstance(current, dict) else {}
        return {k: _merged(old.get(k), v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------- eager: the leaf's side


def _build_object(state: ObjectState):
    obj = object.__new__(state.cls)
    obj.__dict__.update(state.consts)
    for name, child in state.children:
        obj.__dict__[name] = build_tree(child)
    return obj


def build_tree(value):
    """``value`` with every :class:`ObjectState` in it built into a fresh object."""
    return pytree.tree_map(lambda v: _build_object(v) if isinstance(v, ObjectState) else v, value,
                           is_leaf=is_object_state)


def has_object_state(value) -> bool:
    return any(isinstance(s, ObjectState) for s in pytree.tree_leaves(value, is_leaf=is_object_state))


def built_objects(built, template) -> list:
    """The objects in ``built`` (a value built from ``template``) at its ObjectState positions."""
    states = pytree.tree_leaves(template, is_leaf=is_object_state)
    values = pytree.tree_leaves(built)
    return [v for v, s in zip(values, states) if isinstance(s, ObjectState)]


#: ``module.qualname -> class`` of every object a leaf's call left in its arguments (filled
#: eagerly, while Dynamo runs the leaf on fake inputs; read by ``_merged`` when traced)
_classes_made_by_leaves: dict[str, type] = {}


def state_after_call(obj, leaf: str) -> ObjectState:
    state = _state_of_object(obj, type(obj).__name__, leaf)
    _remember_classes(state)
    return state


def _remember_classes(state: ObjectState) -> None:
    _classes_made_by_leaves[state.cls.__module__ + "." + state.cls.__qualname__] = state.cls
    for value in pytree.tree_leaves([v for _, v in state.children], is_leaf=is_object_state):
        if isinstance(value, ObjectState):
            _remember_classes(value)


def call_with_objects(call, leaf: str, args: tuple, kwargs: dict):
    """``call(*args, **kwargs)`` with each ObjectState built into a fresh object; returns
    ``(output, new states)`` when there were any, else the output alone."""
    template = (args, kwargs)
    if not has_object_state(template):
        return call(*args, **kwargs)
    built_args, built_kwargs = build_tree(template)
    objects = built_objects((built_args, built_kwargs), template)
    out = call(*built_args, **built_kwargs)
    return out, tuple(state_after_call(o, leaf) for o in objects)


# ----------------------------------------------------------------- graph node targets


class BuildArgument:
    """Graph target: the leaf's argument rebuilt from its flat values (``spec``): pytree
    containers FX cannot write in code (a ``ModelOutput``, a registered dataclass) and
    fresh copies of objects passed by state."""

    def __init__(self, spec: pytree.TreeSpec, label: str) -> None:
        self.spec = spec
        self.__name__ = f"build_{label}"
        self.__qualname__ = self.__name__
        self.__module__ = __name__

    def __call__(self, *flat):
        return build_tree(pytree.tree_unflatten(list(flat), self.spec))


class ReadObjectStates:
    """Graph target: the flat tensors of the objects a leaf updated, read after its call,
    checked against the structure compiled for (``expected``: the states' TreeSpec)."""

    def __init__(self, template, expected: list, leaf: str, label: str) -> None:
        self.template = template
        self.expected = expected
        self.leaf = leaf
        self.__name__ = f"read_{label}"
        self.__qualname__ = self.__name__
        self.__module__ = __name__

        self.layouts = [pytree.tree_unflatten(list(range(spec.num_leaves)), spec) for spec in expected]

    def __call__(self, built):
        flat: list = []
        for obj, layout in zip(built_objects(built, self.template), self.layouts):
            _read_object(obj, layout, type(obj).__name__, self, flat)
        return tuple(flat)

    def mismatch(self, where: str, found, compiled) -> str:
        return (
            f"leafpass: leaf {self.leaf} left its argument with {where} = {found!r} where {compiled!r} was "
            f"compiled for; the compiled code after the leaf would read stale values. Make the leaf's "
            f"update of its arguments depend on input shapes only, or unflag it (module._z3_leaf = False)."
        )


def _read_object(obj, layout: ObjectState, where: str, reader: ReadObjectStates, flat: list) -> None:
    """Append the values of ``obj`` at ``layout``'s leaf positions (a skeleton of the
    state compiled for) to ``flat``; constants, classes and attributes must match."""
    if type(obj) is not layout.cls:
        raise LeafArgumentError(reader.mismatch(f"{where} of class", type(obj).__name__, layout.cls.__name__))
    attrs = vars(obj)
    names = [n for n, _ in layout.consts] + [n for n, _ in layout.children]
    if sorted(attrs) != sorted(names):
        raise LeafArgumentError(reader.mismatch(f"{where} attributes", sorted(attrs), sorted(names)))
    for name, value in layout.consts:
        if attrs[name] is not value and attrs[name] != value:
            raise LeafArgumentError(reader.mismatch(f"{where}.{name}", attrs[name], value))
    for name, child in layout.children:
        _read_value(attrs[name], child, f"{where}.{name}", reader, flat)


def _read_value(value, layout, where: str, reader: ReadObjectStates, flat: list) -> None:
    if isinstance(layout, ObjectState):
        _read_object(value, layout, where, reader, flat)
    elif layout is None:
        if value is not None:
            raise LeafArgumentError(reader.mismatch(where, type(value).__name__, None))
    elif type(layout) in (list, tuple, dict):
        if type(value) is not type(layout) or len(value) != len(layout):
            found, compiled = f"{type(value).__name__} of {len(value)}", f"{type(layout).__name__} of {len(layout)}"
            raise LeafArgumentError(reader.mismatch(where, found, compiled))
        keys = layout.keys() if isinstance(layout, dict) else range(len(layout))
        for k in keys:
            _read_value(value[k], layout[k], f"{where}[{k!r}]", reader, flat)
    else:
        flat.append(value)  # a tensor, or a number traced as a symbol
