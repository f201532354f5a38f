"""Tiny Hugging Face MoE models (Mixtral, Qwen3-MoE, DeepSeek-V3) compiled with z3leaf.

Every model is built offline from a config (no download) with 1 decoder layer (2 for
DeepSeek-V3, whose first layer is dense), hidden size 32 and 4 experts, so the whole file
stays fast on CPU. What is checked:

* flagging: DeepSpeed's default leaf classes (``apply_leaf_module_config(model, {})``)
  flag the sparse MoE block of Mixtral, Qwen2-MoE and Qwen3-MoE; DeepSeek-V3 is not in
  the defaults (nothing is flagged, silently), so its ``DeepseekV3MoE`` is flagged by
  class name;
* for both ``experts_implementation="grouped_mm"`` and ``"eager"``: one graph, no graph
  break under ``fullgraph=True``, loss, logits and every gradient equal eager over two
  steps with different ``input_ids``, one ``call_module`` per leaf with one
  ``prefetch_all`` of all its parameters right before it;
* the contrast: unflagged, the ``"eager"`` experts (``nonzero`` and a loop over the
  experts hit) break the graph;
* a snapshot of one Mixtral decoder layer's graph (inner ``aot_eager``, with gradients).

The whole-model tests use the inner compiler ``"eager"`` to stay fast.

The snapshot text depends on the transformers version (written with 5.24).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch._dynamo

transformers = pytest.importorskip("transformers")

import leafpass  # noqa: E402
from tests.compile_case import CompileTestCase, assert_same_grads  # noqa: E402

pytestmark = pytest.mark.transformers

VOCAB = 64
BATCH, SEQ = 2, 8
KINDS = ("mixtral", "qwen3_moe", "deepseek_v3")
IMPLS = ("grouped_mm", "eager")

#: The class that has to be a leaf in each model.
LEAF_CLASS = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE",
}
#: The leaves' qualified names (DeepSeek-V3's layer 0 is dense: first_k_dense_replace=1).
EXPECTED_LEAVES = {
    "mixtral": ["model.layers.0.mlp"],
    "qwen2_moe": ["model.layers.0.mlp"],
    "qwen3_moe": ["model.layers.0.mlp"],
    "deepseek_v3": ["model.layers.1.mlp"],
}


def tiny_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_experts_per_tok=2,
                  max_position_embeddings=64)
    if kind == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=64, num_hidden_layers=1, num_key_value_heads=2,
                                          num_local_experts=4)
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, num_hidden_layers=1,
                                           num_key_value_heads=2, num_experts=4, decoder_sparse_step=1,
                                           mlp_only_layers=[])
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                           num_hidden_layers=1, num_key_value_heads=2, num_experts=4,
                                           decoder_sparse_step=1, mlp_only_layers=[])
    if kind == "deepseek_v3":
        return transformers.DeepseekV3Config(**common, intermediate_size=64, moe_intermediate_size=32,
                                             num_hidden_layers=2, num_key_value_heads=4, n_routed_experts=4,
                                             n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
                                             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    raise ValueError(kind)


def build(kind: str, impl: str = "eager"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind), experts_implementation=impl)
    return model.train()


def flag(model, kind: str):
    """DeepSpeed's defaults; DeepSeek-V3 is not among them, so flag it by class name."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults never warn, even when they match nothing
        flagged = leafpass.apply_leaf_module_config(model, {})
    if kind == "deepseek_v3":
        assert flagged == []
        flagged = leafpass.set_z3_leaf_modules(model, [LEAF_CLASS[kind]])
    return flagged


