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
Outside Dynamo the wrapper costs every module call of the process a Python call, one
``is_dynamo_compiling()`` call, a builtin call and a dict lookup when no compile is active
(``benchmarks/module_call_overhead.py`` measures it).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn
from . import dynamo_internals as internals
from .dynamo_internals import assume_constant_result, leaf_function

from . import shape_inference
from .flags import z3_leaf_module
from .gather import root_gatherer
from .leaf_arguments import apply_states, call_with_objects, states_of_objects
from .wrapped import wrapped_functions

__all__ = ["install", "installed", "run_leaf", "is_leafpass_backend"]

_original_call = None
_original_call_no_dynamo = None
_original_is_torchs = False  # the __call__ leafpass wrapped is PyTorch's _wrapped_call_impl
_local = threading.local()


def _leafpass_module_call(self: nn.Module, *args, **kwargs):
    # The fast path: an eager call with no compile active anywhere (no Dynamo callback set
    # and the module not compiled with module.compile()). ``is_dynamo_compiling`` is one
    # Python call returning False in eager code, and Dynamo folds it to True while tracing,
    # so Dynamo never sees the builtin callback read below it.
    if not _is_dynamo_compiling():
        callback = _callback_now()
        if not callback and self.__dict__.get("_compiled_call_impl") is None:
            if _original_is_torchs:  # what nn.Module._wrapped_call_impl does next, one frame less
                return self._call_impl(*args, **kwargs)
            return _original_call(self, *args, **kwargs)
    if torch.compiler.is_compiling():
        # getattr, not flags.z3_leaf_module: Dynamo guards this read as the user wrote it
        # (``L['self'].moe._z3_leaf == True``), the guard that recompiles on a flag change
        if _tracing_for_leafpass() and getattr(self, "_z3_leaf", False):
            internals.hold_compiling_flag_for_leaf_call()
            return _call_leaf(self, args, kwargs)
        return _original_call(self, *args, **kwargs)
    # Only builtins and Dynamo-disabled functions are called from here on before the
    # module's own call: this frame may run inside a z3leaf compile region (before the
    # compiled frame is entered), where Dynamo would try to compile any other frame.
    # Dynamo's callback was read above: inside a disabled function it is always off.
    if callback and z3_leaf_module(self) and _is_leafpass_callback(callback):
        return _run_uncaptured_leaf(self, args, kwargs)
    flags = self.__dict__
    if flags.get("_compiled_call_impl") is not None or (flags.get("_forward_pre_hooks") and callback):
        plan = _root_call_plan(self, callback)
        if plan is not None:
            gatherer, options = plan
            return gatherer.call(self, args, kwargs, options, _original_call)
    return _original_call(self, *args, **kwargs)


_callback_now = internals.eval_frame_callback_builtin()
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling


@torch._dynamo.disable
def _root_call_plan(module: nn.Module, callback):
    """``(gatherer, z3leaf options)`` when calling ``module`` enters a z3leaf-compiled frame and
    ``module`` is the root of a partitioned model leafpass gathers for; else None.
    ``callback`` is Dynamo's frame callback at the call (inside this function it is off)."""
    options = _options_of_z3leaf_call(module, callback)
    if options is None:
        return None
    gatherer = root_gatherer(module)
    return None if gatherer is None else (gatherer, options)


# id(callback) -> (weak reference to the callback, its answer); an entry goes with its
# callback (every torch.compile makes a new one), so the cache holds live callbacks only
_options_by_callback: dict[int, tuple[weakref.ref, dict | None]] = {}


def _callback_options(callback) -> dict | None:
    """z3leaf options of a Dynamo frame callback (None: not leafpass's), cached per callback."""
    cached = _options_by_callback.get(id(callback))
    if cached is not None and cached[0]() is callback:
        return cached[1]
    options = backend_options(callback)
    key = id(callback)
    try:
        ref = weakref.ref(callback, lambda dead: _forget_callback(key, dead))
    except TypeError:  # cannot be referenced weakly: not cached
        return options
    _options_by_callback[key] = (ref, options)
    return options


def _forget_callback(key: int, dead: weakref.ref) -> None:
    cached = _options_by_callback.get(key)
    if cached is not None and cached[0] is dead:  # not a newer callback's entry under a reused id
        del _options_by_callback[key]


