"""What a leaf returns, found at compile time without tracing it into the graph.

Dynamo needs the leaf's outputs as fake tensors (shape, dtype, device, strides)
to go on tracing what follows the leaf. Two ways, in order:

1. Run ``leaf.forward`` under Dynamo's fake mode. Exact, and keeps symbolic
   shapes; it works for leaves without data-dependent control flow.
2. When that fails on data (``nonzero``, ``.item()``, an ``if`` on a token
   count), run ``leaf.forward`` once for real on zeros: zero inputs of the
   inputs' current sizes and zero parameters of their full (gathered) sizes, under
   ``no_grad``. No collective is issued and no real parameter is touched. Output
   sizes equal to a symbolic input size are mapped back to that symbol.

The leaf's own hooks do not run here (they may gather or log); its forward
does. A leaf whose output *shape* depends on its input values cannot be a leaf:
the lowering checks real outputs against these shapes and says so.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
# not torch.func.functional_call: it calls module(...), so hooks (DeepSpeed's gathers)
# would run on the fake call; the leaf's forward alone runs under the whole parameters
from torch.nn.utils.stateless import _reparametrize_module

from .dynamo_internals import graph_inputs_by_fake, size_hint
from .leaf_arguments import call_with_objects
from .runtime import logical_shape

__all__ = ["infer_leaf_outputs", "LeafShapeError"]


class LeafShapeError(RuntimeError):
    """A leaf's outputs could not be inferred at compile time."""


def _whole_parameters(module: nn.Module, fake_mode) -> dict[str, torch.Tensor]:
    """Fake stand-ins of full size for parameters that are partitioned (size 0)."""
    reals = None
    whole = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        real = p
        if isinstance(p, FakeTensor):
            reals = graph_inputs_by_fake() if reals is None else reals
            real = reals.get(id(p), p)
        shape = logical_shape(real) if not isinstance(real, FakeTensor) else p.shape
        if tuple(shape) != tuple(p.shape):
            with fake_mode:
                whole[name] = torch.empty(shape, dtype=p.dtype, device=p.device)
    return whole


def _forward(module: nn.Module, args, kwargs):
    # objects passed by state (leaf_arguments) are built here, after the inputs were
    # made fake or zero, and their new states are returned beside the output
    return call_with_objects(module.forward, type(module).__name__, args, kwargs)


def _is_data_dependent(err: BaseException) -> bool:
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return isinstance(
        err,
        (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode),
    ) or "data-dependent" in str(err).lower() or "data dependent" in str(err).lower()


def _hint(size) -> int:
    """The concrete value behind a (possibly symbolic) size, without adding a guard."""
    return size_hint(size)


def _symbols_by_hint(fake_inputs) -> dict[int, torch.SymInt]:
    symbols: dict[int, torch.SymInt] = {}
    for t in fake_inputs:
        for size in t.shape:
            if isinstance(size, torch.SymInt) and not size.node.is_constant():
                symbols.setdefault(_hint(size), size)
    return symbols


def _run_on_zeros(module, args, kwargs, fake_mode):
    fake_inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    reals = graph_inputs_by_fake()

    with unset_fake_temporarily(), torch.no_grad():

        def zeros_like(t):
            if not isinstance(t, torch.Tensor):
                return t
            shape = [_hint(s) for s in t.shape]
            return torch.zeros(shape, dtype=t.dtype, device=t.device)

        real_args, real_kwargs = pytree.tree_map(zeros_like, (args, kwargs))
        params = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            real = reals.get(id(p), p)
            shape = logical_shape(real) if not isinstance(real, FakeTensor) else p.shape
            params[name] = torch.zeros([_hint(s) for s in shape], dtype=p.dtype, device=p.device)
        for name, b in module.named_buffers(remove_duplicate=False):
            params[name] = zeros_like(b)
        with _reparametrize_module(module, params):
            out = _forward(module, real_args, real_kwargs)

    symbols = _symbols_by_hint(fake_inputs)

    def to_fake(t):
        if not isinstance(t, torch.Tensor):
            return t
        shape = [symbols.get(int(s), int(s)) for s in t.shape]
        with fake_mode:
            if all(isinstance(s, int) for s in shape):
                return torch.empty_strided(shape, t.stride(), dtype=t.dtype, device=t.device)
            return torch.empty(shape, dtype=t.dtype, device=t.device)

    return pytree.tree_map(to_fake, out)


def _refuse_value_dependent_sizes(module: nn.Module, out) -> None:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and free_unbacked_symbols(t):
            raise LeafShapeError(
                f"leafpass: leaf {type(module).__name__} returns a tensor whose size depends on its "
                f"input values (shape {tuple(t.shape)}). Compiled code after a leaf needs sizes that "
                f"follow from input sizes; unflag it (module._z3_leaf = False) or pad its output."
            )


def infer_leaf_outputs(module: nn.Module, args: tuple, kwargs: dict):
    """Fake outputs of ``module(*args, **kwargs)``; called by Dynamo with fake inputs."""
    fake_mode = detect_fake_mode((args, kwargs)) or detect_fake_mode()
    if fake_mode is None:
        return _forward(module, args, kwargs)
    whole = _whole_parameters(module, fake_mode)
    reparam = _reparametrize_module(module, whole) if whole else contextlib.nullcontext()
    shape_env = fake_mode.shape_env
    ignore = shape_env.ignore_fresh_unbacked_symbols() if shape_env else contextlib.nullcontext()
    try:
        with reparam, ignore:
            out = _forward(module, args, kwargs)
        _refuse_value_dependent_sizes(module, out)
        return out
    except LeafShapeError:
        raise
    except Exception as fake_error:  # noqa: BLE001 - retried on real zeros below
        if not _is_data_dependent(fake_error):
            first = fake_error
        else:
            first = None
    try:
        return _run_on_zeros(module, args, kwargs, fake_mode)
    except Exception as real_error:
        raise LeafShapeError(
            f"leafpass could not infer the outputs of leaf {type(module).__name__}: "
            f"under fake tensors it raised {type(first).__name__ if first else 'a data-dependent error'}"
            f"{': ' + str(first) if first else ''}; on zero inputs it raised "
            f"{type(real_error).__name__}: {real_error}. Make the leaf's forward run on "
            f"zero-filled inputs, or unflag it (module._z3_leaf = False)."
        ) from real_error
