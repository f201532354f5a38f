"""Activation checkpointing around leaves: ``torch.utils.checkpoint`` (reentrant or not) and
transformers' ``gradient_checkpointing_enable``.

Dynamo records a checkpointed call as one ``tag_activation_checkpoint`` op with a body
graph; leafpass inlines bodies that call a leaf (``passes.inline_checkpoint``): the other
ops keep checkpoint's recompute tags for the inner compiler's partitioner, and the leaf
piece runs under non-reentrant checkpoint, so backward runs the leaf again. What is
checked, against the eager model with the same checkpointing:

* loss/output and every gradient, one graph, no graph break, one ``call_module`` per
  leaf call with one ``prefetch_all`` right before it, nothing left in a checkpoint body;
* the leaf really runs again in backward (forward calls and prefetches counted), and the
  partitioner really recomputes the region's other ops (the backward graph holds them);
* snapshots of a checkpointed leaf's graph;
* regions without a leaf stay as Dynamo made them; nested regions; a selective
  checkpointing policy around a leaf is refused by name.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.utils.checkpoint as checkpoint_utils
from torch import nn

import leafpass
from leafpass.testing.models import MoEBlock
from leafpass.testing.recording import RecordingRuntime
from tests.compile_case import CompileTestCase, assert_same_grads

PREFETCH = torch.ops.leafpass.prefetch_all.default
D = 8


class Block(nn.Module):
    """``x + lin(moe(norm(x)))``: a residual block whose middle is a leaf."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.moe = MoEBlock(d)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(self.moe(self.norm(x)))