@torch._dynamo.disable
def _is_leafpass_callback(callback) -> bool:
    """True when ``callback``, Dynamo's frame callback where a module is being called
    eagerly, compiles for z3leaf: the module runs eagerly inside a z3leaf-compiled frame.

    That is where a flagged module is called when the frame was compiled before the flag
    was set and with a graph break at the call: Dynamo then keeps no guard on the flag.
    Inside leafpass's lowered program (leaf pieces) Dynamo's callback is off.
    """
    return _callback_options(callback) is not None


def _options_of_z3leaf_call(module: nn.Module, callback) -> dict | None:
    """The z3leaf options of the compiled frame that calling ``module`` now enters, if any:
    ``module.compile(backend="z3leaf")`` (what ``engine.compile`` does), or a call made
    inside ``torch.compile(module, backend="z3leaf")`` (``callback`` is then leafpass's)
    before its frame is entered."""
    compiled = module.__dict__.get("_compiled_call_impl")
    if compiled is not None:
        callback = internals.compiled_function_callback(compiled) or callback
    if not callback:
        return None
    return _callback_options(callback)


_warned_uncaptured: set[int] = set()


def _run_uncaptured_leaf(module: nn.Module, args, kwargs):
    """Follow the flag where the compiled caller could not: prefetch, then run the leaf
    eagerly with Dynamo off, exactly as the lowered program runs a leaf piece."""
    from .runtime import in_leaf_environment, runtime_for

    if id(type(module)) not in _warned_uncaptured:
        _warned_uncaptured.add(id(type(module)))
        import warnings

        warnings.warn(
            f"leafpass: a flagged {type(module).__name__} leaf was called from code that runs "
            f"eagerly inside a z3leaf-compiled frame: either it was flagged after its caller was "
            f"compiled with a graph break at that call (Dynamo then keeps no guard on the flag), "
            f"or its caller could not be compiled (a graph break in a loop, say). It runs as an "
            f"eager leaf, gathered whole and correct, but its caller stays split. If you changed "
            f"the flag after compiling, torch._dynamo.reset() compiles it into one graph again; "
            f"`python -m leafpass explain` shows the caller's graph breaks.",
            stacklevel=3,
        )
    params = list(module.parameters())
    if params:
        runtime_for(params).prefetch_all(module, params)
    with in_leaf_environment():
        return _original_call_no_dynamo(module, *args, **kwargs)


def is_leafpass_backend(compiler_fn) -> bool:
    """True when ``compiler_fn`` (as Dynamo holds it, wrappers included) is leafpass's."""
    return backend_options(compiler_fn) is not None


def backend_options(compiler_fn) -> dict | None:
    """The z3leaf options ``compiler_fn`` will compile with, or None if it is not leafpass's.

    Options bound by :func:`leafpass.make_backend` are overridden by ``options=`` given to
    ``torch.compile``, as the backend itself merges them; a wrapper around the backend that
    passes options of its own declares them as ``_leafpass_options``.
    """
    given: dict = {}
    for fn in internals.backend_chain(compiler_fn):  # outermost first: outer options win
        for options in (internals.torch_compile_options(fn), getattr(fn, "_leafpass_options", None)):
            if isinstance(options, dict):
                given = {**options, **given}
        if getattr(fn, "_leafpass_backend", False):
            return given
    return None


@assume_constant_result
def _tracing_for_leafpass() -> bool:
    # Runs at trace time only (Dynamo calls functions marked assume_constant_result and
    # folds the result). No guard is needed: Dynamo already guards on the backend.
    if getattr(_local, "inferring_shapes", False):
        return False
    return is_leafpass_backend(internals.tracing_compiler_fn())


def _call_leaf(module: nn.Module, args: tuple, kwargs: dict):
    """Traced by Dynamo: objects among the arguments (a ``DynamicCache``, a dataclass) go
    through the opaque call by state, and their new state is written back after it
    (see ``leafpass.leaf_arguments``)."""
    args, kwargs, objects = states_of_objects(type(module).__name__, args, kwargs)
    args, kwargs = internals.leaf_call_inputs(args, kwargs)
    if not objects:
        return internals.structured_leaf_outputs(run_leaf(module, args, kwargs), (args, kwargs))
    out, states = internals.structured_leaf_outputs(run_leaf(module, args, kwargs), (args, kwargs))
    apply_states(objects, states)
    return out


