"""Snapshots of the graphs leafpass produces, with structural checks beside them.

A snapshot changes only on purpose: read the diff, accept with EXPECTTEST_ACCEPT=1,
commit it alone and say why.
"""

from __future__ import annotations

import torch

import leafpass
from leafpass.testing.models import ManyTinyBlock, ManyTinyModel, MoEBlock, TwoMoE
from tests.compile_case import CompileTestCase
from tests.models import KwargsLeaf, KwargsModel, Nested, TiedInside, TiedModel, Twice


def leaf_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module"]


def prefetches(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.leafpass.prefetch_all.default]


class TestSnapshots(CompileTestCase):
    def check_structure(self, gm, expected_leaves):
        calls = leaf_calls(gm)
        self.assertEqual([n.target for n in calls], expected_leaves)
        for call in calls:
            leaf = gm.get_submodule(call.target)
            n_params = len(list(leaf.parameters()))
            if n_params == 0:
                self.assertFalse(call.prev.target == torch.ops.leafpass.prefetch_all.default)
                continue
            prefetch = call.prev
            self.assertEqual(prefetch.target, torch.ops.leafpass.prefetch_all.default, f"no prefetch right before {call.target}")
            self.assertEqual(prefetch.args[1], call.target)
            self.assertEqual(len(prefetch.args[0]), n_params)
            self.assertEqual(len(set(prefetch.args[0])), n_params, "a parameter is prefetched twice")
        self.assertEqual(len(prefetches(gm)), sum(1 for c in calls if len(list(gm.get_submodule(c.target).parameters()))))
        no_invoke = [n for n in gm.graph.nodes if "invoke_leaf_function" in str(n.target)]
        self.assertEqual(no_invoke, [])

    def test_two_moe_leaves(self):
        model = TwoMoE(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        graphs, _ = self.graphs_of(model, torch.randn(6, 8))
        self.assertEqual(len(graphs), 1)
        self.check_structure(graphs[0], ["moe1", "moe2"])
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = torch._C._nn.linear(x, inp.weight, inp.bias)
prefetch_all moe1 (17 params)
t1 = moe1(t0)
t2 = torch._C._nn.linear(t1, mid.weight, mid.bias)
prefetch_all moe2 (17 params)
t3 = moe2(t2)
return (t3,)
""")

    def test_nested_leaves_outermost_wins(self):
        model = Nested(8)
        leafpass.set_z3_leaf_modules(model, ["Sequential", MoEBlock])
        self.assertTrue(model.outer[1]._z3_leaf)
        graphs, _ = self.graphs_of(model, torch.randn(6, 8))
        self.check_structure(graphs[0], ["outer"])
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = torch._C._nn.linear(x, inp.weight, inp.bias)
prefetch_all outer (19 params)
t1 = outer(t0)
t2 = torch._C._nn.linear(t1, out.weight, out.bias)
return (t2,)
""")

    def test_leaf_entered_twice(self):
        model = Twice(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        graphs, _ = self.graphs_of(model, torch.randn(6, 8))
        self.check_structure(graphs[0], ["moe", "moe"])
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
prefetch_all moe (17 params)
t0 = moe(x)
t1 = torch._C._nn.linear(t0, mid.weight, mid.bias)
prefetch_all moe (17 params)
t2 = moe(t1)
return (t2,)
""")

    def test_leaf_with_kwargs_and_tensor_dict_output(self):
        model = KwargsModel(8)
        leafpass.set_z3_leaf_modules(model, [KwargsLeaf])
        graphs, _ = self.graphs_of(model, torch.randn(6, 8), torch.ones(6, 8))
        self.check_structure(graphs[0], ["block"])
        call = leaf_calls(graphs[0])[0]
        self.assertEqual(set(call.kwargs), {"scale", "mask"})
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x, mask
t0 = torch._C._nn.linear(x, inp.weight, inp.bias)
prefetch_all block (19 params)
t1 = block(t0, scale=0.5, mask=mask)
t2 = getitem(t1, 0)
t3 = getitem(t1, 1)
t4 = getitem(t3, 'gate')
t5 = getitem(t3, 'aux')
t6 = _operator.mul(t2, t4)
t7 = _operator.add(t6, t5)
return (t7,)
""")

    def test_fine_grained_leaf_of_200_submodules(self):
        model = ManyTinyModel(8, 200)
        leafpass.set_z3_leaf_modules(model, [ManyTinyBlock])
        graphs, _ = self.graphs_of(model, torch.randn(6, 8))
        self.check_structure(graphs[0], ["block"])
        self.assertEqual(len(prefetches(graphs[0])[0].args[0]), 400)
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = torch._C._nn.linear(x, inp.weight, inp.bias)
prefetch_all block (400 params)
t1 = block(t0)
t2 = torch._C._nn.linear(t1, out.weight, out.bias)
return (t2,)
""")

    def test_tied_parameters(self):
        model = TiedModel(8)
        leafpass.set_z3_leaf_modules(model, [TiedInside])
        graphs, _ = self.graphs_of(model, torch.randn(6, 8))
        self.check_structure(graphs[0], ["leaf"])
        # the weight shared by leaf.a, leaf.b and head is prefetched once, and head uses the same input
        prefetch = prefetches(graphs[0])[0]
        self.assertEqual(len(prefetch.args[0]), 3)
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = torch._C._nn.linear(x, inp.weight, inp.bias)
prefetch_all leaf (3 params)
t1 = leaf(t0)
t2 = torch._C._nn.linear(t1, leaf.a.weight, head.bias)
return (t2,)
""")

    def test_leaf_without_parameters_gets_no_prefetch(self):
        class NoParams(torch.nn.Module):
            def forward(self, x):
                idx = (x > 0).nonzero()
                return x * (idx.numel() > 0)

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 8)
                self.free = NoParams()

            def forward(self, x):
                return self.free(self.lin(x))

        model = Model()
        leafpass.set_z3_leaf_modules(model, [NoParams])
        graphs, _ = self.graphs_of(model, torch.randn(6, 8))
        self.check_structure(graphs[0], ["free"])
        self.assertEqual(prefetches(graphs[0]), [])
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = torch._C._nn.linear(x, lin.weight, lin.bias)
t1 = free(t0)
return (t1,)
""")

    def test_format_is_stable_between_identical_compiles(self):
        texts = []
        for _ in range(2):
            torch._dynamo.reset()
            model = TwoMoE(8)
            leafpass.set_z3_leaf_modules(model, [MoEBlock])
            graphs, _ = self.graphs_of(model, torch.randn(6, 8))
            texts.append(leafpass.format_graph(graphs[0]))
        self.assertEqual(texts[0], texts[1])
        self.assertNotRegex(texts[0], r"0x[0-9a-f]+|/|\\.py")


if __name__ == "__main__":
    from torch.testing._internal.common_utils import run_tests

    run_tests()
