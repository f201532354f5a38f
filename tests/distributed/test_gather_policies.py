"""The gather policies under real DeepSpeed ZeRO-3 (gloo, CPU): one graph per forward.

``gather="step"`` gathers every non-leaf parameter in one all-gather before the compiled
forward; ``gather="module"`` gathers them inside the graph, bucket by bucket, and again for
backward. Both take DeepSpeed's non-leaf module hooks out of the compiled call, so Dynamo
compiles the whole forward as one graph; ``"hooks"`` leaves DeepSpeed's hooks in place. Each case below trains the same model twice from the same
weights, eager ZeRO-3 and compiled, and the tests compare losses and final (gathered)
parameters step by step. Parameter sizes are chosen not to divide by 2 or 3 (d=13).

Runs (each a fixture shared by the tests that read it):

* ``matrix`` (2 ranks): MoEStack under DeepSpeed's default limits (``auto`` -> step, inductor),
  with gradient accumulation 2 and ``contiguous_gradients`` off (step, aot_eager), under
  strict limits with an explicit ``step`` (GA 2), under strict limits with ``auto`` (-> module,
  one gather per module), ``module`` with buckets and a prefetch distance under the default
  limits with GA 2, ``contiguous_gradients`` off and the small parameters persistent, ``module`` under inductor with GA 2,
  explicit ``hooks`` (DeepSpeed's hooks, graph breaks, still exact), and through
  ``torch.compile(engine.module, fullgraph=True)`` instead of ``engine.compile``;
* ``three_ranks``: world size 3, GA 2, step and module;
* ``mixtral``: a tiny Hugging Face Mixtral with eager experts, 50 steps of changing routing,
  and 8 steps with whole decoder layers flagged (each call takes the ``DynamicCache``);
* failures: an exception inside the compiled step on one rank, and ranks that would
  gather different parameters.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import time

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.shared import assert_rank_failed_first
from leafpass.testing.distributed import DistributedRunError, run_ranks, zero3_config

D, N_LAYERS, N_EXPERTS, TOP_K, N_TOKENS = 13, 2, 4, 2, 12
N_STEPS = 20  # optimizer steps; with gradient accumulation 2 that is 40 forwards
# graphs of MoEBlock's forward under leaf_compile="inner" over those steps (torch 2.11: see the test)
LEAF_GRAPHS_AT_MOST = 12 if torch.__version__.startswith("2.11.") else 8
TOL = 1e-6
LR = 0.05
STRICT = {"max_live_parameters": 0, "max_reuse_distance": 0, "prefetch_bucket_size": 0}

BUCKETS = {"gather": "module", "bucket_elements": 400, "prefetch_distance": 1}
PERSIST_SMALL = {"param_persistence_threshold": 50}
LEAF_COMPILE = {"leaf_compile": "inner"}
# name -> (limits, gradient accumulation, contiguous_gradients, gather options, inner, route)
CASES = {
    "default_auto_inductor": ({}, 1, True, "auto", "inductor", "engine.compile"),
    "ga2_noncontiguous": ({}, 2, False, "step", "aot_eager", "engine.compile"),
    "strict_ga2_step": (STRICT, 2, True, "step", "aot_eager", "engine.compile"),
    "strict_auto_module": (STRICT, 1, True, "auto", "aot_eager", "engine.compile"),
    # parameters under 50 elements (norms, biases) persistent, as DeepSpeed's default threshold
    # makes small ones: used whole by the graph, next to the gathered ones
    "module_buckets_ga2_noncontiguous": (PERSIST_SMALL, 2, False, BUCKETS, "aot_eager", "engine.compile"),
    "module_inductor_ga2": (STRICT, 2, True, BUCKETS, "inductor", "engine.compile"),
    "strict_hooks": (STRICT, 1, True, "hooks", "aot_eager", "engine.compile"),
    "fullgraph_torch_compile": ({}, 1, True, "step", "aot_eager", "torch.compile"),
    # each leaf's forward compiled inside its eager module call (leaf_compile="inner"), under
    # each gather policy: the leaves stay DeepSpeed's, gathered by prefetch_all or its hooks
    "step_leaf_compile": ({}, 1, True, LEAF_COMPILE | {"gather": "step"}, "aot_eager", "engine.compile"),
    "strict_module_leaf_compile": (STRICT, 1, True, LEAF_COMPILE | {"gather": "module"}, "aot_eager",
                                   "engine.compile"),
    "strict_hooks_leaf_compile": (STRICT, 1, True, LEAF_COMPILE | {"gather": "hooks"}, "aot_eager", "engine.compile"),
}
POLICY = {"default_auto_inductor": "step", "ga2_noncontiguous": "step", "strict_ga2_step": "step",
          "strict_auto_module": "module", "module_buckets_ga2_noncontiguous": "module",
          "module_inductor_ga2": "module", "strict_hooks": "hooks", "fullgraph_torch_compile": "step",
          "step_leaf_compile": "step", "strict_module_leaf_compile": "module", "strict_hooks_leaf_compile": "hooks"}
MIXTRAL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
MIXTRAL_STEPS = 50
MIXTRAL_LAYER_STEPS = 8  # with whole decoder layers as leaves (use_cache at its default)
# whole decoder layers of a Qwen3-MoE (eager experts) and a dense Llama as the only leaves
LAYER_MODELS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeDecoderLayer",
                  dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)),
    "llama": ("LlamaConfig", "LlamaDecoderLayer",
              dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
}
LAYER_MODEL_STEPS = 4


# ----------------------------------------------------------------- what runs on each rank


def _config(limits: dict, ga: int, contiguous: bool) -> dict:
    return zero3_config(1, **limits, gradient_accumulation_steps=ga,
                        zero_optimization={"contiguous_gradients": contiguous})


def _engine(model, config):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    return engine


def _batch(rank: int, micro: int):
    gen = torch.Generator().manual_seed(1000 * rank + micro)
    return torch.randn(N_TOKENS, D, generator=gen), torch.randn(N_TOKENS, D, generator=gen)


def _train(engine, forward, n_micro: int, batch_fn) -> dict:
    """Run ``n_micro`` forward/backward/step; return losses, final parameters and counts."""
    import deepspeed

    import leafpass
    from leafpass.tools.deepspeed_probe import count_collectives

    from leafpass.leaf_compile import leaf_compile_stats

    rec: dict = {"losses": [], "fwd_ag": [], "fwd_ar": []}
    torch._dynamo.utils.counters.clear()
    leaf_graphs_before = sum(leaf_compile_stats().values())
    with leafpass.record_graphs() as graphs, count_collectives() as counter:
        for micro in range(n_micro):
            batch = batch_fn(micro)
            s0 = counter.snapshot()
            loss = forward(batch)
            fwd = counter.delta(s0, counter.snapshot())
            rec["fwd_ag"].append(fwd.get("all_gather", 0))
            rec["fwd_ar"].append(fwd.get("all_reduce", 0))
            engine.backward(loss)
            engine.step()
            rec["losses"].append(loss.item())
            # nothing leafpass gathered is left AVAILABLE after backward, no stand-in left in place
            if micro == 0:
                rec["available_after_step0"] = sum(
                    p.ds_status.name == "AVAILABLE" and not p.ds_persist for p in engine.module.parameters())
                rec["data_after_step0"] = sum(
                    p.data.numel() != 0 and not p.ds_persist for p in engine.module.parameters())
    rec["graphs"] = len(graphs.graphs)
    rec["leaf_graphs"] = sum(leaf_compile_stats().values()) - leaf_graphs_before
    rec["breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    rec["break_reasons"] = sorted({str(r).splitlines()[0][:120] for r in torch._dynamo.utils.counters["graph_break"]})
    stats = leafpass.gather_stats(engine.module)
    rec["stats"] = None if stats is None else {
        "policy": stats.policy, "calls": stats.calls, "peak": stats.peak_gathered_elements, "releases": stats.releases,
        "step_gather": stats.step_gather}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        rec["final"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return rec


def _moe_stack():
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.testing.models import MoEBlock, MoEStack

    torch.manual_seed(7)
    model = MoEStack(D, N_LAYERS, N_EXPERTS, TOP_K)
    set_z3_leaf_modules(model, [MoEBlock])
    return model


def _run_case(rank: int, base, case: tuple, eager_runs: dict) -> dict:
    """Eager ZeRO-3 and compiled runs of ``case``; cases with the same engine settings share
    one eager run (``eager_runs``, keyed by limits, accumulation and contiguous_gradients:
    same weights, same batches, so the same losses)."""
    limits, ga, contiguous, gather, inner, route = case
    out = {}
    mse = lambda fwd: lambda batch: F.mse_loss(fwd(batch[0]), batch[1])  # noqa: E731
    eager_key = (tuple(sorted(limits.items())), ga, contiguous)
    for mode in ("eager", "compiled"):
        if mode == "eager" and eager_key in eager_runs:
            out[mode] = eager_runs[eager_key]
            continue
        torch._dynamo.reset()
        engine = _engine(copy.deepcopy(base), _config(limits, ga, contiguous))
        forward = engine
        if mode == "compiled":
            options = {**({"gather": gather} if isinstance(gather, str) else gather), "inner": inner}
            if route == "engine.compile":
                engine.compile(backend="z3leaf", compile_kwargs={"options": options})
            else:
                forward = torch.compile(engine.module, backend="z3leaf", fullgraph=True, options=options)
        out[mode] = _train(engine, mse(forward), N_STEPS * ga, lambda micro: _batch(rank, micro))
        if mode == "eager":
            eager_runs[eager_key] = out[mode]
    return out


FLAG_CHANGE = "module_flag_changed_between_steps"
FLAG_STEPS, FLAG_UNSET_AT = 6, 3


def _flag_change_case(rank: int, base) -> dict:
    """gather="module"; ``layers.1.norm2`` (no children) flagged as a leaf after
    deepspeed.initialize (so eager ZeRO-3 runs it either way), unflagged at step 3: its
    parameters hold stand-ins from then on and the recompiled graph must gather them."""
    import leafpass
    from leafpass.runtime.deepspeed import root_offload

    out = {}
    mse = lambda fwd: lambda batch: F.mse_loss(fwd(batch[0]), batch[1])  # noqa: E731
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        engine = _engine(copy.deepcopy(base), _config(STRICT, 1, True))
        norm = engine.module.layers[1].norm2
        leafpass.set_z3_leaf_modules_by_name(engine.module, ["layers.1.norm2"])
        if mode == "compiled":
            engine.compile(backend="z3leaf", compile_kwargs={"options": {"gather": "module", "inner": "aot_eager"}})

        def batch(micro):
            if micro == FLAG_UNSET_AT:
                norm._z3_leaf = False
                # DeepSpeed checks each step's module order against the one it recorded:
                # a new order must be recorded again (as re-registering its hooks does)
                coordinator = root_offload(engine.module).get_param_coordinator()
                if not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()
            return _batch(rank, micro)

        out[mode] = _train(engine, mse(engine), FLAG_STEPS, batch)
    return out


def _matrix_body(rank: int, world_size: int, names: list[str]) -> dict:
    base = _moe_stack()
    eager_runs: dict = {}
    out = {name: _run_case(rank, base, CASES[name], eager_runs) for name in names if name in CASES}
    if FLAG_CHANGE in names:
        out[FLAG_CHANGE] = _flag_change_case(rank, base)
    return out


def _mixtral_body(rank: int, world_size: int) -> dict:
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**MIXTRAL),
                                                         experts_implementation="eager")
    base.train()
    out = {}
    for mode in ("eager", "compiled", "decoder_layers"):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        if mode == "decoder_layers":  # whole layers as leaves: each call takes the DynamicCache
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, ["MixtralDecoderLayer"])
        engine = _engine(model, zero3_config(1))  # DeepSpeed flags the MoE blocks
        if mode != "eager":
            engine.compile(backend="z3leaf", compile_kwargs={"options": {"inner": "aot_eager"}})

        def batch(micro):  # new tokens every step: the routing changes every step
            gen = torch.Generator().manual_seed(100 * rank + micro)
            return torch.randint(0, MIXTRAL["vocab_size"], (2, 8), generator=gen)

        steps = MIXTRAL_LAYER_STEPS if mode == "decoder_layers" else MIXTRAL_STEPS
        out[mode] = _train(engine, lambda ids: engine(input_ids=ids, labels=ids).loss, steps, batch)
    for name, (config_cls, layer_cls, config) in LAYER_MODELS.items():
        out[name] = _decoder_layers_run(rank, getattr(transformers, config_cls)(**config), layer_cls)
    return out


def _decoder_layers_run(rank: int, config, layer_cls: str) -> dict:
    """Eager ZeRO-3 and z3leaf with every decoder layer flagged (and nothing else)."""
    import transformers
    from deepspeed.utils import set_z3_leaf_modules

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").train()
    set_z3_leaf_modules(base, [layer_cls])
    out = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        engine = _engine(copy.deepcopy(base), zero3_config(1, zero_optimization={"leaf_module": {"classes": [layer_cls]}}))
        if mode == "compiled":
            engine.compile(backend="z3leaf", compile_kwargs={"options": {"inner": "aot_eager"}})

        def batch(micro):
            gen = torch.Generator().manual_seed(100 * rank + micro)
            return torch.randint(0, config.vocab_size, (2, 8), generator=gen)

        out[mode] = _train(engine, lambda ids: engine(input_ids=ids, labels=ids).loss, LAYER_MODEL_STEPS, batch)
    out["leaves"] = sorted(n for n, m in base.named_modules() if getattr(m, "_z3_leaf", False))
    return out


@pytest.fixture(scope="module")
def matrix() -> list[dict]:
    start = time.monotonic()
    values = run_ranks(_matrix_body, [*CASES, FLAG_CHANGE], world_size=2, timeout=420, pg_timeout=90)
    print(f"2-rank gather matrix: {time.monotonic() - start:.1f}s")
    return values


@pytest.fixture(scope="module")
def three_ranks() -> list[dict]:
    return run_ranks(_matrix_body, ["ga2_noncontiguous", "module_buckets_ga2_noncontiguous"], world_size=3,
                     timeout=360, pg_timeout=90)


@pytest.fixture(scope="module")
def mixtral() -> list[dict]:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    return run_ranks(_mixtral_body, world_size=2, timeout=300, pg_timeout=90,
                     env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


# ----------------------------------------------------------------------------- assertions


def _assert_parity(eager: dict, compiled: dict, what: str) -> None:
    assert len(compiled["losses"]) == len(eager["losses"]), what
    diffs = [abs(a - b) for a, b in zip(eager["losses"], compiled["losses"])]
    assert max(diffs) <= TOL, (what, eager["losses"], compiled["losses"])
    assert len(set(eager["losses"])) > 1, (what, eager["losses"])  # the model did train
    assert eager["final"].keys() == compiled["final"].keys()
    worst = max((eager["final"][n] - compiled["final"][n]).abs().max().item() for n in eager["final"])
    assert worst <= TOL, (what, worst)


def _assert_one_graph(run: dict, what: str, policy: str = "step") -> None:
    assert run["graphs"] == 1 and run["breaks"] == 0, (what, run["graphs"], run["breaks"], run["break_reasons"])
    assert run["stats"]["policy"] == policy, (what, run["stats"])
    assert run["available_after_step0"] == 0 and run["data_after_step0"] == 0, what


@pytest.mark.distributed
@pytest.mark.timeout(480)
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_zero3_matches_eager_over_20_steps(matrix, name):
    for rank, res in enumerate(matrix):
        _assert_parity(res[name]["eager"], res[name]["compiled"], f"{name} rank {rank}")


@pytest.mark.distributed
@pytest.mark.timeout(480)
@pytest.mark.parametrize("name", [n for n in CASES if POLICY[n] != "hooks"])
def test_step_and_module_gather_compile_one_graph_without_breaks_or_recompiles(matrix, name):
    for rank, res in enumerate(matrix):
        _assert_one_graph(res[name]["compiled"], f"{name} rank {rank}", POLICY[name])


@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_leaf_compile_compiles_the_leaf_forwards_under_every_policy_without_a_recompile_storm(matrix):
    for rank, res in enumerate(matrix):
        for name, case in CASES.items():
            compiled = res[name]["compiled"]
            if isinstance(case[3], dict) and case[3].get("leaf_compile") == "inner":
                # MoEBlock's forward compiled a few times at most (its graph and the pieces
                # around its breaks; sizes dynamic), not once per routing over 20 steps.
                # torch 2.11's Dynamo compiles those pieces a little more often (10 seen)
                assert 0 < compiled["leaf_graphs"] <= LEAF_GRAPHS_AT_MOST, (name, rank, compiled["leaf_graphs"])
            else:
                assert compiled["leaf_graphs"] == 0, (name, rank, compiled["leaf_graphs"])
            assert res[name]["eager"]["leaf_graphs"] == 0


@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_step_gather_is_one_collective_per_forward(matrix):
    for rank, res in enumerate(matrix):
        for name in ("default_auto_inductor", "strict_ga2_step"):
            compiled, eager = res[name]["compiled"], res[name]["eager"]
            # every forward: one collective for the whole model (on gloo leafpass's all-reduce
            # into place, leafpass.runtime.deepspeed_step_gather), no all-gather; the leaves'
            # prefetch_all find their parameters gathered (strict limits: DeepSpeed regathers
            # them in backward)
            assert compiled["stats"]["step_gather"] == "in place", (name, rank, compiled["stats"])
            # (the first forward also runs leafpass's one-time check that every rank compiled
            # the same schedule: a few more small all-reduces)
            assert set(compiled["fwd_ag"]) == {0} and set(compiled["fwd_ar"][1:]) == {1}, (
                name, rank, compiled["fwd_ag"], compiled["fwd_ar"])
            assert compiled["fwd_ar"][0] >= 1
            if name.startswith("strict"):  # eager ZeRO-3 then gathers module by module
                assert min(eager["fwd_ag"]) > N_LAYERS, (name, rank, eager["fwd_ag"])
            else:  # with a complete trace, DeepSpeed prefetches this small model in one bucket
                assert eager["fwd_ag"][0] > N_LAYERS and eager["fwd_ag"][2:] == [1] * (len(eager["fwd_ag"]) - 2)
            ga = CASES[name][1]
            assert compiled["stats"]["calls"] == N_STEPS * ga == compiled["stats"]["releases"], compiled["stats"]
        n_params = sum(p.numel() for p in res["default_auto_inductor"]["eager"]["final"].values())
        assert res["default_auto_inductor"]["compiled"]["stats"]["peak"] == n_params


@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_module_gather_issues_per_bucket_gathers_and_holds_less_than_the_model(matrix):
    for rank, res in enumerate(matrix):
        n_params = sum(p.numel() for p in res["strict_auto_module"]["eager"]["final"].values())
        one_per_module = res["strict_auto_module"]["compiled"]
        # strict limits (prefetch bucket 0): one gather per module, like eager ZeRO-3 with strict limits
        assert one_per_module["fwd_ag"] == res["strict_auto_module"]["eager"]["fwd_ag"], (rank, one_per_module["fwd_ag"])
        for name in ("module_buckets_ga2_noncontiguous", "module_inductor_ga2"):
            run = res[name]["compiled"]
            # adjacent modules share a bucket: fewer all-gathers than one per module, still more than one
            assert 1 < max(run["fwd_ag"]) < min(one_per_module["fwd_ag"]), (name, rank, run["fwd_ag"])
            # the same schedule every step once the first optimizer step is done (the first
            # forwards also gather the persistent parameters, and DeepSpeed's leaf hooks
            # record their trace)
            assert len(set(run["fwd_ag"][2:])) == 1, (name, rank, run["fwd_ag"])
            assert run["stats"]["calls"] == N_STEPS * 2 == run["stats"]["releases"], run["stats"]
        for name in ("strict_auto_module", "module_buckets_ga2_noncontiguous", "module_inductor_ga2"):
            peak = res[name]["compiled"]["stats"]["peak"]
            assert 0 < peak < n_params / 2, (name, rank, peak, n_params)  # never the whole model at once


@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_hooks_keeps_deepspeeds_hooks(matrix):
    for res in matrix:
        run = res["strict_hooks"]["compiled"]
        assert run["stats"]["policy"] == "hooks", run["stats"]
        assert run["stats"]["calls"] == 0
        assert run["breaks"] > 0 and run["graphs"] > 1, (run["graphs"], run["breaks"])
        assert any("compiler.disable" in r or "skipped" in r for r in run["break_reasons"]), run["break_reasons"]


@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_module_gather_follows_a_leaf_flag_changed_between_steps(matrix):
    for rank, res in enumerate(matrix):
        run = res[FLAG_CHANGE]
        _assert_parity(run["eager"], run["compiled"], f"{FLAG_CHANGE} rank {rank}")
        compiled = run["compiled"]
        # the flag change recompiles (Dynamo guards the flag), with the plan of the new flags
        assert compiled["graphs"] == 2 and compiled["stats"]["policy"] == "module", (rank, compiled)
        assert compiled["stats"]["calls"] == FLAG_STEPS == compiled["stats"]["releases"], compiled["stats"]


@pytest.mark.distributed
@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", ["ga2_noncontiguous", "module_buckets_ga2_noncontiguous"])
def test_world_size_three_with_gradient_accumulation(three_ranks, name):
    assert len(three_ranks) == 3
    for rank, res in enumerate(three_ranks):
        run = res[name]
        _assert_parity(run["eager"], run["compiled"], f"world 3 {name} rank {rank}")
        _assert_one_graph(run["compiled"], f"world 3 {name} rank {rank}", POLICY[name])


@pytest.mark.distributed
@pytest.mark.timeout(360)
def test_mixtral_50_steps_of_changing_routing_one_graph_no_recompiles(mixtral):
    for rank, res in enumerate(mixtral):
        _assert_one_graph(res["compiled"], f"mixtral rank {rank}")
        assert len(res["compiled"]["losses"]) == MIXTRAL_STEPS
        _assert_parity(res["eager"], res["compiled"], f"mixtral rank {rank}")


@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_mixtral_whole_decoder_layers_as_leaves_take_the_cache_one_graph(mixtral):
    # each layer's call takes the DynamicCache the model makes (use_cache at its default)
    for rank, res in enumerate(mixtral):
        run = res["decoder_layers"]
        _assert_one_graph(run, f"mixtral decoder layers rank {rank}")
        eager = res["eager"]["losses"][:MIXTRAL_LAYER_STEPS]
        diffs = [abs(a - b) for a, b in zip(eager, run["losses"])]
        assert len(run["losses"]) == MIXTRAL_LAYER_STEPS and max(diffs) <= TOL, (rank, eager, run["losses"])


@pytest.mark.distributed
@pytest.mark.timeout(480)
@pytest.mark.parametrize("name", list(LAYER_MODELS))
def test_whole_decoder_layers_of_qwen3_moe_and_llama_as_leaves_match_eager_zero3(mixtral, name):
    for rank, res in enumerate(mixtral):
        run = res[name]
        assert run["leaves"] == ["model.layers.0", "model.layers.1"], (name, run["leaves"])
        _assert_one_graph(run["compiled"], f"{name} decoder layers rank {rank}")
        _assert_parity(run["eager"], run["compiled"], f"{name} decoder layers rank {rank}")


# ------------------------------------------------------------------------------- failures


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_ranks_that_would_gather_different_parameters_all_raise():
    from tests.distributed.test_compiled_zero3 import _mismatched_flags_body

    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:  # rank 0 flags moe1 and moe2, rank 1 moe1 only
        run_ranks(_mismatched_flags_body, "step", world_size=2, timeout=150, pg_timeout=30)
    err = info.value
    assert err.hung_ranks == [] and all(code not in (0, None) for code in err.exitcodes), str(err)
    for report in err.reports:
        last = (report.error or "").strip().splitlines()[-1:]
        assert last and "LeafScheduleMismatch" in last[0] and "would gather different parameters" in last[0] and "inside leaves" in last[0], (report.rank, last)
    assert time.monotonic() - start < 150


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("gather", ["step", "module"])
def test_exception_inside_the_compiled_step_on_one_rank_fails_every_rank_fast(gather):
    from tests.distributed.test_compiled_zero3 import _exploding_body

    with pytest.raises(DistributedRunError) as info:
        run_ranks(_exploding_body, 1, 1, gather, world_size=2, timeout=150, pg_timeout=30)
    err = info.value
    assert_rank_failed_first(err, 1, "RuntimeError: leaf exploded on rank 1 at step 1")
    assert "leafpass/runtime/deepspeed_gatherer.py" in err.reports[1].error, err.reports[1].error
    lag = err.reports[0].reported_at - err.reports[1].reported_at
    assert 0 <= lag < 15, (lag, str(err))


# ------------------------------------------------------------------------ release points


def _release_body(rank: int, world_size: int) -> dict:
    import leafpass
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.testing.models import MoEBlock, TwoMoE

    torch.manual_seed(0)
    model = TwoMoE(D, N_EXPERTS, TOP_K)
    set_z3_leaf_modules(model, [MoEBlock])
    engine = _engine(model, zero3_config(1))
    engine.compile(backend="z3leaf", compile_kwargs={"options": {"inner": "eager", "gather": "step"}})
    x, y = _batch(rank, 0)
    available = lambda: sum(p.ds_status.name == "AVAILABLE" for p in engine.module.parameters())  # noqa: E731
    nonleaf = [p for n, p in engine.module.named_parameters() if not n.startswith("moe")]
    nonleaf_available = lambda: sum(p.ds_status.name == "AVAILABLE" for p in nonleaf)  # noqa: E731
    out = {"n_params": len(list(engine.module.parameters())), "n_nonleaf": len(nonleaf)}
    with torch.no_grad():
        engine(x)
    out["after_no_grad_forward"] = available()
    engine(x)
    out["nonleaf_after_forward"] = nonleaf_available()
    second = F.mse_loss(engine(x), y)  # the first forward never gets a backward
    engine.backward(second)
    out["after_backward"] = available()
    engine.step()
    out["after_step"] = available()
    out["stats"] = vars(leafpass.gather_stats(engine)).copy()
    return out


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_step_gather_releases_after_backward_or_at_once_without_one():
    for res in run_ranks(_release_body, world_size=2, timeout=150, pg_timeout=60):
        assert res["after_no_grad_forward"] == 0, res  # nothing needs a backward: released at once
        # kept for the backward (DeepSpeed's hooks may release the leaves after their call)
        assert res["nonleaf_after_forward"] == res["n_nonleaf"] == 4, res
        assert res["after_backward"] == 0 and res["after_step"] == 0, res
        # three compiled calls; the forward that never got a backward was released by the next
        assert res["stats"]["calls"] == 3 and res["stats"]["releases"] == 3, res["stats"]
        assert res["stats"]["policy"] == "step"
