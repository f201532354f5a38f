"""Every private PyTorch (Dynamo) API leafpass relies on, in one place.

PyTorch does not promise these: each was read in torch 2.13 (and again in 2.11, 2.12 and
2.14) and is covered by ``tests/test_dynamo_internals.py``, which fails loudly if one
changes. Nothing else in leafpass imports ``torch._dynamo`` internals
(``torch._dynamo.reset``, ``disable`` and the backend registry are public enough to use
directly).

Where torch releases differ, the difference is decided here, once, and the rest of
leafpass reads one answer:

==========================================  =====================  ======================
what                                        torch 2.11             torch 2.12 to 2.14
==========================================  =====================  ======================
a size's hint without a guard               ``size_hint``          ``optimization_hint``
what a ``leaf_function`` may return         a flat tuple of        any pytree (Dynamo
                                            tensors (or None)      flattens it)
``invoke_leaf_function`` node arguments     ``(real_fn_spec,       ``(real_fn, fake_fn,
                                            fake_fn_spec, *flat)`` input_spec, '', *flat)``
a leaf call's flat inputs                   tensors, symbols and   any constant
                                            plain constants
                                            (:class:`SpecConstant`)
a frozen dataclass passed to a leaf         passed by state        a folded constant
``vars(obj).items()`` of a plain object     taught by leafpass     traced by Dynamo
                                            (:func:`enable_object_attribute_iteration`)
``is_compiling()`` in a leaf's fake call,   held by leafpass       held by leafpass (2.12),
and from the backend to the compile's end                          by Dynamo (2.13, 2.14)
==========================================  =====================  ======================

:data:`LEAF_OUTPUTS_FLAT` tells the two leaf-function APIs apart by what the module
holds (``make_leaf_function_wrappers``, which 2.12 has already), not by the version
number, and :data:`DUNDER_DICT_TRACED` the two ways Dynamo sees ``obj.__dict__`` by
Dynamo's own classes; the ``is_compiling()`` holds check the flag itself and do nothing
where Dynamo holds it. (One more 2.11 difference, outside Dynamo: its
``torch.utils.checkpoint`` saves inputs through an autograd node; ``lower`` keeps
parameters out of checkpoint's inputs on every torch, see
``lower.checkpoint_holding_parameters``.)

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
``obj.__dict__`` of a plain object (2.11)   torch/_dynamo/variables/misc.py (``GetAttrVariable``)
attribute writes recorded while tracing     torch/_dynamo/side_effects.py (``store_attr_mutations``)
==========================================  =============================================
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch._dynamo.decorators import assume_constant_result, leaf_function  # noqa: F401

from .versions import in_range

__all__ = [
    "DUNDER_DICT_TRACED",
    "FROZEN_DATACLASS_CONSTANTS",
    "LEAF_OUTPUTS_FLAT",
    "SpecConstant",
    "LeafNodeParts",
    "SUPPORTED_TORCH",
    "TESTED_TORCH",
    "assume_constant_result",
    "backend_chain",
    "check_torch_version",
    "compiled_function_callback",
    "compiling_frame",
    "eval_frame_callback",
    "enable_object_attribute_iteration",
    "eval_frame_callback_builtin",
    "flat_leaf_outputs",
    "compiling_flag_held",
    "graph_input_sources",
    "graph_inputs_by_fake",
    "hold_compiling_flag_for_leaf_call",
    "hold_compiling_flag_until_compile_end",
    "invoke_leaf_function_op",
    "is_first_compile_of_frame",
    "leaf_call_inputs",
    "leaf_function",
    "leaf_module_state_type",
    "leaf_node_parts",
    "leaf_side_inputs",
    "module_by_index",
    "never_compile_as_frame",
    "next_checkpoint_graph_id",
    "size_hint",
    "structured_leaf_outputs",
    "queue_end_of_backward_callback",
    "torch_compile_options",
    "tracing_compiler_fn",
]

SUPPORTED_TORCH = ((2, 11), (2, 15))  # [min, max)
TESTED_TORCH = ("2.11.0", "2.12.0", "2.13.0", "2.14.1")


def check_torch_version(version: str = torch.__version__) -> None:
    """Refuse a torch outside the supported range, naming the range and the fix."""
    if in_range(version, *SUPPORTED_TORCH):
        return
    raise RuntimeError(
        f"leafpass relies on private parts of torch._dynamo that it supports for torch "
        f">=2.11,<2.15 (tested with {', '.join(TESTED_TORCH)}); found torch {version}. "
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


# ------------------------------------------------ leaf functions: the two torch APIs


def _leaf_function_module():
    # by name: the package torch._higher_order_ops also exports the *op* under this name
    import importlib

    return importlib.import_module("torch._higher_order_ops.invoke_leaf_function")


LEAF_OUTPUTS_FLAT: bool = not hasattr(_leaf_function_module(), "make_leaf_function_wrappers")
"""True on torch 2.11: a ``leaf_function`` must return a flat tuple of tensors, and its
``invoke_leaf_function`` node is ``(real_fn_spec, fake_fn_spec, *flat)``. False on 2.12
to 2.14, where Dynamo flattens any output itself and the node is
``(real_fn, fake_fn, input_spec, mutated_indices, *flat)``."""

LAYOUT_META = "leafpass_leaf_output_layout"


class LeafOutputLayout(NamedTuple):
    """Where a leaf's flat tensor outputs go in what it returned (torch 2.11).

    ``spec`` is the structure of the leaf's output and ``tensor_at[i]`` the position among
    ``spec``'s leaves of flat output ``i`` (both for the leaf pass); ``shape`` is the same
    structure as nested tuples of strings, ints and constants, which Dynamo folds into
    the traced code without a guard (a ``TreeSpec`` it cannot trace ``tree_unflatten`` on)."""

    spec: pytree.TreeSpec
    tensor_at: tuple[int, ...]
    shape: tuple


_CONSTANT_TYPES = (type(None), bool, int, float, str)


_SYMBOL_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _input_holding(value, inputs: list) -> int | None:
    """Where among the call's flat inputs the symbol ``value`` came from (None: nowhere)."""
    for i, candidate in enumerate(inputs):
        if candidate is value:
            return i
    for i, candidate in enumerate(inputs):
        if isinstance(candidate, _SYMBOL_TYPES) and type(candidate) is type(value):
            if candidate.node.expr == value.node.expr:
                return i
    return None


