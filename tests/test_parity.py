"""Compiled with z3leaf == eager: outputs and every parameter gradient, every inner compiler."""

from __future__ import annotations

import copy

import pytest
import torch

import leafpass
from leafpass.testing.models import ManyTinyBlock, ManyTinyModel, MoEBlock, TwoMoE
from tests.compile_case import CompileTestCase
from tests.models import KwargsLeaf, KwargsModel, TiedInside, TiedModel, Twice


def counting_aot_eager():
    from torch._dynamo.backends.registry import lookup_backend

    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    backend.seen = seen
    return backend


class TestParity(CompileTestCase):
    def moe(self):
        model = TwoMoE(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        return model

    def test_inner_aot_eager(self):
        self.assert_matches_eager(self.moe(), lambda s: (torch.randn(6 + s, 8),), inner="aot_eager")

    def test_inner_inductor(self):
        self.assert_matches_eager(self.moe(), lambda s: (torch.randn(6, 8),), inner="inductor")

    def test_inner_eager(self):
        self.assert_matches_eager(self.moe(), lambda s: (torch.randn(6, 8),), inner="eager")

    def test_inner_callable_receives_only_non_leaf_pieces(self):
        inner = counting_aot_eager()
        self.assert_matches_eager(self.moe(), lambda s: (torch.randn(6, 8),), inner=inner)
        # linear before moe1, linear between the leaves; nothing after moe2
        self.assertEqual(len(inner.seen), 2)
        for gm in inner.seen:
            self.assertFalse(any(n.op == "call_module" for n in gm.graph.nodes))

    def test_routing_changes_every_step(self):
        model = self.moe()
        seen = []
        inputs = [torch.randn(8, 8) * (1 + s) for s in range(4)]
        self.assert_matches_eager(model, lambda s: (inputs[s],), steps=4)
        for s in range(4):
            model(inputs[s])
            seen.append(tuple(model.moe1.last_expert_tokens))
        self.assertGreater(len(set(seen)), 1, "inputs did not change the routing")

    def test_no_grad(self):
        model = self.moe()
        compiled = self.compile(model, fullgraph=True)
        with torch.no_grad():
            for s in range(2):
                x = torch.randn(6, 8)
                torch.testing.assert_close(compiled(x), model(x))

    def test_leaf_entered_twice(self):
        model = Twice(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        self.assert_matches_eager(model, lambda s: (torch.randn(6, 8),))

    def test_kwargs_and_structured_output(self):
        model = KwargsModel(8)
        leafpass.set_z3_leaf_modules(model, [KwargsLeaf])
        self.assert_matches_eager(model, lambda s: (torch.randn(6, 8), (torch.rand(6, 8) > 0.3).float()))

    def test_tied_parameters(self):
        model = TiedModel(8)
        leafpass.set_z3_leaf_modules(model, [TiedInside])
        self.assert_matches_eager(model, lambda s: (torch.randn(6, 8),), inner="inductor")

    def test_fine_grained(self):
        model = ManyTinyModel(8, 200)
        leafpass.set_z3_leaf_modules(model, [ManyTinyBlock])
        self.assert_matches_eager(model, lambda s: (torch.randn(6, 8),), inner="inductor", steps=2)

    def test_changing_batch_size_goes_dynamic_without_breaking(self):
        model = self.moe()
        ref = copy.deepcopy(model)
        compiled = self.compile(model, fullgraph=True)
        with leafpass.record_graphs() as rec:
            for n in (6, 10, 7, 3):
                x = torch.randn(n, 8)
                torch.testing.assert_close(compiled(x), ref(x))
        self.assertLessEqual(len(rec.graphs), 2)  # static, then one dynamic graph
        for gm in rec.graphs:
            self.assertEqual([n.target for n in gm.graph.nodes if n.op == "call_module"], ["moe1", "moe2"])

    def test_prefetch_runs_once_per_leaf_call_before_forward_pre_hooks(self):
        from leafpass.testing.recording import RecordingRuntime

        model = Twice(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        events = []
        runtime = RecordingRuntime()
        original = runtime.prefetch_all
        runtime.prefetch_all = lambda leaf, params: (events.append(("prefetch", len(params))), original(leaf, params))
        model.moe.register_forward_pre_hook(lambda mod, args: events.append(("pre_hook", None)))
        compiled = self.compile(model, fullgraph=True)
        with leafpass.use_runtime(runtime):
            compiled(torch.randn(6, 8))
        n = len(list(model.moe.parameters()))
        self.assertEqual(events, [("prefetch", n), ("pre_hook", None)] * 2)
        self.assertTrue(all(leaf is model.moe for leaf in runtime.leaves()))
        params = runtime.calls[0][1]
        self.assertEqual([id(p) for p in params], [id(p) for p in model.moe.parameters()])
        self.assertTrue(all(isinstance(p, torch.nn.Parameter) for p in params))


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_sgd_steps_match_eager(inner):
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = TwoMoE(8)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="z3leaf", options={"inner": inner}, fullgraph=True)
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(4):
        x = torch.randn(8, 8)
        loss, loss_ref = compiled(x).pow(2).mean(), ref(x).pow(2).mean()
        loss.backward(), loss_ref.backward()
        opt.step(), opt_ref.step()
        opt.zero_grad(), opt_ref.zero_grad()
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


class KeepPositiveRows(torch.nn.Module):
    """A leaf whose output rows depend on values: not a valid leaf."""

    def __init__(self, branch: bool):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.branch = branch

    def forward(self, x):
        y = self.lin(x)
        keep = y.sum(-1) > 0
        if self.branch and keep.sum() == 0:  # a Python branch on data: fake tensors cannot run it
            return y[:0]
        return y[keep]


class KeepModel(torch.nn.Module):
    def __init__(self, branch: bool):
        super().__init__()
        self.keep = KeepPositiveRows(branch)

    def forward(self, x):
        return self.keep(x).relu().sum(0)


class TestLeafOutputContract(CompileTestCase):
    def test_value_dependent_output_size_is_refused_at_compile_time(self):
        model = KeepModel(branch=False)
        leafpass.set_z3_leaf_modules(model, [KeepPositiveRows])
        with self.assertRaisesRegex(Exception, r"KeepPositiveRows returns a tensor whose size depends on its input values"):
            self.compile(model, fullgraph=True)(torch.randn(16, 8))

    def test_value_dependent_output_size_found_at_run_time_names_the_leaf(self):
        # with the data-dependent branch, shapes come from a run on zeros (0 rows kept)
        model = KeepModel(branch=True)
        leafpass.set_z3_leaf_modules(model, [KeepPositiveRows])
        compiled = self.compile(model, fullgraph=True)
        with self.assertRaisesRegex(leafpass.LeafShapeError, r"leaf keep returned .* shape \(\d+, 8\) where .*\(0, 8\)"):
            compiled(torch.randn(16, 8) + 1)
