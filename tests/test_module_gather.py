"""``gather="module"`` in one process: the passes, the ops, recompute for backward.

The distributed tests run it under real DeepSpeed; here a plan is set by hand and each
"partitioned" parameter holds a stand-in (full shape, zero strides, one element), while a
:class:`LocalBucket` hands out the full values kept aside: the graph, the order of gathers,
what backward gathers again and the gradients that reach the parameters can all be checked
without collectives.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leafpass
from leafpass.gather_ops import live_gathered
from leafpass.module_plan import ModulePlan, set_plan
from leafpass.testing.models import MoEBlock
from tests.compile_case import CompileTestCase


class Chain(nn.Module):
    """``a -> relu -> b -> MoE leaf -> c``: two modules in the first stretch, one after the leaf."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.moe = MoEBlock(d, 2, 1)
        self.c = nn.Linear(d, d)

    def forward(self, x):
        return self.c(self.moe(self.b(torch.relu(self.a(x)))))


class TiedAcrossLeaf(Chain):
    def forward(self, x):
        return F.linear(self.moe(self.a(x)), self.moe.router.weight.t().contiguous().t())


class LocalBucket:
    """Gathers from the full values the test kept aside, and logs every gather."""

    def __init__(self, params, names, counter, store, log) -> None:
        self._params, self.names, self._store, self._log = params, names, store, log
        self.dtype, self.group = params[0].dtype, None
        self.shapes = [store[id(p)].shape for p in params]
        self.numel = self.buffer_numel = sum(store[id(p)].numel() for p in params)
        self._counter = counter

    def params(self):
        return self._params

    def start(self):
        self._log.append(("start", tuple(self.names)))
        return torch.cat([self._store[id(p)].reshape(-1) for p in self._params]), None

    def finish(self, buffer, handle):
        out, offset = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(buffer[offset:offset + n].view(shape).clone())
            offset += n
        return out

    def counted(self, numel: int) -> None:
        self._counter(numel)


class LocalPlan(ModulePlan):
    def make_bucket(self, params, names):
        return LocalBucket(params, names, self.counter, self.store, self.log)


def partition(model: nn.Module, leaf_types=(MoEBlock,)):
    """Put stand-ins into every parameter outside the leaves; return the full values."""
    inside = {id(p) for m in model.modules() if isinstance(m, leaf_types) for p in m.parameters()}
    store = {}
    for p in model.parameters():
        if id(p) not in inside:
            store[id(p)] = p.detach().clone()
            p.data = torch.zeros(1, dtype=p.dtype).expand(p.shape)
    return store


def make_plan(model, store, bucket_elements=0, prefetch_distance=0, gather_ids=None):
    plan = LocalPlan(root=model, gather_ids=set(store) if gather_ids is None else gather_ids,
                     bucket_elements=bucket_elements, prefetch_distance=prefetch_distance, counter=lambda n: None)
    plan.store, plan.log = store, []
    return plan


def compile_with_plan(model, plan, inner="aot_eager"):
    compiled = torch.compile(model, backend=leafpass.make_backend(inner=inner), fullgraph=True)

    def call(*args):
        previous = set_plan(plan)
        try:
            return compiled(*args)
        finally:
            set_plan(previous)

    return call


def gathers(gm):
    return [n for n in gm.graph.nodes if n.target == torch.ops.leafpass.gather_start.default]