class Checkpointed(nn.Module):
    """``inp -> checkpoint(block) -> out``."""

    def __init__(self, use_reentrant: bool, d: int = D) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.inp = nn.Linear(d, d)
        self.block = Block(d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = checkpoint_utils.checkpoint(self.block, self.inp(x), use_reentrant=self.use_reentrant)
        return self.out(h)


class TwoCheckpointed(nn.Module):
    """Two checkpointed blocks in a row, the second nested in a checkpoint of its own."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.first = Block(d)
        self.second = Block(d)

    def _second(self, h):
        return checkpoint_utils.checkpoint(self.second, h, use_reentrant=False) * 2

    def forward(self, x):
        h = checkpoint_utils.checkpoint(self.first, x, use_reentrant=False)
        return checkpoint_utils.checkpoint(self._second, h, use_reentrant=False)


class LeafOutsideRegion(nn.Module):
    """A checkpointed MLP without a leaf, then a leaf."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.moe = MoEBlock(d)

    def forward(self, x):
        return self.moe(checkpoint_utils.checkpoint(self.mlp, x, use_reentrant=False))


def _leaf_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module"]


def _hop_nodes(gm, name):
    return [n for n in gm.graph.nodes if name in str(n.target)]


class TestCheckpointedLeaf(CompileTestCase):
    def check_graph(self, gm, leaves, regions_left=0):
        calls = _leaf_nodes(gm)
        self.assertEqual([c.target for c in calls], leaves)
        for call in calls:
            self.assertIs(call.prev.target, PREFETCH, f"no prefetch_all right before {call.target}")
            self.assertEqual(len(call.prev.args[0]), len(list(gm.get_submodule(call.target).parameters())))
        self.assertEqual(len([n for n in gm.graph.nodes if n.target is PREFETCH]), len(calls))
        self.assertEqual(len(_hop_nodes(gm, "tag_activation_checkpoint")), regions_left)
        self.assertEqual(_hop_nodes(gm, "invoke_leaf_function"), [])

    def run_parity(self, model, make_input, leaves, inner="aot_eager", steps=3, regions_left=0):
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        with leafpass.record_graphs() as rec:
            self.assert_matches_eager(model, lambda step: (make_input(step),), inner=inner, steps=steps)
        self.assertEqual(len(rec.graphs), 1, "a recompile or a graph break")
        self.assertEqual(dict(torch._dynamo.utils.counters["graph_break"]), {})
        self.check_graph(rec.graphs[0], leaves, regions_left)
        return rec.graphs[0]

    def test_non_reentrant_checkpoint_around_a_leaf(self):
        self.run_parity(Checkpointed(use_reentrant=False), lambda s: torch.randn(6, D), ["block.moe"])

    def test_reentrant_checkpoint_around_a_leaf(self):
        # Dynamo traces reentrant checkpoint into the same op (non-reentrant semantics): no break
        self.run_parity(Checkpointed(use_reentrant=True), lambda s: torch.randn(6, D), ["block.moe"])

    def test_inductor(self):
        self.run_parity(Checkpointed(use_reentrant=False), lambda s: torch.randn(6, D), ["block.moe"],
                        inner="inductor", steps=2)

    def test_nested_and_consecutive_regions(self):
        self.run_parity(TwoCheckpointed(), lambda s: torch.randn(6, D), ["first.moe", "second.moe"])

    def test_region_without_a_leaf_is_left_to_dynamo(self):
        self.run_parity(LeafOutsideRegion(), lambda s: torch.randn(6, D), ["moe"], regions_left=1)

    def test_region_ops_carry_recompute_tags_and_the_leaf_its_region(self):
        from torch.utils.checkpoint import CheckpointPolicy

        from leafpass.passes.inline_checkpoint import checkpoint_region_of

        model = Checkpointed(use_reentrant=False)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        graphs, _ = self.graphs_of(model, torch.randn(6, D))
        ops = [n for n in graphs[0].graph.nodes if n.op in ("call_function", "call_module", "call_method")]
        inside = [n for n in ops if checkpoint_region_of(n) is not None]
        # layer_norm, the leaf, lin, add: the region; inp and out outside it
        self.assertEqual([n.op for n in inside], ["call_function", "call_module", "call_function", "call_function"])
        self.assertEqual(len({checkpoint_region_of(n) for n in inside}), 1)
        leaf, others = inside[1], [inside[0], *inside[2:]]
        self.assertNotIn("recompute", leaf.meta)  # the leaf is recomputed by running it again
        for n in others:
            self.assertEqual(n.meta["recompute"], CheckpointPolicy.PREFER_RECOMPUTE)
            self.assertEqual(n.meta["ac_graph_id"], checkpoint_region_of(leaf).graph_id)
        outside = [n for n in ops if checkpoint_region_of(n) is None and n.target is not PREFETCH]
        self.assertEqual(len(outside), 2)
        self.assertTrue(all("recompute" not in n.meta for n in outside))

    def test_leaf_runs_again_in_backward(self):
        def count_runs(model):
            # a pre-hook: the recomputation stops once it has what backward needs (checkpoint's
            # early stop, as in eager), so the leaf is entered again but may not return
            runs = []
            model.block.moe.register_forward_pre_hook(lambda m, args: runs.append(torch.is_grad_enabled()))
            return runs

        model = Checkpointed(use_reentrant=False)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        reference = copy.deepcopy(model)
        runs, reference_runs = count_runs(model), count_runs(reference)
        recorder = RecordingRuntime()
        compiled = self.compile(model, fullgraph=True)
        x = torch.randn(6, D)
        with leafpass.use_runtime(recorder):
            out = compiled(x)
            self.assertEqual(len(runs), 1)
            self.assertEqual(len(recorder.calls), 1)
            out.sum().backward()
        reference(x).sum().backward()
        self.assertEqual(len(runs), 2, "the leaf's forward did not run again in backward")
        self.assertEqual(runs, reference_runs)  # as eager checkpointing: entered once, then once more
        self.assertEqual(recorder.leaves(), [model.block.moe] * 2, "prefetch_all did not run again")
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)

        # without checkpoint the leaf runs once
        runs.clear()
        plain = self.compile(model.block, fullgraph=True)
        plain(x).sum().backward()
        self.assertEqual(len(runs), 1)

    def test_no_grad_runs_the_leaf_once(self):
        model = Checkpointed(use_reentrant=False)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        runs = []
        model.block.moe.register_forward_pre_hook(lambda *a: runs.append(1))
        compiled = self.compile(model, fullgraph=True)
        with torch.no_grad():
            compiled(torch.randn(6, D))
        self.assertEqual(len(runs), 1)

    def test_partitioner_recomputes_the_region_around_the_leaf(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def capturing(graphs):
            def inner(gm, example_inputs):
                def keep(kind):
                    def compiler(g, _inputs):
                        graphs.append((kind, g))
                        return make_boxed_func(g.forward)
                    return compiler
                return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))(gm, example_inputs)
            return inner

        def backward_ops(model):
            torch._dynamo.reset()
            graphs = []
            compiled = self.compile(model, inner=capturing(graphs), fullgraph=True)
            compiled(torch.randn(6, D)).sum().backward()
            return [str(n.target) for kind, g in graphs if kind == "bw" for n in g.graph.nodes]

        checkpointed = Checkpointed(use_reentrant=False)
        leafpass.set_z3_leaf_modules(checkpointed, [MoEBlock])
        plain = copy.deepcopy(checkpointed)
        plain.forward = lambda x: plain.out(plain.block(plain.inp(x)))
        # the layer norm inside the region runs again in backward; outside one, it does not
        self.assertIn("aten.native_layer_norm.default", backward_ops(checkpointed))
        self.assertNotIn("aten.native_layer_norm.default", backward_ops(plain))

    def test_selective_checkpoint_policy_around_a_leaf_is_refused(self):
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        def policy(ctx, op, *args, **kwargs):
            return CheckpointPolicy.PREFER_RECOMPUTE

        block = Block()
        leafpass.set_z3_leaf_modules(block, [MoEBlock])
        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)

        def fn(x):
            return checkpoint_utils.checkpoint(block, x, use_reentrant=False, context_fn=context_fn)

        with self.assertRaisesRegex(Exception, "selective-checkpointing context_fn around leaf MoEBlock"):
            torch.compile(fn, backend="z3leaf", options={"inner": "aot_eager"}, fullgraph=True)(torch.randn(6, D))


