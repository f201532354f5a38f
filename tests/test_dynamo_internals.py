"""Each private torch API in leafpass/dynamo_internals.py, checked directly.

If a torch upgrade changes one of them, a test here fails by name, before the
symptoms spread to the backend's tests.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree

import leafpass
from leafpass import dynamo_internals as internals
from leafpass.capture import run_leaf
from leafpass.testing.models import MoEBlock, TwoMoE


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_torch_version_check():
    for version in ("2.11.0+cu130", "2.12.0", "2.13.0+cpu", "2.14.1"):
        internals.check_torch_version(version)
    for version in ("2.10.0", "2.15.0", "2.16.0"):
        with pytest.raises(RuntimeError, match=rf">=2.11,<2.15 .*found torch {version}.*'torch==2.13.0'\)\.$"):
            internals.check_torch_version(version)


def test_torch_2_11_and_2_12_need_no_environment_variable():
    # they ran only with LEAFPASS_EARLY_TORCH=1 once; nothing reads it now
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "early torch" warning either
        internals.check_torch_version("2.11.0+cu130")


def test_leaf_function_api_is_the_one_this_torch_has():
    # 2.11 lays the node out as (real_fn_spec, fake_fn_spec, *flat) and wants flat tensor
    # outputs; 2.13 added make_leaf_function_wrappers and flattens outputs itself
    from leafpass.versions import in_range

    if in_range(torch.__version__, (2, 11), (2, 12)):
        assert internals.LEAF_OUTPUTS_FLAT
    if in_range(torch.__version__, (2, 12), (2, 15)):
        assert not internals.LEAF_OUTPUTS_FLAT


def test_size_hint_of_a_symbolic_size_adds_no_guard():
    seen = []

    def backend(gm, example_inputs):
        fakes = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        sym = next(s for t in fakes if isinstance(t, torch.Tensor) for s in t.shape if isinstance(s, torch.SymInt))
        seen.append((internals.size_hint(sym), internals.size_hint(7)))
        return gm.forward

    compiled = torch.compile(lambda x: x * 2, backend=backend, dynamic=True)
    compiled(torch.randn(5))
    compiled(torch.randn(9))  # no guard on the hint: the dynamic graph serves this size
    assert seen == [(5, 7)]


def test_compiling_flag_is_held_in_a_leaf_fake_run_and_restored():
    seen = []

    @internals.leaf_function
    def double(x):
        return (x * 2,)

    @double.register_fake
    def _double_fake(x):
        with internals.compiling_flag_held():
            seen.append(torch.compiler.is_compiling())
        return (torch.empty_like(x),)

    torch.compile(lambda x: double(x)[0] + 1, backend="eager", fullgraph=True)(torch.randn(3))
    assert seen == [True]
    assert not torch.compiler.is_compiling()
    with internals.compiling_flag_held():
        assert torch.compiler.is_compiling()
    assert not torch.compiler.is_compiling()


class Pair:
    """A container registered with pytree, as transformers registers its ModelOutputs."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second


pytree.register_pytree_node(Pair, lambda p: ([p.first, p.second], "pair"), lambda values, _: Pair(*values))


@pytest.mark.parametrize(
    "make_output, n_tensors",
    [
        (lambda x: x * 2, 1),
        (lambda x: (x * 2, {"aux": x + 1, "more": [x - 1]}), 3),
        pytest.param(lambda x: (x * 2, {"n": 3, "tag": "a"}, None), 1, marks=pytest.mark.flat_leaf_outputs),
        pytest.param(lambda x: None, 0, marks=pytest.mark.flat_leaf_outputs),
        pytest.param(lambda x: (7, "tag"), 0, marks=pytest.mark.flat_leaf_outputs),
        (lambda x: Pair(x * 2, (x + 1, x - 1)), 3),
    ],
    ids=["tensor", "nested-tensors", "with-constants", "none", "no-tensor", "registered-container"],
)
def test_leaf_outputs_flatten_and_come_back_with_their_structure(request, make_output, n_tensors):
    # Traced by Dynamo as capture does: a leaf_function returning flat_leaf_outputs(...),
    # then structured_leaf_outputs(...) right after the call.
    if request.node.get_closest_marker("flat_leaf_outputs") and not internals.LEAF_OUTPUTS_FLAT:
        pytest.skip(f"torch {torch.__version__}'s Dynamo refuses a leaf_function output that is not a tensor")
    module = torch.nn.Linear(3, 3)

    @internals.leaf_function
    def leaf(m, x):
        return internals.flat_leaf_outputs(make_output(x), fake_run=False)

    @leaf.register_fake
    def _leaf_fake(m, x):
        return internals.flat_leaf_outputs(make_output(x), fake_run=True)

    nodes = []

    def backend(gm, example_inputs):
        nodes.extend(n for n in gm.graph.nodes if n.target is internals.invoke_leaf_function_op())
        parts = internals.leaf_node_parts(gm, nodes[0])
        assert parts.fn is leaf._torchdynamo_leaf_real_fn
        assert parts.out_spec == pytree.tree_flatten(make_output(torch.ones(1)))[1]
        assert len(parts.out_at) == n_tensors
        assert internals._pending.layout is None  # the traced code emptied the slot
        return gm.forward

    def f(x):
        out = internals.structured_leaf_outputs(leaf(module, x))
        return out, x.sum()

    x = torch.randn(2, 3)
    out, _ = torch.compile(f, backend=backend, fullgraph=True)(x)
    expected = make_output(x)
    assert pytree.tree_structure(out) == pytree.tree_structure(expected)
    for got, want in zip(pytree.tree_leaves(out), pytree.tree_leaves(expected)):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want)
        else:
            assert got == want
    assert len(nodes) == 1


