"""The passes on small hand-built graphs, their contracts, and the prefetch op itself."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import leafpass
from leafpass.leaf_call import META_KEY, LeafCall, qualname_from_source
from leafpass.ops import register_leaf
from leafpass.passes import PassOrderError, insert_prefetch_pass, run_passes
from leafpass.testing.models import MoEBlock, TwoMoE
from leafpass.testing.recording import RecordingRuntime
from tests.compile_case import CompileTestCase


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return bool(getattr(m, "_z3_leaf", False)) or super().is_leaf_module(m, qualname)


def hand_built_graph(model):
    """A GraphModule whose leaf calls are call_modules carrying LeafCall, as the first pass leaves them."""
    graph = LeafTracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and getattr(gm.get_submodule(node.target), "_z3_leaf", False):
            leaf = gm.get_submodule(node.target)
            with gm.graph.inserting_before(node):
                params = [gm.graph.get_attr(f"{node.target}.{name}") for name, _ in leaf.named_parameters()]
            node.meta[META_KEY] = LeafCall(node.target, leaf, params)
    gm.recompile()
    return gm


class TestInsertPrefetch(CompileTestCase):
    def test_one_prefetch_per_leaf_call_on_a_hand_built_graph(self):
        model = TwoMoE(4, n_experts=2, top_k=1)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        gm = insert_prefetch_pass(hand_built_graph(model))
        text = leafpass.format_graph(gm)
        self.assertExpectedInline(text, """\
inputs: x
t0 = inp(x)  # not a leaf
prefetch_all moe1 (9 params)
t1 = moe1(t0)
t2 = mid(t1)  # not a leaf
prefetch_all moe2 (9 params)
t3 = moe2(t2)
return t3
""")
        self.assertEqual(text.count("prefetch_all"), 2)

    def test_prefetch_comes_before_its_call(self):
        model = TwoMoE(4, n_experts=2, top_k=1)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        gm = insert_prefetch_pass(hand_built_graph(model))
        for node in gm.graph.nodes:
            if node.op == "call_module" and META_KEY in node.meta:
                self.assertEqual(node.prev.target, torch.ops.leafpass.prefetch_all.default)
                self.assertEqual(node.prev.args[1], node.target)

    def test_running_twice_is_refused(self):
        model = TwoMoE(4, n_experts=2, top_k=1)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        gm = insert_prefetch_pass(hand_built_graph(model))
        with self.assertRaisesRegex(AssertionError, "already has a prefetch_all"):
            insert_prefetch_pass(gm)


def test_pipeline_in_the_wrong_order_fails_loudly():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(PassOrderError, match="'insert_prefetch' requires \\['leaf_call_modules'\\]"):
        run_passes(gm, ["insert_prefetch"])
    with pytest.raises(ValueError, match="unknown leafpass pass 'fuse'"):
        run_passes(gm, ["fuse"])


@pytest.mark.parametrize(
    "source, qualname",
    [
        ("L['self']._modules['blocks']._modules['0']._parameters['w']", "blocks.0.w"),
        ("L['self'].moe1", "moe1"),
        ("L['self'].blocks[3].moe", "blocks.3.moe"),
        ("L['x']", "x"),
        ("L['net']._modules['moe']", "net.moe"),
        # DeepSpeed's parameter dict is a dict subclass that Dynamo reads through dict.__getitem__
        ("dict.__getitem__(L['self']._modules['inp'].__dict__['_parameters'], 'weight')", "inp.weight"),
    ],
)
def test_qualname_from_source(source, qualname):
    assert qualname_from_source(source) == qualname


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_prefetch_op_survives_compilers_when_it_lands_in_a_compiled_graph(backend):
    """Returns nothing, so only its ORDERED effect keeps it alive through DCE,
    functionalization, aot_autograd and inductor."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(4, 4)
    leaf_id = register_leaf(lin)

    def f(x, w, b):
        torch.ops.leafpass.prefetch_all([w, b], "lin", leaf_id)
        return (x * 2).sum()

    x = torch.randn(3, 4, requires_grad=True)
    runtime = RecordingRuntime()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    with leafpass.use_runtime(runtime):
        for _ in range(3):
            compiled(x, lin.weight, lin.bias).backward()
    assert len(runtime.calls) == 3
    assert all(leaf is lin for leaf in runtime.leaves())
    assert [p.shape for p in runtime.calls[0][1]] == [lin.weight.shape, lin.bias.shape]


def test_prefetch_of_a_dead_leaf_says_what_to_do():
    lin = torch.nn.Linear(2, 2)
    leaf_id = register_leaf(lin)
    params = list(lin.parameters())
    del lin
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists.*torch._dynamo.reset"):
        torch.ops.leafpass.prefetch_all(params, "lin", leaf_id)