def _gather_then_matmul(full: torch.Tensor):
    """A leaf piece in miniature under ZeRO-3: its parameter arrives partitioned (shape
    ``[0]``), its ``prefetch_all`` gathers it (``.data`` swapped in), then the leaf uses it."""

    def run(x, w):
        w.data = full
        return x @ w.t()

    return run


class TestCheckpointHoldingParameters:
    """``lower.checkpoint_holding_parameters``: a checkpointed leaf piece whose parameter is
    gathered inside it gets its whole gradient, on every torch (2.11's checkpoint made the
    parameter's gradient accumulator at the partitioned shape, ``[0]``)."""

    def _step(self, call):
        torch.manual_seed(0)
        full, x = torch.randn(3, 4), torch.randn(2, 4, requires_grad=True)
        w = nn.Parameter(torch.empty(0))
        out = call(_gather_then_matmul(full), x, w)
        w.data = torch.empty(0)  # released after the forward; backward's recompute gathers it again
        out.sum().backward()
        return full, x, w

    def test_whole_gradient_reaches_a_parameter_gathered_inside_the_piece(self):
        from leafpass.lower import checkpoint_holding_parameters

        full, x, w = self._step(lambda run, x, w: checkpoint_holding_parameters(run, (x, w)))
        torch.testing.assert_close(w.grad, torch.ones(2, 3).t() @ x.detach())
        torch.testing.assert_close(x.grad, torch.ones(2, 3) @ full)

    @pytest.mark.skipif(not hasattr(checkpoint_utils, "_NoopSaveInputs"),
                        reason="this torch's checkpoint saves its inputs without an autograd node")
    def test_torch_2_11_checkpoint_fails_with_the_parameter_as_an_input(self):
        # why the helper exists: what leafpass did before, on torch 2.11
        with pytest.raises(RuntimeError, match=r"invalid gradient .* expected shape compatible with \[0\]"):
            self._step(lambda run, x, w: checkpoint_utils.checkpoint(run, x, w, use_reentrant=False))