def _shape_of(value, tensors: list, inputs: list) -> tuple:
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", len(tensors) - 1)
    if isinstance(value, _SYMBOL_TYPES):
        # A number Dynamo traces as a symbol (an int of an object passed by state that changed
        # between calls, say). Handed back unchanged: read from the inputs in the traced code.
        # Computed by the leaf (``calls + 1``): it cannot leave the opaque call on 2.11 (tensors
        # only), so its value is fixed here, guarded (the frame recompiles for another value).
        at = _input_holding(value, inputs)
        if at is not None:
            return ("input", at)
        concrete = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(value)](value)
        return ("constant", concrete)
    if isinstance(value, _CONSTANT_TYPES):
        return ("constant", value)
    if type(value) in (tuple, list):
        return (type(value).__name__, tuple(_shape_of(v, tensors, inputs) for v in value))
    if type(value) is dict:
        return ("dict", tuple(value), tuple(_shape_of(v, tensors, inputs) for v in value.values()))
    node = pytree.SUPPORTED_NODES.get(type(value))
    if node is not None:  # a registered container: leafpass's ObjectState, a ModelOutput
        children, context = node.flatten_fn(value)
        return ("node", type(value), context, tuple(_shape_of(v, tensors, inputs) for v in children))
    raise TypeError(
        f"leafpass: on torch {torch.__version__} a leaf's output must be made of tensors, constants "
        f"(None, bool, int, float, str), tuples, lists, dicts and containers registered with "
        f"torch.utils._pytree; this leaf returned a {type(value).__module__}.{type(value).__qualname__}. "
        f"Return a tuple or dict from the leaf's forward, or use torch>=2.12, whose leaf functions "
        f"return any pytree."
    )


