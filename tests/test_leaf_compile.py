"""``options={"leaf_compile": "inner"}``: each leaf's forward runs compiled inside its eager
module call, while the outer graph keeps the leaf opaque (one ``prefetch_all`` and one
``call_module`` per leaf call). Parity with eager, hooks still eager, no recompile storm as
routing changes, and the option's error. The DeepSpeed ZeRO-3 case is in
``tests/distributed/test_gather_policies.py`` (``module_leaf_compile``)."""

from __future__ import annotations

import copy

import pytest
import torch

import leafpass
from leafpass.leaf_compile import leaf_compile_stats
from leafpass.testing.models import MoEBlock, TwoMoE

MOE = "leafpass.testing.models.MoEBlock"
TOKEN_COUNTS = (6, 9, 7, 12, 5, 10)


def flagged(seed: int = 0) -> TwoMoE:
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = TwoMoE(16, n_experts=4, top_k=2)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    return model


def test_leaf_compile_value_is_checked_and_named():
    with pytest.raises(ValueError, match=r"'leaf_compile' must be one of \['off', 'inner'\]; got 'on'"):
        leafpass.make_backend(leaf_compile="on")
    with pytest.raises(Exception, match=r"'leaf_compile' must be one of"):
        torch.compile(flagged(), backend="z3leaf", options={"leaf_compile": True})(torch.randn(4, 16))


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_compiled_leaves_match_eager_over_changing_token_counts(inner):
    model = flagged()
    reference = copy.deepcopy(model)
    before = leaf_compile_stats().get(MOE, 0)
    compiled = torch.compile(model, backend="z3leaf", options={"inner": inner, "leaf_compile": "inner"})
    with leafpass.record_graphs() as rec:
        for n in TOKEN_COUNTS:
            x = torch.randn(n, 16)
            out = compiled(x)
            out.square().sum().backward()
            expected = reference(x)
            expected.square().sum().backward()
            torch.testing.assert_close(out, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # the leaves' forwards went through their own compile ...
    assert leaf_compile_stats().get(MOE, 0) > before
    # ... while the outer graph kept them opaque, each with its prefetch_all
    text = leafpass.format_graph(rec.graphs[0])
    assert text.count("prefetch_all moe") == 2 and "= moe1(" in text and "= moe2(" in text, text
    # the swap does not outlive the call
    assert "forward" not in model.moe1.__dict__ and "forward" not in model.moe2.__dict__


def test_no_recompile_storm_as_token_counts_and_routing_change():
    model = flagged(seed=1)
    compiled = torch.compile(model, backend="z3leaf", options={"inner": "aot_eager", "leaf_compile": "inner"})
    compiled(torch.randn(TOKEN_COUNTS[0], 16)).sum().backward()
    compiled(torch.randn(TOKEN_COUNTS[1], 16)).sum().backward()  # sizes seen twice: dynamic from here
    after_two = leaf_compile_stats()[MOE]
    for n in TOKEN_COUNTS[2:]:
        compiled(torch.randn(n, 16)).sum().backward()
    assert leaf_compile_stats()[MOE] == after_two


def test_the_leafs_module_hooks_still_run_eagerly_around_the_compiled_forward():
    """Engines (DeepSpeed ZeRO-3) gather a leaf in its pre-forward hook and hang backward
    bookkeeping on its outputs in the post-forward hook: those must fire on every call."""
    model = flagged()
    calls = []
    model.moe1.register_forward_pre_hook(lambda m, args: calls.append(("pre", torch.compiler.is_compiling())))
    model.moe1.register_forward_hook(lambda m, args, out: calls.append(("post", torch.compiler.is_compiling())))
    compiled = torch.compile(model, backend="z3leaf", options={"inner": "aot_eager", "leaf_compile": "inner"})
    for n in TOKEN_COUNTS[:3]:
        compiled(torch.randn(n, 16))
    assert calls == [("pre", False), ("post", False)] * 3


def test_off_runs_the_leaf_forward_eagerly():
    model = flagged()
    before = dict(leaf_compile_stats())
    seen = []
    original = MoEBlock.forward

    def spy(self, x):
        seen.append(torch.compiler.is_compiling())
        return original(self, x)

    model.moe1.forward = spy.__get__(model.moe1)  # a per-instance forward is never swapped out
    compiled = torch.compile(model, backend="z3leaf", options={"inner": "aot_eager", "leaf_compile": "off"})
    compiled(torch.randn(6, 16))
    assert seen.count(False) == 1  # the run (shape inference calls it while compiling)
    assert leaf_compile_stats() == before
