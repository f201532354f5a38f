"""Capture: Dynamo sees each flagged leaf module as one opaque call.

Dynamo inlines every ``nn.Module`` call, so a leaf whose ``forward`` routes tokens
with ``nonzero`` and a Python ``if`` on a token count breaks the graph. leafpass
wraps ``nn.Module.__call__`` once, when the package is imported::

    module(*args)                                   # any module, any time
      -> _leafpass_module_call(module, *args)
           eager, or compiled by another backend    -> the original __call__
           traced by Dynamo for backend="z3leaf"
             and module._z3_leaf is truthy          -> run_leaf(module, args, kwargs)

``run_leaf`` is a Dynamo ``leaf_function``: Dynamo records it as one
``invoke_leaf_function`` node and never traces its body, so the leaf's routing
causes no graph break. leafpass's first pass turns that node into a
``call_module`` of the leaf.

Why a wrapper on ``nn.Module.__call__`` and not one per flagged module: the flag
is read while Dynamo traces *every* module call, so Dynamo guards on it
(``not hasattr(L['self'].moe, '_z3_leaf')`` or ``... ._z3_leaf == True``). A flag
set, unset or deleted after compiling, however it was set, fails that guard and
the next call recompiles: the compiled program never runs on a stale decision.
Outside Dynamo the wrapper costs one extra Python call per module call.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch._dynamo.decorators import assume_constant_result, leaf_function

from . import shape_inference

__all__ = ["install", "installed", "run_leaf", "is_leafpass_backend"]

_original_call = None
_local = threading.local()


def _leafpass_module_call(self: nn.Module, *args, **kwargs):
    if (
        torch.compiler.is_compiling()
        and _tracing_for_leafpass()
        and getattr(self, "_z3_leaf", False)
    ):
        return run_leaf(self, args, kwargs)
    return _original_call(self, *args, **kwargs)


def is_leafpass_backend(compiler_fn) -> bool:
    """True when ``compiler_fn`` (as Dynamo holds it, wrappers included) is leafpass's."""
    seen = 0
    while compiler_fn is not None and seen < 16:
        if getattr(compiler_fn, "_leafpass_backend", False):
            return True
        seen += 1
        compiler_fn = next(
            (
                getattr(compiler_fn, attr)
                for attr in ("_torchdynamo_orig_backend", "compiler_fn", "func", "__wrapped__")
                if getattr(compiler_fn, attr, None) is not None
            ),
            None,
        )
    return False


@assume_constant_result
def _tracing_for_leafpass() -> bool:
    # Runs at trace time only (Dynamo calls functions marked assume_constant_result and
    # folds the result). No guard is needed: Dynamo already guards on the backend.
    if getattr(_local, "inferring_shapes", False):
        return False
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return False
    return is_leafpass_backend(getattr(tx.output, "compiler_fn", None))


@leaf_function
def run_leaf(module: nn.Module, args: tuple, kwargs: dict):
    """The leaf's call as Dynamo records it: one opaque node (rewritten by the passes)."""
    return _original_call(module, *args, **kwargs)


@run_leaf.register_fake
def _run_leaf_fake(module: nn.Module, args: tuple, kwargs: dict):
    _local.inferring_shapes = True
    try:
        return shape_inference.infer_leaf_outputs(module, args, kwargs)
    finally:
        _local.inferring_shapes = False


def install() -> None:
    """Wrap ``nn.Module.__call__`` (idempotent). Done when leafpass is imported."""
    global _original_call
    if _original_call is not None:
        return
    _original_call = nn.Module.__call__
    nn.Module.__call__ = _leafpass_module_call
    # Dynamo still inlines the wrapper while tracing a frame, but never compiles it as a
    # frame of its own: its one code object serves every module, so frames of it (after a
    # graph break in an unflagged module) would pile up on Dynamo's recompile limit.
    from torch._dynamo.eval_frame import skip_code

    skip_code(_leafpass_module_call.__code__)


def installed() -> bool:
    return nn.Module.__call__ is _leafpass_module_call


def original_call(module: nn.Module, *args, **kwargs):
    """Call ``module`` the way plain PyTorch does (hooks and forward), never captured."""
    return _original_call(module, *args, **kwargs)


def annotate_input_sources(gm) -> None:
    """Store each placeholder's Dynamo source (``L['self']._modules['l1']._parameters['weight']``)
    in ``node.meta["leafpass_source"]``; ``format_graph`` names inputs from it.

    Called from the backend while Dynamo's output graph still exists.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        graphargs = InstructionTranslator.current_tx().output.graphargs
    except Exception:
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(graphargs) != len(placeholders):
        return
    for node, arg in zip(placeholders, graphargs):
        source = getattr(arg, "source", None)
        if source is None:
            continue
        name = source.name if isinstance(source.name, str) else source.name()
        node.meta["leafpass_source"] = name