def _flatten_leaf_output(out, inputs: list) -> tuple[tuple[torch.Tensor, ...], LeafOutputLayout]:
    tensors: list[torch.Tensor] = []
    shape = _shape_of(out, tensors, inputs)
    leaves, spec = pytree.tree_flatten(out)
    tensor_at = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    return tuple(tensors), LeafOutputLayout(spec, tensor_at, shape)


def _rebuild(shape: tuple, flat, inputs: list):
    kind = shape[0]
    if kind == "tensor":
        return flat[shape[1]]
    if kind == "input":
        return inputs[shape[1]]
    if kind == "constant":
        return shape[1]
    if kind == "tuple":
        return tuple(_rebuild(s, flat, inputs) for s in shape[1])
    if kind == "list":
        return [_rebuild(s, flat, inputs) for s in shape[1]]
    if kind == "node":
        return pytree.SUPPORTED_NODES[shape[1]].unflatten_fn([_rebuild(s, flat, inputs) for s in shape[3]], shape[2])
    return dict(zip(shape[1], [_rebuild(s, flat, inputs) for s in shape[2]]))


class _PendingLayout(threading.local):
    layout: LeafOutputLayout | None = None


# One slot, not a store: the leaf's fake run fills it, and the traced code right after the
# leaf call (``structured_leaf_outputs``) empties it. Dynamo runs one fake run per leaf
# call it traces, then traces the next instruction, so the slot always holds this call's.
_pending = _PendingLayout()


def flat_leaf_outputs(out, *, fake_run: bool, inputs=((), {})):
    """What a ``leaf_function`` hands Dynamo for the leaf output ``out``.

    torch 2.12+: ``out`` itself. torch 2.11: the tensors of ``out`` as a flat tuple (empty
    for a leaf that returns no tensor); the fake run (``fake_run=True``, ``inputs``: the
    call's ``(args, kwargs)`` as :func:`leaf_call_inputs` made them) keeps how to put them
    back for :func:`structured_leaf_outputs`."""
    if not LEAF_OUTPUTS_FLAT:
        return out
    flat, layout = _flatten_leaf_output(out, pytree.tree_leaves(inputs) if fake_run else [])
    if fake_run:
        _pending.layout = layout
    return flat


def structured_leaf_outputs(flat, inputs=((), {})):
    """Traced by Dynamo right after a leaf call: the leaf's output with its structure.

    torch 2.12+: ``flat`` is already that. torch 2.11: rebuilt from the layout the call's
    fake run left, which is also stored on the call's node for the leaf pass; a symbol the
    leaf handed back unchanged is read from ``inputs`` (the call's ``(args, kwargs)``)."""
    if not LEAF_OUTPUTS_FLAT:
        return flat
    return _rebuild(_take_leaf_output_shape(), flat, pytree.tree_leaves(inputs))


FROZEN_DATACLASS_CONSTANTS: bool = not LEAF_OUTPUTS_FLAT
"""True on torch 2.12+: a frozen dataclass passed to a leaf is a constant Dynamo folds into
the call's input spec. False on 2.11, where Dynamo cannot put one in a TreeSpec
(``currently can't reconstruct arbitrary frozen dataclass instances``): leafpass passes it
by state like any other object (``leafpass.leaf_arguments``)."""


class SpecConstant:
    """A constant argument of a leaf call kept in the call's input TreeSpec (torch 2.11).

    2.11's ``invoke_leaf_function`` infers a schema from its flat inputs and accepts only
    tensors, symbols and plain constants (``None``, bool, int, float, str) there; any other
    constant (a frozen dataclass, a dtype, a class) fails with ``Only tensors and (possibly
    nested) tuples of tensors, lists, or dicts are supported as inputs``. Boxed in this
    childless pytree node, the constant travels in the TreeSpec instead, and the leaf's side
    unboxes it (:func:`leaf_side_inputs`)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"SpecConstant({self.value!r})"


pytree.register_pytree_node(SpecConstant, lambda c: ([], c.value), lambda _, value: SpecConstant(value))

_FLAT_INPUT_TYPES = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, *_CONSTANT_TYPES)


def _box(value):
    return value if isinstance(value, _FLAT_INPUT_TYPES) else SpecConstant(value)


def leaf_call_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Traced before a leaf call: its ``(args, kwargs)`` as ``invoke_leaf_function`` takes
    them. torch 2.12+: unchanged. torch 2.11: constants other than plain ones boxed in
    :class:`SpecConstant`."""
    if not LEAF_OUTPUTS_FLAT:
        return args, kwargs
    return pytree.tree_map(_box, (args, kwargs))


