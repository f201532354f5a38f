"""Compiled leaf insides: the ``leaf_compile`` option of ``z3leaf``.

The outer graph keeps every leaf opaque: one ``prefetch_all`` and one ``call_module``
per leaf call, run by ``lower._LeafPiece``. With ``leaf_compile="off"`` (the default)
the leaf's ``forward`` then runs eagerly. With ``leaf_compile="inner"`` it runs through
its own ``torch.compile`` with the inner compiler, while the leaf's *module call* stays
eager::

    outer compiled program
      [compiled piece] -> _LeafPiece: prefetch_all(leaf)            # eager, as before
                                      leaf(*args)                   # eager nn.Module.__call__:
                                        engine hooks (DeepSpeed)    #   pre-forward fetch etc.
                                        leaf.forward -> compiled    #   torch.compile(forward,
                                        engine hooks                #     dynamic=True): graph
                       -> [compiled piece]                          #     breaks allowed inside

Why only ``forward``: the engine's module hooks (DeepSpeed gathers the leaf in its
pre-forward hook and hangs its backward bookkeeping on the outputs in its post-forward
hook) must run exactly as in eager ZeRO-3, whatever the gather policy; they run in
``nn.Module.__call__`` around ``forward``, so swapping ``forward`` for the duration of
the call changes what runs *inside* them and nothing else. The swap is an instance
attribute set for the call and deleted after it, so nothing outlives the call (the
outer frame's guards see the module as they left it).

Recompiles: routing changes the tokens each expert gets. The leaf's forward is compiled
with ``dynamic=True`` so sizes that depend on the batch are symbolic from the first
compile; the data-dependent parts (``nonzero``, a loop over the experts hit) break the
leaf's graph and run eagerly between its compiled pieces. Every leaf instance of a
class shares one code object and so one cache; Dynamo's ``recompile_limit`` caps the
graphs per code object (past it, that code runs eagerly). :func:`leaf_compile_stats`
reports the graphs compiled per leaf class.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .options import LEAF_COMPILE_MODES, check_leaf_compile  # noqa: F401  (the option lives with the others)

__all__ = ["LEAF_COMPILE_MODES", "check_leaf_compile", "leaf_compile_stats", "LeafCompiler"]

# leaf class qualified name -> graphs compiled for its forward (all instances, all calls)
_graphs_by_class: dict[str, int] = {}


def leaf_compile_stats() -> dict[str, int]:
    """Graphs compiled for leaf forwards under ``leaf_compile="inner"``, per leaf class
    (``module.Class``), since this process started (a copy). More graphs than leaf
    calls with new shapes means recompiles; Dynamo's ``recompile_limit`` caps them."""
    return dict(_graphs_by_class)


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


class _CountingCompiler:
    """The inner compiler, counting the graphs it gets for one leaf class."""

    def __init__(self, inner: Callable, key: str) -> None:
        self.inner = inner
        self.key = key

    def __call__(self, gm, example_inputs):
        _graphs_by_class[self.key] = _graphs_by_class.get(self.key, 0) + 1
        return self.inner(gm, example_inputs)


# (leaf class, inner compiler key) -> compiled forward function, shared by every instance
# and every program compiled with the same inner compiler, so Dynamo keeps one cache (a
# new backend object would be a cache miss, and a recompile, for every leaf instance)
_compiled: dict[tuple[type, Any], Callable] = {}


class LeafCompiler:
    """Compiles the forwards of leaf modules with ``inner`` and swaps them in for a call.

    ``key`` names the inner compiler (the ``inner`` option and the mode): programs
    compiled with the same key share one compiled forward per leaf class, taking the
    module as its first argument, so Dynamo's cache and its recompile limit are per leaf
    class, not per instance.
    """

    def __init__(self, inner: Callable, key: Any) -> None:
        self.inner = inner
        self.key = key

    def function_of(self, leaf: nn.Module) -> Callable:
        cls = type(leaf)
        compiled = _compiled.get((cls, self.key))
        if compiled is None:
            counting = _CountingCompiler(self.inner, _class_name(leaf))
            compiled = torch.compile(cls.forward, backend=counting, dynamic=True)
            _compiled[(cls, self.key)] = compiled
        return compiled

    @contextlib.contextmanager
    def swapped(self, leaves: Sequence[nn.Module]) -> Iterator[None]:
        """For the block, each of ``leaves`` calls its compiled forward (hooks unchanged)."""
        swapped = []
        try:
            for leaf in leaves:
                if "forward" in leaf.__dict__:  # the user's own per-instance forward: leave it
                    continue
                leaf.__dict__["forward"] = functools.partial(self.function_of(leaf), leaf)
                swapped.append(leaf)
            yield
        finally:
            for leaf in swapped:
                leaf.__dict__.pop("forward", None)
