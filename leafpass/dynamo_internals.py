"""Every private PyTorch (Dynamo) API leafpass relies on, in one place.

PyTorch does not promise these: each was read in torch 2.13 and is covered by
``tests/test_dynamo_internals.py``, which fails loudly if one changes. Nothing
else in leafpass imports ``torch._dynamo`` internals (``torch._dynamo.reset``,
``disable`` and the backend registry are public enough to use directly).

==========================================  =============================================
what                                        torch source (2.13)
==========================================  =============================================
``leaf_function``, ``assume_constant_result``  torch/_dynamo/decorators.py
``invoke_leaf_function`` and its callables  torch/_higher_order_ops/invoke_leaf_function.py
the module behind a ``LeafModuleState``     torch/_dynamo/graph_bytecode_inputs.py
the output graph being traced               torch/_dynamo/symbolic_convert.py
the active eval-frame callback              torch/_C/_dynamo/eval_frame
the compile id (first compile or recompile) torch/_guards.py (CompileContext)
``skip_code``                               torch/_dynamo/eval_frame.py
the callback of a ``torch.compile``'d fn    torch/_dynamo/eval_frame.py (``_TorchDynamoContext``)
the backend options ``torch.compile`` got   torch/__init__.py (``_TorchCompileWrapper.kwargs``)
a callback at the end of ``backward()``     torch/csrc/autograd/python_engine.cpp
the graphargs of the root graph             torch/_dynamo/output_graph.py (``root_tracer``)
``ac_graph_id`` of checkpoint regions       torch/_higher_order_ops/wrap.py (``uid``)
==========================================  =============================================
"""

from __future__ import annotations

import types

import torch
from torch._dynamo.decorators import assume_constant_result, leaf_function  # noqa: F401

from .versions import in_range

__all__ = [
    "SUPPORTED_TORCH",
    "assume_constant_result",
    "backend_chain",
    "check_torch_version",
    "compiled_function_callback",
    "compiling_frame",
    "eval_frame_callback",
    "eval_frame_callback_builtin",
    "graph_input_sources",
    "graph_inputs_by_fake",
    "invoke_leaf_function_op",
    "is_first_compile_of_frame",
    "leaf_callable_parts",
    "leaf_function",
    "leaf_module_state_type",
    "module_by_index",
    "never_compile_as_frame",
    "next_checkpoint_graph_id",
    "queue_end_of_backward_callback",
    "torch_compile_options",
    "tracing_compiler_fn",
]

SUPPORTED_TORCH = ((2, 13), (2, 15))  # [min, max)


def check_torch_version(version: str = torch.__version__) -> None:
    if not in_range(version, *SUPPORTED_TORCH):
        raise RuntimeError(
            f"leafpass relies on private parts of torch._dynamo that it supports for torch "
            f">=2.13,<2.15 (tested with 2.13.0); found torch {version}. "
            f"Install a supported version (pip install 'torch==2.13.0')."
        )


def _output_graph():
    """Dynamo's OutputGraph for the frame being traced now, or None outside tracing."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().output
    except Exception:
        return None


def tracing_compiler_fn():
    """The backend (as Dynamo wraps it) of the frame being traced, or None."""
    return getattr(_output_graph(), "compiler_fn", None)


def _source_name(source) -> str:
    return source.name if isinstance(source.name, str) else source.name()


def graph_input_sources() -> list[str | None] | None:
    """Source names (``L['self']._modules['l1']._parameters['weight']``) of the traced
    graph's inputs, in placeholder order; None outside tracing."""
    output = _output_graph()
    if output is None:
        return None
    return [_source_name(a.source) if getattr(a, "source", None) is not None else None for a in output.graphargs]


def _root_graphargs(output) -> list:
    """The ``GraphArg`` of every input of the frame's root graph.

    ``OutputGraph.graphargs`` reads ``meta["grapharg"]`` on the placeholders of the
    *current* tracer; inside a higher-order op's body (a ``torch.utils.checkpoint``
    region, say) that is a ``SubgraphTracer`` whose placeholders are lifted free
    variables without that key (``KeyError: 'grapharg'``). Their values are the root
    tracer's fake inputs, so the root graph's placeholders answer for them."""
    root = getattr(output, "root_tracer", None)
    if root is None:
        return []
    return [n.meta["grapharg"] for n in root.graph.find_nodes(op="placeholder") if "grapharg" in n.meta]


def graph_inputs_by_fake() -> dict[int, torch.Tensor]:
    """``id(fake graph input) -> the real tensor Dynamo lifted it from``, while tracing,
    also inside a higher-order op's body (see :func:`_root_graphargs`)."""
    found = {}
    for arg in _root_graphargs(_output_graph()):
        fake = getattr(arg, "fake_tensor", None)
        if fake is not None:
            found[id(fake)] = arg.example
    return found