def test_a_leaf_output_torch_2_11_cannot_rebuild_is_refused_by_name():
    if not internals.LEAF_OUTPUTS_FLAT:
        assert internals.flat_leaf_outputs({"a": object()}, fake_run=True)["a"] is not None  # passed through
        return
    with pytest.raises(TypeError, match=r"leaf's output must be made of tensors.*returned a builtins.object.*torch>=2.12"):
        internals.flat_leaf_outputs((torch.ones(1), object()), fake_run=True)


class Bag:
    def __init__(self) -> None:
        self.t = torch.ones(2)
        self.name = "bag"


def test_dunder_dict_api_is_the_one_this_torch_has():
    from leafpass.versions import in_range

    assert internals.DUNDER_DICT_TRACED == (not in_range(torch.__version__, (2, 11), (2, 12)))
    assert internals.FROZEN_DATACLASS_CONSTANTS == (not internals.LEAF_OUTPUTS_FLAT)


def test_vars_of_a_plain_object_is_traced_with_a_guard_on_its_attributes():
    # leaf_arguments reads vars(obj).items() of an argument passed by state; torch 2.11's
    # Dynamo learns it from enable_object_attribute_iteration (run when leafpass is imported)
    from torch._dynamo.testing import CompileCounter

    internals.enable_object_attribute_iteration()  # idempotent
    counter = CompileCounter()

    def f(x, bag):
        total = x
        for _, value in vars(bag).items():
            if isinstance(value, torch.Tensor):
                total = total + value
        made = Bag()
        made.extra = x
        del made.name
        return total, list(vars(bag).keys()), list(vars(made).keys())

    compiled = torch.compile(f, backend=counter, fullgraph=True)
    bag, x = Bag(), torch.zeros(2)
    assert compiled(x, bag)[1:] == (["t", "name"], ["t", "extra"])
    compiled(x, bag)
    assert counter.frame_count == 1
    bag.more = torch.ones(2)  # a new attribute: the guard on bag.__dict__'s keys fails
    total, names, _ = compiled(x, bag)
    assert names == ["t", "name", "more"] and total.tolist() == [2.0, 2.0]
    del bag.name
    assert compiled(x, bag)[1] == ["t", "more"]
    assert counter.frame_count == 3
    from torch._dynamo.variables.misc import GetAttrVariable

    assert hasattr(GetAttrVariable.call_method, "_leafpass_original") == (not internals.DUNDER_DICT_TRACED)


@dataclasses.dataclass(frozen=True)
class Scale:
    value: float


def test_constants_of_a_leaf_call_travel_in_its_input_spec_on_torch_2_11():
    args, kwargs = (torch.ones(1), torch.float64, 3), {"cls": int, "scale": Scale(2.0), "name": "n"}
    boxed_args, boxed_kwargs = internals.leaf_call_inputs(args, kwargs)
    flat = pytree.tree_leaves((boxed_args, boxed_kwargs))
    if internals.LEAF_OUTPUTS_FLAT:  # 2.11: only tensors, symbols and plain constants stay flat
        assert [type(v).__name__ for v in flat] == ["Tensor", "int", "str"]
        assert isinstance(boxed_kwargs["cls"], internals.SpecConstant)
    else:
        assert (boxed_args, boxed_kwargs) == (args, kwargs)
    assert internals.leaf_side_inputs(boxed_args, boxed_kwargs) == (args, kwargs)