def _unbox(value):
    return value.value if isinstance(value, SpecConstant) else value


def leaf_side_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The leaf's own ``(args, kwargs)`` from what :func:`leaf_call_inputs` made."""
    if not LEAF_OUTPUTS_FLAT:
        return args, kwargs
    return pytree.tree_map(_unbox, (args, kwargs), is_leaf=lambda v: isinstance(v, SpecConstant))


class _HeldFlag(threading.local):
    held: bool = False


_leaf_call_flag = _HeldFlag()


def hold_compiling_flag_until_compile_end() -> None:
    """From the backend on, hold ``torch.compiler.is_compiling()`` True until the compile ends.

    torch 2.13+ holds it itself. On torch 2.11 Dynamo builds the frame's guards after the
    backend returns, reading module attributes the Python way, so a DeepSpeed ZeRO-3
    ``_parameters`` dict all-gathers a leaf's parameter there (the guard Dynamo just made on
    its partitioned size then fails on the same frame). No graph input is created after the
    backend starts, so 2.11's "non-strict export" reading of the flag changes nothing."""
    _hold_compiling_flag()


def _hold_compiling_flag() -> None:
    import torch.compiler as compiler

    if compiler.is_compiling():
        return
    compiler._is_compiling_flag = True
    _leaf_call_flag.held = True
    from torch._dynamo.callback import callback_handler, on_compile_end

    if _release_at_compile_end not in callback_handler.end_callbacks:  # torch._dynamo.reset() clears them
        on_compile_end(_release_at_compile_end)


@assume_constant_result
def hold_compiling_flag_for_leaf_call() -> bool:
    """Traced right before a leaf call: hold ``torch.compiler.is_compiling()`` True until the
    traced code after it (:func:`structured_leaf_outputs`) lets go, or the compile ends.

    torch 2.13+ holds it for the whole compile: nothing to do. torch 2.11 does not, and
    Dynamo's fake call of the leaf swaps the leaf's parameters (``_reparametrize_module``)
    before leafpass's fake implementation runs, reading each through DeepSpeed's
    ``ZeROOrderedDict.__getitem__``, which all-gathers unless the flag is set. Between the
    two points Dynamo creates no graph input but the leaf's parameters and buffers (static
    sizes), so 2.11's reading of the flag in ``create_graph_input`` ("non-strict export":
    no symbols lifted) changes nothing there. A compile that fails in between lets go
    through Dynamo's end-of-compile callback."""
    _hold_compiling_flag()
    return True


def _release_compiling_flag() -> None:
    if _leaf_call_flag.held:
        import torch.compiler as compiler

        compiler._is_compiling_flag = False
        _leaf_call_flag.held = False


def _release_at_compile_end(_args=None) -> None:
    _release_compiling_flag()


@assume_constant_result
def _take_leaf_output_shape() -> tuple:
    # Runs at trace time (Dynamo folds the result into a constant): the invoke node of
    # the leaf call just traced is the last one in the graph being built.
    _release_compiling_flag()
    layout, _pending.layout = _pending.layout, None
    if layout is None:
        raise AssertionError("leafpass: no output layout was recorded by the leaf's fake run")
    graph = _output_graph().current_tracer.graph
    node = next(n for n in reversed(graph.nodes) if n.target is invoke_leaf_function_op())
    node.meta[LAYOUT_META] = layout
    return layout.shape