class TestModuleGather(CompileTestCase):
    def setUp(self):
        super().setUp()
        torch.manual_seed(0)
        self.reference = Chain()
        leafpass.set_z3_leaf_modules(self.reference, [MoEBlock])
        self.model = copy.deepcopy(self.reference)
        self.store = partition(self.model)
        self.x = torch.randn(6, 8)

    def run_both(self, plan, inner="aot_eager"):
        with leafpass.record_graphs() as rec:
            out = compile_with_plan(self.model, plan, inner)(self.x)
        ref = self.reference(self.x)
        return rec.graphs, out, ref

    def test_one_gather_per_module_at_first_use(self):
        plan = make_plan(self.model, self.store)
        graphs, out, ref = self.run_both(plan)
        self.assertEqual(len(graphs), 1)
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = gather_start [a.weight, a.bias] (72 elements)
t1 = gather_wait t0
t2 = getitem(t1, 0)
t3 = getitem(t1, 1)
t4 = torch._C._nn.linear(x, t2, t3)
t5 = torch.relu(t4)
t6 = gather_start [b.weight, b.bias] (72 elements)
t7 = gather_wait t6
t8 = getitem(t7, 0)
t9 = getitem(t7, 1)
t10 = torch._C._nn.linear(t5, t8, t9)
prefetch_all moe (9 params)
t11 = moe(t10)
t12 = gather_start [c.weight, c.bias] (72 elements)
t13 = gather_wait t12
t14 = getitem(t13, 0)
t15 = getitem(t13, 1)
t16 = torch._C._nn.linear(t11, t14, t15)
return (t16,)
""")
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)

    def test_gradients_reach_the_parameters_and_backward_gathers_again(self):
        plan = make_plan(self.model, self.store)
        _, out, ref = self.run_both(plan)
        forward_gathers = list(plan.log)
        self.assertEqual([names for _, names in forward_gathers],
                         [("a.weight", "a.bias"), ("b.weight", "b.bias"), ("c.weight", "c.bias")])
        # nothing gathered is kept for backward: each gathered weight was freed after its last use
        self.assertEqual(live_gathered.live, 0)
        plan.log.clear()
        out.square().sum().backward()
        ref.square().sum().backward()
        # backward needs b's and c's weights (to pass the gradient on), not a's (x needs none)
        self.assertEqual(sorted(names for _, names in plan.log), [("b.weight", "b.bias"), ("c.weight", "c.bias")])
        for (name, p), q in zip(self.model.named_parameters(), self.reference.parameters()):
            self.assertIsNotNone(p.grad, name)
            self.assertEqual(p.grad.shape, q.shape, name)
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
            if id(p) in self.store:  # a stand-in's gradient is an ordinary contiguous tensor
                self.assertTrue(p.grad.is_contiguous(), name)
        self.assertEqual(live_gathered.live, 0)

    def test_buckets_merge_adjacent_gathers_and_prefetch_starts_early(self):
        plan = make_plan(self.model, self.store, bucket_elements=1000, prefetch_distance=1)
        graphs, out, ref = self.run_both(plan)
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = gather_start [a.weight, a.bias, b.weight, b.bias] (144 elements)
t1 = gather_wait t0
prefetch_start moe
t2 = getitem(t1, 0)
t3 = getitem(t1, 1)
t4 = getitem(t1, 2)
t5 = getitem(t1, 3)
t6 = torch._C._nn.linear(x, t2, t3)
t7 = torch.relu(t6)
t8 = torch._C._nn.linear(t7, t4, t5)
prefetch_all moe (9 params)
t9 = moe(t8)
t10 = gather_start [c.weight, c.bias] (72 elements)
t11 = gather_wait t10
t12 = getitem(t11, 0)
t13 = getitem(t11, 1)
t14 = torch._C._nn.linear(t9, t12, t13)
return (t14,)
""")
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)

    def test_a_bucket_limit_below_two_modules_keeps_them_apart(self):
        plan = make_plan(self.model, self.store, bucket_elements=143)
        graphs, _, _ = self.run_both(plan)
        self.assertEqual([len(n.args[0]) for n in gathers(graphs[0])], [2, 2, 2])

    def test_prefetch_distance_moves_the_next_start_after_the_previous_wait(self):
        plan = make_plan(self.model, self.store, bucket_elements=0, prefetch_distance=1)
        graphs, out, ref = self.run_both(plan)
        order = [n for n in graphs[0].graph.nodes if n.op == "call_function"
                 and n.target in (torch.ops.leafpass.gather_start.default, torch.ops.leafpass.gather_wait.default,
                                  torch.ops.leafpass.prefetch_start.default)]
        kinds = [n.target._opname for n in order]
        # start a, wait a, start b (while a computes), prefetch_start moe after b's wait; c alone
        self.assertEqual(kinds, ["gather_start", "gather_wait", "gather_start", "gather_wait", "prefetch_start",
                                 "gather_start", "gather_wait"])
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)

    def test_inductor_inner_compiles_the_gathers_and_recomputes_them(self):
        plan = make_plan(self.model, self.store, bucket_elements=1000)
        _, out, ref = self.run_both(plan, inner="inductor")
        self.assertEqual(live_gathered.live, 0)
        plan.log.clear()
        out.sum().backward()
        ref.sum().backward()
        self.assertTrue(plan.log, "backward gathered nothing again")
        for (name, p), q in zip(self.model.named_parameters(), self.reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5, msg=name)

    def test_a_parameter_shared_across_a_leaf_boundary_is_refused_by_name(self):
        torch.manual_seed(0)
        model = TiedAcrossLeaf()
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        store = partition(model)
        router = model.moe.router.weight
        store[id(router)] = router.detach().clone()
        plan = make_plan(model, store)
        with pytest.raises(Exception, match=r"gather='module' cannot gather parameter 'moe.router.weight': it is "
                                            r"used both by a leaf and by ordinary ops"):
            compile_with_plan(model, plan)(torch.randn(6, 8))