def test_output_graph_facts_are_readable_at_backend_time():
    seen = {}

    def backend(gm, example_inputs):
        seen["compiler_fn"] = internals.tracing_compiler_fn()
        seen["sources"] = internals.graph_input_sources()
        seen["by_fake"] = internals.graph_inputs_by_fake()
        seen["fakes"] = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        return gm.forward

    backend.marker = True
    lin = torch.nn.Linear(3, 3)
    torch.compile(lin, backend=backend)(torch.randn(2, 3))
    chain, fn = [], seen["compiler_fn"]
    while fn is not None and len(chain) < 8:
        chain.append(fn)
        fn = next((getattr(fn, a) for a in ("_torchdynamo_orig_backend", "compiler_fn") if getattr(fn, a, None) is not None), None)
    assert any(getattr(c, "marker", False) for c in chain)
    assert seen["sources"] == ["L['fn']._parameters['weight']", "L['fn']._parameters['bias']", "L['args'][0]"]
    reals = [seen["by_fake"][id(f)] for f in seen["fakes"]]
    assert reals[0] is lin.weight and reals[1] is lin.bias


def test_outside_tracing_there_is_no_output_graph():
    assert internals.tracing_compiler_fn() is None
    assert internals.graph_input_sources() is None
    assert internals.graph_inputs_by_fake() == {}


def test_eval_frame_callback_is_set_only_inside_a_compile_region():
    seen = []

    def probe():
        seen.append(internals.eval_frame_callback())

    internals.never_compile_as_frame(probe.__code__)

    def f(x):
        x = x + 1
        torch._dynamo.graph_break()
        probe()  # runs eagerly inside the compile region, as the wrapper does after a break
        return x * 2

    assert internals.eval_frame_callback() in (None, False)
    torch.compile(f, backend="eager")(torch.randn(2))
    assert seen[0] is not None and seen[0] is not False


def test_never_compile_as_frame():
    calls = []

    def backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    def skipped(x):
        return x.sin() + 1

    internals.never_compile_as_frame(skipped.__code__)
    torch.compile(skipped, backend=backend)(torch.randn(2))
    assert calls == []


def test_invoke_leaf_function_node_parts():
    found = {}

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is internals.invoke_leaf_function_op():
                parts = internals.leaf_node_parts(gm, node)
                state, args, kwargs = parts.args
                found.update(
                    fn=parts.fn,
                    out_spec=parts.out_spec,
                    out_at=parts.out_at,
                    n_attr_nodes=len(parts.attr_nodes),
                    state_type=type(state),
                    module=internals.module_by_index(state.nn_module_index),
                    n_params=len(state.named_parameters),
                )
                break
        return gm.forward

    model = TwoMoE(8)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    # a backend that is not leafpass's captures nothing; call run_leaf through Dynamo directly
    def f(x):
        return internals.structured_leaf_outputs(run_leaf(model.moe1, (x,), {}))

    torch.compile(f, backend=backend, fullgraph=True)(torch.randn(4, 8))
    assert found["fn"] is run_leaf._torchdynamo_leaf_real_fn
    assert found["out_spec"].num_leaves == 1
    assert found["out_at"] == (0,)
    assert found["n_attr_nodes"] == (2 if internals.LEAF_OUTPUTS_FLAT else 3)
    assert found["state_type"] is internals.leaf_module_state_type()
    assert found["module"] is model.moe1
    assert found["n_params"] == len(list(model.moe1.parameters()))


def test_first_compile_and_recompile_are_told_apart():
    seen = []

    def backend(gm, example_inputs):
        seen.append(internals.is_first_compile_of_frame())
        return gm.forward

    def f(x, n: int):
        return x * n

    compiled = torch.compile(f, backend=backend, dynamic=False)
    compiled(torch.randn(2), 1)
    compiled(torch.randn(2), 2)  # the int is guarded: a recompile of the same frame
    assert seen == [True, False]
    assert internals.is_first_compile_of_frame()  # outside compilation


def test_compiled_function_callback_and_the_backend_options_behind_it():
    module = torch.nn.Linear(2, 2)
    module.compile(backend="z3leaf", options={"gather": "step"})
    callback = internals.compiled_function_callback(module._compiled_call_impl)
    assert callback is not None
    chain = list(internals.backend_chain(callback))
    assert any(getattr(fn, "_leafpass_backend", False) for fn in chain), [type(fn).__name__ for fn in chain]
    options = [internals.torch_compile_options(fn) for fn in chain]
    assert {"gather": "step"} in options, options
    assert internals.compiled_function_callback(lambda: None) is None
    assert internals.torch_compile_options(object()) is None