class LeafNodeParts(NamedTuple):
    """An ``invoke_leaf_function`` node, read the same on every supported torch.

    ``fn``: the user's leaf function (its real implementation); ``out_spec``: the structure
    of what it returned; ``out_at[i]``: the position among ``out_spec``'s leaves of the
    node's flat output ``i``; ``args``, ``kwargs``: the call's arguments with each module
    as a ``LeafModuleState``; ``attr_nodes``: the ``get_attr`` nodes only this call uses."""

    fn: Any
    out_spec: pytree.TreeSpec | None
    out_at: tuple[int, ...]
    args: tuple
    kwargs: dict
    attr_nodes: tuple[torch.fx.Node, ...]


def _attr_value(gm: torch.fx.GraphModule, node) -> Any:
    return getattr(gm, node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def leaf_node_parts(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LeafNodeParts:
    """The parts of an ``invoke_leaf_function`` node (see :class:`LeafNodeParts`).

    torch 2.13+: ``(real_fn, fake_fn, input_spec, mutated, *flat)``; ``real_fn`` is a
    ``_LeafCallable`` around a ``wrapper`` (``make_leaf_function_wrappers``) closing over
    the user's ``fn`` and ``captured_out_spec``, filled by the fake run.
    torch 2.11: ``(real_fn_spec, fake_fn_spec, *flat)``; unflattening ``real_fn_spec`` gives
    Dynamo's ``wrapped_impl``, closing over the user's ``impl`` and ``input_spec``; the output
    structure is the layout leafpass's fake run stored on the node (``LAYOUT_META``)."""
    if LEAF_OUTPUTS_FLAT:
        real_fn_spec = _attr_value(gm, node.args[0])
        wrapped = _leaf_function_module().unwrap_fn_spec(real_fn_spec) if real_fn_spec is not None else None
        closure = _closure(getattr(wrapped, "func", wrapped))  # a flat_apply _ConstantFunction
        fn, input_spec, flat = closure.get("impl"), closure.get("input_spec"), node.args[2:]
        layout = node.meta.get(LAYOUT_META)
        out_spec, out_at = (layout.spec, layout.tensor_at) if layout is not None else (None, ())
        attr_nodes = node.args[:2]
    else:
        closure = _closure(getattr(_attr_value(gm, node.args[0]), "_fn", None))
        spec_box = closure.get("captured_out_spec")
        fn, out_spec = closure.get("fn"), (spec_box[0] if spec_box else None)
        out_at = tuple(range(out_spec.num_leaves)) if out_spec is not None else ()
        input_spec, flat = _attr_value(gm, node.args[2]), node.args[4:]
        attr_nodes = node.args[:3]
    args, kwargs = pytree.tree_unflatten(list(flat), input_spec) if input_spec is not None else ((), {})
    args, kwargs = leaf_side_inputs(args, kwargs)
    return LeafNodeParts(
        fn=fn,
        out_spec=out_spec,
        out_at=out_at,
        args=tuple(args),
        kwargs=dict(kwargs),
        attr_nodes=tuple(a for a in attr_nodes if isinstance(a, torch.fx.Node)),
    )


def size_hint(size) -> int:
    """The concrete value behind a (possibly symbolic) size, without adding a guard:
    ``optimization_hint`` (torch 2.13+), ``size_hint`` (2.11)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    from torch.fx.experimental import symbolic_shapes

    hint = getattr(symbolic_shapes, "optimization_hint", None) or symbolic_shapes.size_hint
    return int(hint(size))


@contextlib.contextmanager
def compiling_flag_held():
    """``torch.compiler.is_compiling()`` is True inside the block.

    torch 2.13+ holds it True for a whole Dynamo compile, so code Dynamo calls without
    tracing it (a leaf's fake run) sees it; 2.11 sets it only in traced code. DeepSpeed's
    ``ZeROOrderedDict.__getitem__`` reads it: without it, a leaf's fake run all-gathers its
    parameters into fake tensors. Hold it for the fake run only: 2.11 also reads it in
    ``SubgraphTracer.create_graph_input`` as "non-strict export" (held through the whole
    compile, dynamic-shape recompiles then fail in ``split_module``), and Dynamo creates no
    graph input while a fake implementation runs."""
    import torch.compiler as compiler

    if compiler.is_compiling():
        yield
        return
    saved = compiler._is_compiling_flag
    compiler._is_compiling_flag = True
    try:
        yield
    finally:
        compiler._is_compiling_flag = saved


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


# ------------------------------------------------ an object's attributes: vars(obj)


def _dunder_dict_traced() -> bool:
    # torch 2.12+ models ``obj.__dict__`` as a dict (``DunderDictVariable``); 2.11 as an
    # opaque ``GetAttrVariable`` that answers ``[name]`` and ``in`` but not ``items()``
    from torch._dynamo import variables

    return hasattr(variables, "DunderDictVariable")


DUNDER_DICT_TRACED: bool = _dunder_dict_traced()
"""False on torch 2.11: Dynamo cannot iterate ``vars(obj)`` of a plain object
(``Unsupported method call ... items of class <unknown type>``), which
``leafpass.leaf_arguments`` does to pass an object by state;
:func:`enable_object_attribute_iteration` teaches it that one thing."""

_ITERATIONS = ("keys", "items", "values")
_attribute_iteration_enabled = False


def enable_object_attribute_iteration() -> None:
    """Let Dynamo trace ``vars(obj).keys()``, ``.items()`` and ``.values()`` of a plain
    object (torch 2.11; 2.12+ does it itself, and then this does nothing).

    2.11's ``GetAttrVariable.call_method`` answers only ``__getitem__``, ``get``,
    ``__contains__`` and ``__setitem__`` on an object's ``__dict__``; everything else raises
    ``Unsupported``. leafpass adds the three iterations, and only for a
    ``UserDefinedObjectVariable`` (frozen dataclasses included), so nothing that traced
    before traces differently. The names are the object's real ``__dict__`` (guarded
    ``DICT_KEYS_MATCH`` on ``obj.__dict__``, so a new or deleted attribute recompiles) with
    the attribute writes and deletions Dynamo has recorded so far applied; each value is
    read the way Dynamo reads ``obj.name`` (``var_getattr``: side effects, sources and
    guards as usual)."""
    global _attribute_iteration_enabled
    if DUNDER_DICT_TRACED or _attribute_iteration_enabled:
        return
    from torch._dynamo import variables
    from torch._dynamo.variables.misc import GetAttrVariable

    original = GetAttrVariable.call_method

    def call_method(self, tx, name, args, kwargs):
        if (
            name in _ITERATIONS
            and self.name == "__dict__"
            and not args
            and not kwargs
            and isinstance(self.obj, variables.UserDefinedObjectVariable)
        ):
            return _iterate_generic_dict(tx, self.obj, name)
        return original(self, tx, name, args, kwargs)

    call_method._leafpass_original = original
    GetAttrVariable.call_method = call_method
    _attribute_iteration_enabled = True


def _generic_dict_names(tx, obj) -> list[str]:
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._dynamo.source import AttrSource
    from torch._dynamo.variables.misc import DeletedVariable

    names = []
    if obj.source is not None:
        names = list(obj.value.__dict__)
        install_guard(AttrSource(obj.source, "__dict__").make_guard(GuardBuilder.DICT_KEYS_MATCH))
    side_effects = tx.output.side_effects
    if side_effects.is_attribute_mutation(obj):
        for key, value in side_effects.store_attr_mutations.get(obj, {}).items():
            if isinstance(value, DeletedVariable):
                if key in names:
                    names.remove(key)
            elif key not in names:
                names.append(key)
    return names


def _iterate_generic_dict(tx, obj, method: str):
    from torch._dynamo import variables

    names = _generic_dict_names(tx, obj)
    if method == "keys":
        return variables.ListVariable([variables.ConstantVariable.create(n) for n in names])
    values = [obj.var_getattr(tx, n) for n in names]
    if method == "values":
        return variables.ListVariable(values)
    return variables.ListVariable(
        [variables.TupleVariable([variables.ConstantVariable.create(n), v]) for n, v in zip(names, values)]
    )
