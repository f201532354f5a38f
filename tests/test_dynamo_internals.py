"""Each private torch API in leafpass/dynamo_internals.py, checked directly.

If a torch upgrade changes one of them, a test here fails by name, before the
symptoms spread to the backend's tests.
"""

from __future__ import annotations

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
    internals.check_torch_version("2.13.0+cpu")
    internals.check_torch_version("2.14.1")
    with pytest.raises(RuntimeError, match=r">=2.13,<2.15 .*found torch 2.16.0"):
        internals.check_torch_version("2.16.0")


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
                fn, out_spec = internals.leaf_callable_parts(getattr(gm, node.args[0].target))
                input_spec = getattr(gm, node.args[2].target)
                (state, args, kwargs), _ = pytree.tree_unflatten(list(node.args[4:]), input_spec)
                found.update(
                    fn=fn,
                    out_spec=out_spec,
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
        return run_leaf(model.moe1, (x,), {})

    torch.compile(f, backend=backend, fullgraph=True)(torch.randn(4, 8))
    assert found["fn"] is run_leaf._torchdynamo_leaf_real_fn
    assert found["out_spec"].num_leaves == 1
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
        return x * w.sum()

    @scale.register_fake
    def _scale_fake(x, w):
        seen.append(internals.graph_inputs_by_fake().get(id(w)))
        return torch.empty_like(x)

    def fn(x):
        return torch.utils.checkpoint.checkpoint(lambda y: scale(lin(y), lin.weight), x, use_reentrant=False)

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