def test_eval_frame_callback_builtin_makes_no_python_frame():
    builtin = internals.eval_frame_callback_builtin()
    assert type(builtin).__name__ == "builtin_function_or_method"
    assert builtin() == internals.eval_frame_callback()


def test_queue_end_of_backward_callback_runs_after_the_whole_backward():
    order = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2

    def hook(grad):
        order.append("hook")
        internals.queue_end_of_backward_callback(lambda: order.append(("end", x.grad is not None)))
        return grad

    y.register_hook(hook)
    y.sum().backward()
    assert order == ["hook", ("end", True)]


def test_graph_inputs_by_fake_inside_a_checkpoint_body():
    # Inside torch.utils.checkpoint Dynamo traces with a subtracer whose placeholders (lifted
    # free variables) carry no "grapharg": the root graph's inputs answer for them.
    lin = torch.nn.Linear(3, 3)
    seen = []

    @internals.leaf_function
    def scale(x, w):
        return (x * w.sum(),)  # a flat tuple of tensors: what every supported torch accepts

    @scale.register_fake
    def _scale_fake(x, w):
        seen.append(internals.graph_inputs_by_fake().get(id(w)))
        return (torch.empty_like(x),)

    def fn(x):
        return torch.utils.checkpoint.checkpoint(lambda y: scale(lin(y), lin.weight)[0], x, use_reentrant=False)

    def trace_only(gm, example_inputs):  # running the body is not what is checked here
        raise RuntimeError("traced")

    with pytest.raises(Exception, match="traced"):
        torch.compile(fn, backend=trace_only, fullgraph=True)(torch.randn(2, 3))
    assert seen and all(real is lin.weight for real in seen)


def test_next_checkpoint_graph_id_shares_the_checkpoint_ops_counter():
    first = internals.next_checkpoint_graph_id()
    assert internals.next_checkpoint_graph_id() == first + 1
    lin = torch.nn.Linear(3, 3)
    fn = lambda x: torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=False)  # noqa: E731
    torch.compile(fn, backend="aot_eager", fullgraph=True)(torch.randn(2, 3, requires_grad=True))
    # tracing the tag_activation_checkpoint op took an id from the same counter
    assert internals.next_checkpoint_graph_id() > first + 2


class _RecordingParameters(dict):
    """A module's ``_parameters`` that records ``is_compiling()`` on every read, as DeepSpeed's
    ``ZeROOrderedDict.__getitem__`` reads it (it all-gathers when False)."""

    seen: list

    def __getitem__(self, key):
        if internals.compiling_frame() is not None:  # read while Dynamo traces, not when the program runs
            type(self).seen.append(torch.compiler.is_compiling())
        return super().__getitem__(key)


def _recording_leaf_model():
    model = TwoMoE(8)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    _RecordingParameters.seen = []
    router = model.moe1.router
    router._parameters = _RecordingParameters(router._parameters)
    return model


def test_is_compiling_holds_through_dynamo_s_fake_call_of_a_leaf_and_is_let_go():
    model = _recording_leaf_model()
    torch.compile(model, backend="z3leaf", fullgraph=True, options={"inner": "eager"})(torch.randn(4, 8))
    compile_reads = list(_RecordingParameters.seen)
    assert compile_reads and all(compile_reads), compile_reads  # every read while compiling saw True
    assert not torch.compiler.is_compiling()
    assert not internals._leaf_call_flag.held


def test_is_compiling_is_let_go_when_the_compile_fails_inside_a_leaf_call():
    model = _recording_leaf_model()

    def broken(*args, **kwargs):
        raise RuntimeError("no outputs today")

    model.moe1.forward = broken
    with pytest.raises(Exception, match="no outputs today"):
        torch.compile(model, backend="z3leaf", fullgraph=True, options={"inner": "eager"})(torch.randn(4, 8))
    assert not torch.compiler.is_compiling()
    assert not internals._leaf_call_flag.held


def test_is_compiling_holds_from_the_backend_to_the_end_of_the_compile(monkeypatch):
    # torch 2.11 builds guards after the backend without the flag; leafpass holds it from
    # the backend on (a ZeRO-3 _parameters dict read by a guard would otherwise all-gather)
    from leafpass import backend

    seen = []
    inner = backend._compile_held

    def spy(*args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return inner(*args, **kwargs)

    monkeypatch.setattr(backend, "_compile_held", spy)
    model = TwoMoE(8)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    torch.compile(model, backend="z3leaf", options={"inner": "eager"})(torch.randn(4, 8))
    assert seen == [True]
    assert not torch.compiler.is_compiling() and not internals._leaf_call_flag.held