def is_first_compile_of_frame() -> bool:
    """True while compiling a frame for the first time (not a recompile); True outside
    compilation too. From ``torch._guards.CompileContext.current_compile_id()``."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    frame_compile_id = getattr(compile_id, "frame_compile_id", None)
    return frame_compile_id in (None, 0)


def eval_frame_callback():
    """Dynamo's frame callback in effect now: None or False when no compile region is active."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback

    return get_eval_frame_callback()


def eval_frame_callback_builtin():
    """The C function behind :func:`eval_frame_callback`: calling it makes no Python frame,
    so it is safe where Dynamo's callback is active and a new frame would be compiled."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback

    return get_eval_frame_callback


def never_compile_as_frame(code: types.CodeType) -> None:
    """Dynamo still inlines ``code`` when tracing a caller, but never compiles it as a frame."""
    from torch._dynamo.eval_frame import skip_code

    skip_code(code)


def compiled_function_callback(fn):
    """The frame callback a function made by ``torch.compile`` (or ``nn.Module.compile``)
    installs while it runs, or None for any other callable.

    ``_TorchDynamoContext.__call__`` returns a ``compile_wrapper`` closing over ``callback``
    and carrying ``_torchdynamo_orig_callable``.
    """
    if getattr(fn, "_torchdynamo_orig_callable", None) is None:
        return None
    return _closure(fn).get("callback")


_CHAIN_ATTRS = ("_torchdynamo_orig_backend", "compiler_fn", "backend", "func", "__wrapped__")


def backend_chain(compiler_fn, limit: int = 16):
    """``compiler_fn`` as Dynamo holds it, then each object it wraps, outermost first.

    Dynamo wraps a backend in ``CatchErrorsWrapper`` -> ``ConvertFrame`` ->
    ``WrapBackendDebug`` -> ``_TorchCompileWrapper`` (whose ``kwargs`` holds
    ``{"options": ...}`` given to ``torch.compile``) -> the backend function.
    """
    seen = 0
    while compiler_fn is not None and seen < limit:
        yield compiler_fn
        seen += 1
        compiler_fn = next(
            (getattr(compiler_fn, a) for a in _CHAIN_ATTRS if getattr(compiler_fn, a, None) is not None),
            None,
        )


def torch_compile_options(wrapper) -> dict | None:
    """The ``options=`` dict ``torch.compile`` passed to a backend, from a ``_TorchCompileWrapper``."""
    kwargs = getattr(wrapper, "kwargs", None)
    if isinstance(kwargs, dict) and isinstance(kwargs.get("options"), dict):
        return kwargs["options"]
    return None


def queue_end_of_backward_callback(fn) -> None:
    """Run ``fn()`` once the backward pass running now has finished (call from a tensor hook)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def invoke_leaf_function_op():
    return torch.ops.higher_order.invoke_leaf_function


def leaf_module_state_type():
    from torch._higher_order_ops.invoke_leaf_function import LeafModuleState

    return LeafModuleState


def module_by_index(index: int) -> torch.nn.Module:
    """The module a ``LeafModuleState.nn_module_index`` names (valid while compiling)."""
    from torch._dynamo.graph_bytecode_inputs import get_external_object_by_index

    return get_external_object_by_index(index)


def _closure(fn) -> dict:
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    cells = getattr(fn, "__closure__", None) or ()
    return {n: c.cell_contents for n, c in zip(names, cells)}


def leaf_callable_parts(obj) -> tuple[object, object]:
    """``(user function, captured output TreeSpec)`` behind a ``_LeafCallable`` stored on the
    graph by Dynamo for an ``invoke_leaf_function`` node (made by
    ``make_leaf_function_wrappers``: a ``wrapper`` closing over ``fn`` and
    ``captured_out_spec``)."""
    closure = _closure(getattr(obj, "_fn", None))
    spec_box = closure.get("captured_out_spec")
    return closure.get("fn"), (spec_box[0] if spec_box else None)


def next_checkpoint_graph_id() -> int:
    """A fresh ``ac_graph_id`` for a checkpoint region, from the counter the
    ``tag_activation_checkpoint`` op numbers its regions with, so ids stay unique and
    increase in the order regions are made (the partitioner saves a value at the
    boundary between a region and a later one)."""
    from torch._higher_order_ops import wrap

    return next(wrap.uid)


def compiling_frame() -> str | None:
    """``"name (file:line)"`` of the frame Dynamo is compiling now (the code object of the
    root ``InstructionTranslator``, ``tls.current_tx``), or None outside a compile."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        code = InstructionTranslator.current_tx().f_code
    except AttributeError:  # no translator in this thread: not compiling
        return None
    return f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})"
