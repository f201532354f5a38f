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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .null import NullRuntime

__all__ = [
    "NullRuntime",
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


def _is_deepspeed_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _engine_runtime(params: Sequence[torch.Tensor]) -> PrefetchRuntime:
    if any(_is_deepspeed_param(p) for p in params):
        from .deepspeed import deepspeed_runtime

        return deepspeed_runtime()
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