def leaf_names(model):
    return [name for name, module in model.named_modules() if leafpass.z3_leaf_module(module)]


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def check_leaf_calls(gm, expected_leaves, leaf_class):
    """One call_module per leaf, each right after one prefetch_all of all the leaf's parameters."""
    prefetch_op = torch.ops.leafpass.prefetch_all.default
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == expected_leaves
    for call in calls:
        leaf = gm.get_submodule(call.target)
        assert type(leaf).__name__ == leaf_class
        n_params = len(list(leaf.parameters()))
        assert n_params > 0
        prefetch = call.prev
        assert prefetch.op == "call_function" and prefetch.target == prefetch_op, f"no prefetch right before {call.target}"
        assert prefetch.args[1] == call.target
        assert len(prefetch.args[0]) == len(set(prefetch.args[0])) == n_params
    prefetches = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == prefetch_op]
    assert len(prefetches) == len(calls)
    assert not [n for n in gm.graph.nodes if "invoke_leaf_function" in str(n.target)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------- flagging


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_default_leaf_classes_flag_the_sparse_moe_block(kind):
    model = build(kind)
    flagged = flag(model, kind)
    assert [type(m).__name__ for m in flagged] == [LEAF_CLASS[kind]]
    assert leaf_names(model) == EXPECTED_LEAVES[kind]
    # the same modules as flagging the class by name
    by_name = build(kind)
    leafpass.set_z3_leaf_modules(by_name, [LEAF_CLASS[kind]])
    assert leaf_names(by_name) == leaf_names(model)


def test_deepseek_v3_is_not_in_the_defaults():
    model = build("deepseek_v3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert leafpass.apply_leaf_module_config(model, {}) == []
    assert leaf_names(model) == []
    leafpass.set_z3_leaf_modules(model, ["DeepseekV3MoE"])
    assert leaf_names(model) == EXPECTED_LEAVES["deepseek_v3"]
    assert type(model.model.layers[0].mlp).__name__ == "DeepseekV3MLP"  # dense layer stays unflagged


# --------------------------------------------------------------------------- whole models


def two_steps_like_eager(model, after_step, **call_kwargs) -> list:
    """Two training steps of ``model`` compiled with z3leaf (inner eager, fullgraph) beside
    an eager copy, on the same token batches: loss, logits and every gradient equal at
    each step, and ``after_step(out, ref, step)`` true after its backward. Returns the
    graphs compiled."""
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="z3leaf", options={"inner": "eager"}, fullgraph=True)
    generator = torch.Generator().manual_seed(1)
    graphs = []
    for step in range(2):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        with leafpass.record_graphs() as rec:
            out = compiled(input_ids=ids, labels=ids, **call_kwargs)
        graphs += rec.graphs
        ref = reference(input_ids=ids, labels=ids, **call_kwargs)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6, msg=f"loss, step {step}")
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6, msg=f"logits, step {step}")
        out.loss.backward()
        ref.loss.backward()
        assert_same_grads(model, reference, f"step {step}")
        assert after_step(out, ref, step), f"after step {step}"
    return graphs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_graph_and_parity_with_eager(kind, impl):
    model = build(kind, impl)
    flag(model, kind)
    assert leaf_names(model) == EXPECTED_LEAVES[kind]
    # inner "eager" keeps this fast; the decoder-layer snapshot test goes through aot_eager
    graphs = two_steps_like_eager(
        model, after_step=lambda out, ref, step: any(p.grad is not None for p in model.model.layers[-1].mlp.parameters()))
    assert len(graphs) == 1, f"{len(graphs)} graphs (a recompile or a break)"
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    check_leaf_calls(graphs[0], EXPECTED_LEAVES[kind], LEAF_CLASS[kind])


# --------------------------------------------------------------------------- whole decoder layers as leaves

#: Whole decoder layers flagged (what ``stage3_module_granularity_threshold`` does by
#: itself): each layer's call takes the rotary ``(cos, sin)`` tuple, ``None``s, a
#: ``use_cache`` bool and, with ``use_cache`` at its default, the ``DynamicCache`` it updates.
DECODER_LAYER = {"llama": "LlamaDecoderLayer", "mixtral": "MixtralDecoderLayer", "qwen3_moe": "Qwen3MoeDecoderLayer"}


def build_with_layers(kind: str):
    if kind != "llama":
        return build(kind, "eager")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                      num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("use_cache", [None, False], ids=["use_cache_default", "use_cache_false"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "llama"])
def test_whole_decoder_layers_as_leaves(kind, use_cache):
    model = build_with_layers(kind)
    leafpass.set_z3_leaf_modules(model, [DECODER_LAYER[kind]])
    layers = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    assert leaf_names(model) == layers

    def same_cache(out, ref, step):
        if use_cache is False:
            return out.past_key_values is None
        # the cache the layers filled, layer by layer, equals eager's
        assert type(out.past_key_values) is type(ref.past_key_values)
        assert len(out.past_key_values.layers) == len(ref.past_key_values.layers) == len(layers)
        for mine, theirs in zip(out.past_key_values.layers, ref.past_key_values.layers):
            torch.testing.assert_close(mine.keys, theirs.keys)
            torch.testing.assert_close(mine.values, theirs.values)
        return True

    graphs = two_steps_like_eager(model, after_step=same_cache, use_cache=use_cache)
    assert len(graphs) == 1, f"{len(graphs)} graphs (a recompile or a break)"
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    check_leaf_calls(graphs[0], layers, DECODER_LAYER[kind])


# --------------------------------------------------------------------------- one decoder layer


class OneDecoderLayer(torch.nn.Module):
    """Layer 0 of a causal LM, under the same qualified names (``model.layers.0...``).

    A decoder layer takes the rotary ``(cos, sin)`` and a mask, which the full model
    computes; here ``(cos, sin)`` are inputs and the mask is None, so SDPA runs with
    ``is_causal=True``, as the full model does for an unpadded batch.
    """

    def __init__(self, lm) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = lm.model.layers[:1]

    def forward(self, hidden_states, cos, sin):
        return self.model.layers[0](hidden_states, position_embeddings=(cos, sin), attention_mask=None)


def one_layer_inputs(lm):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = lm.model.embed_tokens(ids)
        cos, sin = lm.model.rotary_emb(hidden, position_ids=torch.arange(SEQ).unsqueeze(0))
    return hidden, cos, sin


