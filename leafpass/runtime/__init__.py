"""What ``prefetch_all`` does when the compiled program runs.

A runtime is any object with::

    prefetch_all(leaf: nn.Module, params: list[nn.Parameter]) -> None

It is called once per leaf call, before the leaf's forward pre-hooks and forward run,
with every parameter of the leaf's subtree (each once). A runtime may also define
``logical_shape(param) -> torch.Size``: the shape a partitioned parameter has when
gathered, which leafpass needs to infer the output shapes of a leaf at compile time.

The runtime is chosen per call: the one made active with :func:`use_runtime` if any,
else the engine that owns the parameters (DeepSpeed ZeRO-3 when they carry ``ds_id``),
else :class:`NullRuntime`, which does nothing because unpartitioned parameters are
already whole.

This package's ``__init__`` is the runtime *interface*: capture, lowering and the ops
import it, never an engine's module. Engines are found through :data:`ENGINES`, a table
of the mark an engine's parameters and modules carry and the names of the functions that
build its runtime and its gatherer; an engine's module (and the engine itself) is imported
only when an object carrying its mark shows up. A new engine plugs in with one entry::

    ENGINES:  Engine("deepspeed", mark="ds_id",
                     runtime="leafpass.runtime.deepspeed:deepspeed_runtime",
                     gatherer="leafpass.runtime.deepspeed_gatherer:gatherer_for_root")
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .null import NullRuntime

__all__ = [
    "ENGINES",
    "Engine",
    "NullRuntime",
    "engine_of",
    "engine_version",
    "leaf_environments_active",
    "in_leaf_environment",
    "leaf_environment",
    "PrefetchRuntime",
    "active_runtime",
    "logical_shape",
    "runtime_for",
    "use_runtime",
]


@runtime_checkable
class PrefetchRuntime(Protocol):
    def prefetch_all(self, leaf: nn.Module, params: list[nn.Parameter]) -> None: ...


_NULL = NullRuntime()
_stack: list[PrefetchRuntime] = []


@contextlib.contextmanager
def use_runtime(runtime: PrefetchRuntime) -> Iterator[PrefetchRuntime]:
    """Make ``runtime`` the one every ``prefetch_all`` calls inside the ``with`` block."""
    if not callable(getattr(runtime, "prefetch_all", None)):
        raise TypeError(
            f"use_runtime() needs an object with a prefetch_all(leaf, params) method; "
            f"got {type(runtime).__name__}. Define prefetch_all on it, or pass leafpass.NullRuntime()."
        )
    _stack.append(runtime)
    try:
        yield runtime
    finally:
        _stack.pop()


_leaf_environments: list = []


@contextlib.contextmanager
def leaf_environment(enter) -> Iterator[None]:
    """While active, every leaf run eagerly by leafpass runs inside ``enter()`` (a context
    manager). A gatherer that changes global state for the compiled code (DeepSpeed's
    ``linear`` under ``gather="module"``) gives the leaves the state their engine expects."""
    _leaf_environments.append(enter)
    try:
        yield
    finally:
        _leaf_environments.remove(enter)


def leaf_environments_active() -> bool:
    """True while some :func:`leaf_environment` is active (leaf pieces then enter them)."""
    return bool(_leaf_environments)


@contextlib.contextmanager
def in_leaf_environment() -> Iterator[None]:
    """Enter every active :func:`leaf_environment` (how leaf pieces run)."""
    with contextlib.ExitStack() as stack:
        for enter in tuple(_leaf_environments):
            stack.enter_context(enter())
        yield


def active_runtime() -> PrefetchRuntime | None:
    """The runtime set by the innermost :func:`use_runtime`, or None."""
    return _stack[-1] if _stack else None


@dataclasses.dataclass(frozen=True)
class Engine:
    """An engine that partitions parameters, and where leafpass's code for it lives.

    ``mark``: the attribute its partitioned parameters (and the modules it registered)
    carry. ``runtime``: ``"module:function"``, ``function() -> PrefetchRuntime``.
    ``gatherer``: ``"module:function"``, ``function(root module) -> gatherer or None``
    (what wraps a compiled call of a partitioned root: ``leafpass.gather``), or None.
    ``version``: ``"module:function"``, ``function() -> version`` that imports the engine
    and raises if leafpass does not support its version."""

    name: str
    mark: str
    runtime: str
    gatherer: str | None = None
    version: str | None = None

    def load(self, what: str) -> Callable:
        """The function named by ``what`` (``"runtime"``, ``"gatherer"``, ``"version"``),
        imported on first use and kept."""
        key = (self.name, what)
        found = _loaded.get(key)
        if found is None:
            module, _, function = getattr(self, what).partition(":")
            found = _loaded[key] = getattr(importlib.import_module(module), function)
        return found


_loaded: dict[tuple[str, str], Callable] = {}


ENGINES: list[Engine] = [
    Engine(
        "deepspeed",
        mark="ds_id",
        runtime="leafpass.runtime.deepspeed:deepspeed_runtime",
        gatherer="leafpass.runtime.deepspeed_gatherer:gatherer_for_root",
        version="leafpass.runtime.deepspeed:check_deepspeed_version",
    ),
]


def engine_version(name: str) -> str:
    """Import engine ``name`` and return its version; raise if leafpass does not support it."""
    for engine in ENGINES:
        if engine.name == name and engine.version is not None:
            return str(engine.load("version")())
    raise ValueError(f"leafpass knows no engine {name!r}; known: {[e.name for e in ENGINES]}")


def engine_of(obj) -> Engine | None:
    """The engine whose mark ``obj`` carries (a module's mark is looked up in its
    ``__dict__``: ``nn.Module.__getattr__`` would raise and catch on a miss)."""
    found = obj.__dict__ if isinstance(obj, nn.Module) else None
    for engine in ENGINES:
        if (engine.mark in found) if found is not None else hasattr(obj, engine.mark):
            return engine
    return None


def _engine_runtime(params: Sequence[torch.Tensor]) -> PrefetchRuntime:
    for p in params:
        engine = engine_of(p)
        if engine is not None:
            return engine.load("runtime")()
    return _NULL


def runtime_for(params: Sequence[torch.Tensor]) -> PrefetchRuntime:
    """The runtime that serves ``params``: the active one, else the owning engine's."""
    return _stack[-1] if _stack else _engine_runtime(params)


def logical_shape(param: torch.Tensor) -> torch.Size:
    """The full shape of ``param`` as its module's forward sees it, partitioned or not.

    Asks the active runtime, then the engine that owns the parameter, so a custom runtime
    made active over partitioned parameters need not know their shapes.
    """
    for runtime in (active_runtime(), _engine_runtime([param])):
        shape_of = getattr(runtime, "logical_shape", None)
        if shape_of is not None:
            return torch.Size(shape_of(param))
    return param.shape