@leaf_function
def run_leaf(module: nn.Module, args: tuple, kwargs: dict):
    """The leaf's call as Dynamo records it: one opaque node (rewritten by the passes).

    What it returns is flattened for torch 2.11's ``leaf_function`` (see
    :func:`leafpass.dynamo_internals.flat_leaf_outputs`)."""
    args, kwargs = internals.leaf_side_inputs(args, kwargs)
    out = call_with_objects(lambda *a, **k: _original_call(module, *a, **k), type(module).__name__, args, kwargs)
    return internals.flat_leaf_outputs(out, fake_run=False)


@run_leaf.register_fake
def _run_leaf_fake(module: nn.Module, args: tuple, kwargs: dict):
    _local.inferring_shapes = True
    try:
        inputs = (args, kwargs)
        args, kwargs = internals.leaf_side_inputs(args, kwargs)
        with internals.compiling_flag_held():
            out = shape_inference.infer_leaf_outputs(module, args, kwargs)
        return internals.flat_leaf_outputs(out, fake_run=True, inputs=inputs)
    finally:
        _local.inferring_shapes = False


def install() -> None:
    """Wrap ``nn.Module.__call__`` (idempotent). Done when leafpass is imported."""
    global _original_call
    if _original_call is not None:
        return
    global _original_call_no_dynamo
    internals.check_torch_version()
    internals.enable_object_attribute_iteration()  # torch 2.11: vars(obj) of a leaf's argument
    global _original_is_torchs
    _original_call = nn.Module.__call__
    _original_is_torchs = _original_call is nn.Module._wrapped_call_impl
    _original_call_no_dynamo = torch._dynamo.disable(_original_call, recursive=True)
    nn.Module.__call__ = _leafpass_module_call
    # Dynamo still inlines the wrapper while tracing a frame, but never compiles it as a
    # frame of its own: its one code object serves every module, so frames of it (after a
    # graph break in an unflagged module) would pile up on Dynamo's recompile limit.
    internals.never_compile_as_frame(_leafpass_module_call.__code__)
    internals.never_compile_as_frame(_run_uncaptured_leaf.__code__)
    internals.never_compile_as_frame(z3_leaf_module.__code__)  # called from the wrapper's eager path


def installed() -> bool:
    return nn.Module.__call__ is _leafpass_module_call


def call_replacement():
    """What replaced leafpass's ``nn.Module.__call__`` wrapper after leafpass installed it,
    if that no longer reaches the wrapper (through ``__wrapped__`` or a closure); else None.
    Dynamo then never reads the leaf flag, and flagged leaves are traced into."""
    current = nn.Module.__call__
    if _original_call is None or _reaches_wrapper(current):
        return None
    return current


def _reaches_wrapper(fn) -> bool:
    return any(f is _leafpass_module_call for f in wrapped_functions(fn, depth=4))


_warned_replacements: set[int] = set()


def warn_if_call_replaced() -> None:
    """Warn, once per replacement, when ``nn.Module.__call__`` no longer reaches leafpass's
    wrapper (another library replaced it after ``import leafpass``); called at compile time."""
    replacement = call_replacement()
    if replacement is None or id(replacement) in _warned_replacements:
        return
    _warned_replacements.add(id(replacement))
    import warnings

    where = f"{getattr(replacement, '__module__', '?')}.{getattr(replacement, '__qualname__', repr(replacement))}"
    warnings.warn(
        f"leafpass: nn.Module.__call__ is now {where}, which replaced leafpass's wrapper after "
        f"`import leafpass` and does not call it, so z3leaf cannot see the leaf flags: flagged "
        f"leaves will be traced into like any module. Import leafpass after the library that "
        f"replaces nn.Module.__call__ (or have its replacement call the previous __call__).",
        stacklevel=3,
    )


def original_call(module: nn.Module, *args, **kwargs):
    """Call ``module`` the way plain PyTorch does (hooks and forward), never captured."""
    return _original_call(module, *args, **kwargs)


def annotate_input_sources(gm) -> None:
    """Store each placeholder's Dynamo source (``L['self']._modules['l1']._parameters['weight']``)
    in ``node.meta["leafpass_source"]``; ``format_graph`` names inputs from it.

    Called from the backend while Dynamo's output graph still exists.
    """
    sources = internals.graph_input_sources()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if sources is None or len(sources) != len(placeholders):
        return
    for node, name in zip(placeholders, sources):
        if name is not None:
            node.meta["leafpass_source"] = name