class TestCheckpointSnapshots(CompileTestCase):
    def test_checkpointed_leaf(self):
        model = Checkpointed(use_reentrant=False)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        graphs, _ = self.graphs_of(model, torch.randn(6, D))
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = torch._C._nn.linear(x, inp.weight, inp.bias)
t1 = torch.nn.functional.layer_norm(t0, (8,), block.norm.weight, block.norm.bias, 1e-05)  # checkpoint 0
prefetch_all block.moe (17 params)  # checkpoint 0
t2 = block.moe(t1)  # checkpoint 0
t3 = torch._C._nn.linear(t2, block.lin.weight, block.lin.bias)  # checkpoint 0
t4 = _operator.add(t0, t3)  # checkpoint 0
t5 = torch._C._nn.linear(t4, out.weight, out.bias)
return (t5,)
""")

    def test_nested_and_consecutive_regions(self):
        model = TwoCheckpointed()
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        graphs, _ = self.graphs_of(model, torch.randn(6, D))
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: x
t0 = torch.nn.functional.layer_norm(x, (8,), first.norm.weight, first.norm.bias, 1e-05)  # checkpoint 0
prefetch_all first.moe (17 params)  # checkpoint 0
t1 = first.moe(t0)  # checkpoint 0
t2 = torch._C._nn.linear(t1, first.lin.weight, first.lin.bias)  # checkpoint 0
t3 = _operator.add(x, t2)  # checkpoint 0
t4 = torch.nn.functional.layer_norm(t3, (8,), second.norm.weight, second.norm.bias, 1e-05)  # checkpoint 1
prefetch_all second.moe (17 params)  # checkpoint 1
t5 = second.moe(t4)  # checkpoint 1
t6 = torch._C._nn.linear(t5, second.lin.weight, second.lin.bias)  # checkpoint 1
t7 = _operator.add(t3, t6)  # checkpoint 1
t8 = _operator.mul(t7, 2)  # checkpoint 2
return (t8,)
""")


# --------------------------------------------------------------------------- transformers


@pytest.mark.transformers
@pytest.mark.parametrize("use_reentrant,inner", [(False, "aot_eager"), (True, "eager")])
def test_mixtral_gradient_checkpointing(use_reentrant, inner):
    """transformers' gradient_checkpointing_enable on a tiny Mixtral with eager experts."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=4, num_experts_per_tok=2, max_position_embeddings=64,
        intermediate_size=64, num_hidden_layers=1, num_key_value_heads=2, num_local_experts=4,
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").train()
    leafpass.set_z3_leaf_modules(model, ["MixtralSparseMoeBlock"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    reference = copy.deepcopy(model)
    runs = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: runs.append(1))
    compiled = torch.compile(model, backend="z3leaf", options={"inner": inner}, fullgraph=True)
    generator = torch.Generator().manual_seed(1)
    graphs = []
    try:
        for step in range(2):
            ids = torch.randint(0, 64, (2, 8), generator=generator)
            # use_cache=False: with checkpointing on, transformers otherwise logs a warning
            # from inside forward, which Dynamo cannot trace (fullgraph=True fails on it)
            with leafpass.record_graphs() as rec:
                out = compiled(input_ids=ids, labels=ids, use_cache=False)
            graphs += rec.graphs
            ref = reference(input_ids=ids, labels=ids, use_cache=False)
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6, msg=f"loss, step {step}")
            out.loss.backward()
            ref.loss.backward()
            assert_same_grads(model, reference, f"step {step}")
        assert len(graphs) == 1, f"{len(graphs)} graphs (a recompile or a break)"
        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
        gm = graphs[0]
        calls = _leaf_nodes(gm)
        assert [c.target for c in calls] == ["model.layers.0.mlp"]
        assert calls[0].prev.target is PREFETCH
        assert _hop_nodes(gm, "tag_activation_checkpoint") == []
        assert len(runs) == 4, "forward + recompute in backward, two steps"
    finally:
        torch._dynamo.reset()