class TestMixtralDecoderLayer(CompileTestCase):
    def test_snapshot(self):
        # The lone decoder layer (not the whole model): attention, both norms, then the leaf.
        lm = build("mixtral", "eager")
        flag(lm, "mixtral")
        layer = OneDecoderLayer(lm)
        reference = copy.deepcopy(layer)
        inputs = one_layer_inputs(lm)
        graphs, out = self.graphs_of(layer, *inputs)
        self.assertEqual(len(graphs), 1)
        self.assertEqual(graph_breaks(), 0)
        check_leaf_calls(graphs[0], ["model.layers.0.mlp"], "MixtralSparseMoeBlock")
        ref = reference(*inputs)
        torch.testing.assert_close(out, ref)
        out.pow(2).sum().backward()
        ref.pow(2).sum().backward()
        for (name, p), (_, q) in zip(layer.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"grad of {name}")
        self.assertExpectedInline(leafpass.format_graph(graphs[0]), """\
inputs: hidden_states, cos, sin
t0 = hidden_states.to(torch.float32)
t1 = t0.pow(2)
t2 = t1.mean(-1, keepdim=True)
t3 = _operator.add(t2, 1e-05)
t4 = torch.rsqrt(t3)
t5 = _operator.mul(t0, t4)
t6 = t5.to(torch.float32)
t7 = _operator.mul(model.layers.0.input_layernorm.weight, t6)
t8 = torch._C._nn.linear(t7, model.layers.0.self_attn.q_proj.weight, None)
t9 = t8.view((2, 8, -1, 8))
t10 = t9.transpose(1, 2)
t11 = torch._C._nn.linear(t7, model.layers.0.self_attn.k_proj.weight, None)
t12 = t11.view((2, 8, -1, 8))
t13 = t12.transpose(1, 2)
t14 = torch._C._nn.linear(t7, model.layers.0.self_attn.v_proj.weight, None)
t15 = t14.view((2, 8, -1, 8))
t16 = t15.transpose(1, 2)
t17 = cos.unsqueeze(1)
t18 = sin.unsqueeze(1)
t19 = _operator.mul(t10, t17)
t20 = getitem(t10, (Ellipsis, slice(None, 4, None)))
t21 = getitem(t10, (Ellipsis, slice(4, None, None)))
t22 = _operator.neg(t21)
t23 = torch.cat((t22, t20), dim=-1)
t24 = _operator.mul(t23, t18)
t25 = _operator.add(t19, t24)
t26 = _operator.mul(t13, t17)
t27 = getitem(t13, (Ellipsis, slice(None, 4, None)))
t28 = getitem(t13, (Ellipsis, slice(4, None, None)))
t29 = _operator.neg(t28)
t30 = torch.cat((t29, t27), dim=-1)
t31 = _operator.mul(t30, t18)
t32 = _operator.add(t26, t31)
t33 = torch._C._nn.scaled_dot_product_attention(t25, t32, t16, attn_mask=None, dropout_p=0.0, scale=0.3535533905932738, is_causal=True, enable_gqa=True)
t34 = t33.reshape(2, -1, 8, 8)
t35 = t34.transpose(1, 2)
t36 = t35.contiguous()
t37 = t36.reshape(2, 8, -1)
t38 = t37.contiguous()
t39 = torch._C._nn.linear(t38, model.layers.0.self_attn.o_proj.weight, None)
t40 = _operator.add(hidden_states, t39)
t41 = t40.to(torch.float32)
t42 = t41.pow(2)
t43 = t42.mean(-1, keepdim=True)
t44 = _operator.add(t43, 1e-05)
t45 = torch.rsqrt(t44)
t46 = _operator.mul(t41, t45)
t47 = t46.to(torch.float32)
t48 = _operator.mul(model.layers.0.post_attention_layernorm.weight, t47)
prefetch_all model.layers.0.mlp (3 params)
t49 = model.layers.0.mlp(t48)
t50 = _operator.add(t40, t49)
return (t50,)
""")

    def test_unflagged_eager_experts_break_the_graph(self):
        # What the flag fixes: the "eager" experts (nonzero, a loop over the experts hit)
        # break the graph when the MoE block is not a leaf.
        lm = build("mixtral", "eager")
        self.assertEqual(leaf_names(lm), [])
        layer = OneDecoderLayer(lm)
        inputs = one_layer_inputs(lm)
        with leafpass.record_graphs() as rec:
            out = self.compile(layer, inner="eager")(*inputs)
        self.assertGreater(graph_breaks(), 0)
        self.assertGreater(len(rec.graphs), 1)
        self.assertEqual([n for g in rec.graphs for n in g.graph.nodes if n.op == "call_module"], [])
        torch.testing.assert_close(out, layer(*inputs))


# --------------------------------------------------------------------------- optional extra


def test_leafpass_does_not_import_transformers():
    """transformers is an optional extra: importing leafpass and its submodules must not load it."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import leafpass
        failed = []
        for info in pkgutil.walk_packages(leafpass.__path__, "leafpass."):
            if info.name == "leafpass.__main__":
                continue
            try:
                importlib.import_module(info.name)
            except Exception as error:
                failed.append(f"{info.name}: {error!r}")
        loaded = sorted(m for m in sys.modules if m == "transformers" or m.startswith("transformers."))
        print("failed:", failed)
        print("loaded:", loaded[:5])
        sys.exit(1 if failed or loaded else 0)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
