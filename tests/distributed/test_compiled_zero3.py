"""``torch.compile(backend="z3leaf")`` under real DeepSpeed ZeRO-3: 2 ranks, gloo, CPU.

One 2-rank run (the ``runs`` fixture) trains each model twice from the same weights, eager
ZeRO-3 and ZeRO-3 compiled with ``engine.compile(backend="z3leaf")``, and the tests below
read its record:

* ``TwoMoE`` whose ranks route their tokens to different experts, under strict ZeRO-3
  limits (gather each module at its entry, release it after use), compiled with the
  ``eager`` inner compiler and ``gather="hooks"`` (DeepSpeed's hooks gather the non-leaf
  modules, so every leaf's own gathers are visible next to eager ZeRO-3's; the other
  policies are tested in ``test_gather_policies.py``); its collectives are counted per step and phase, and per
  ``prefetch_all`` call through a runtime that wraps leafpass's DeepSpeed runtime;
* ``ManyTinyModel``: a leaf of many tiny submodules, compiled with ``aot_eager`` (``hooks``);
* a tiny Hugging Face Mixtral built offline from a config, whose sparse MoE blocks are
  flagged by DeepSpeed's own ``zero_optimization.leaf_module`` defaults only.

Compiling costs tens of seconds per model on 2 busy cores, so every model is compiled
once per rank and each test asserts on the shared record. Two more runs check that a
failure in the compiled program ends every rank quickly: an exception inside a leaf on
one rank, and ranks that flag different leaves.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import time

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.shared import assert_rank_failed_first, extension_builds, gathers
from leafpass.testing.distributed import DistributedRunError, run_ranks, zero3_config
from leafpass.testing.models import MoEBlock

D, N_EXPERTS, TOP_K, N_TOKENS, N_STEPS = 16, 4, 2, 8, 4
N_TINY = 24
LEAVES = ("moe1", "moe2")
STRICT = {"max_live_parameters": 0, "max_reuse_distance": 0, "prefetch_bucket_size": 0}
TOL = 1e-6
LR = 0.1
# DeepSpeed records its module trace during the first steps (and the leafpass schedule
# check adds one all-reduce to the first compiled forward); counts are exact from here on.
STEADY_FROM = 2
MIXTRAL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
MIXTRAL_LEAVES = ("model.layers.0.mlp", "model.layers.1.mlp")


# ----------------------------------------------------------------- what runs on each rank


class _CountingRuntime:
    """leafpass's DeepSpeed runtime, counting the collectives each ``prefetch_all`` issues."""

    name = "counting-deepspeed"

    def __init__(self, names: dict[int, str]) -> None:
        from leafpass.runtime.deepspeed_runtime import deepspeed_runtime

        self.inner = deepspeed_runtime()
        self.names = names  # id(module) -> qualified name in the model
        self.step = -1
        self.calls: list[dict] = []

    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        return self.inner.logical_shape(param)

    def prefetch_all(self, leaf: torch.nn.Module, params: list) -> None:
        from leafpass.tools.deepspeed_probe import count_collectives

        with count_collectives() as inside:
            self.inner.prefetch_all(leaf, params)
        self.calls.append({
            "step": self.step,
            "leaf": self.names.get(id(leaf), type(leaf).__name__),
            "n_params": len(params),
            "all_gather": inside.all_gather,
            "other": inside.total - inside.all_gather,
        })


def _instrument(engine, counter, current: dict, leaves: tuple[str, ...]) -> None:
    """Per leaf call: the all-gathers DeepSpeed's own pre-forward hook issues, and those of
    the leaf's backward.

    ``before_ds`` is prepended, so it runs after the compiled program's ``prefetch_all``
    and before DeepSpeed's hooks; ``after_ds_pre`` runs after DeepSpeed's pre-forward
    fetch. Tensor hooks on the leaf's (DeepSpeed-wrapped) output and on its input bracket
    the leaf's backward, DeepSpeed's pre-backward fetch included.
    """

    def hooks(name):
        def before_ds(mod, args):
            current[name] = {"s1": counter.snapshot()}

        def after_ds_pre(mod, args):
            rec = current[name]
            rec["hook_ag"] = gathers(rec["s1"], counter.snapshot())
            if args and torch.is_tensor(args[0]) and args[0].requires_grad:
                args[0].register_hook(lambda g: rec.__setitem__("bwd_end", counter.snapshot()))

        def after_ds_post(mod, args, out):
            rec = current[name]
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(lambda g: rec.__setitem__("bwd_start", counter.snapshot()))

        return before_ds, after_ds_pre, after_ds_post

    for name in leaves:
        leaf = engine.module.get_submodule(name)
        before_ds, after_ds_pre, after_ds_post = hooks(name)
        leaf.register_forward_pre_hook(before_ds, prepend=True)
        leaf.register_forward_pre_hook(after_ds_pre)
        leaf.register_forward_hook(after_ds_post)


def _graph_facts(graphs, names: dict[int, str]) -> dict:
    """What the z3leaf backend produced: graphs, and each leaf ``call_module`` in them."""
    from leafpass.leaf_call import leaf_call_of
    from leafpass.passes.insert_prefetch import is_prefetch_node

    leaf_calls, prefetches = [], 0
    for gm in graphs:
        for node in gm.graph.nodes:
            prefetches += is_prefetch_node(node)
            call = leaf_call_of(node) if node.op == "call_module" else None
            if call is not None:
                leaf_calls.append({
                    "target": node.target,
                    "class": type(call.module).__name__,
                    "module": names.get(id(call.module)),
                    "n_params": len(call.params),
                })
    return {"n_graphs": len(graphs), "leaf_calls": leaf_calls, "prefetch_nodes": prefetches}


def _train(engine, loss_fn, n_steps: int, leaves: tuple[str, ...], *, compile_inner: str | None,
           routing: bool = False, gather: str | None = None) -> dict:
    import deepspeed
    import leafpass
    from leafpass.tools.deepspeed_probe import count_collectives
    from leafpass.testing.models import routing_counts

    model = engine.module
    names = {id(m): n for n, m in model.named_modules()}
    rec: dict = {k: [] for k in ("losses", "fwd", "bwd", "opt", "leaves", "routing", "times")}
    rec["flagged"] = [n for n, m in model.named_modules() if getattr(m, "_z3_leaf", False)]
    runtime = _CountingRuntime(names)
    current: dict = {}
    if compile_inner is not None:
        torch._dynamo.reset()  # a fresh cache (and recompile budget) per model
        torch._dynamo.utils.counters.clear()
        options = {"inner": compile_inner, **({"gather": gather} if gather else {})}
        engine.compile(backend="z3leaf", compile_kwargs={"options": options})
    with contextlib.ExitStack() as stack:
        counter = stack.enter_context(count_collectives())
        graphs = stack.enter_context(leafpass.record_graphs())
        stack.enter_context(leafpass.use_runtime(runtime))
        _instrument(engine, counter, current, leaves)
        for step in range(n_steps):
            current.clear()
            runtime.step = step
            start = time.monotonic()
            s0 = counter.snapshot()
            loss = loss_fn(engine)
            s1 = counter.snapshot()
            engine.backward(loss)
            s2 = counter.snapshot()
            engine.step()
            s3 = counter.snapshot()
            rec["times"].append(time.monotonic() - start)
            rec["losses"].append(loss.item())
            rec["fwd"].append(counter.delta(s0, s1))
            rec["bwd"].append(counter.delta(s1, s2))
            rec["opt"].append(counter.delta(s2, s3))
            rec["leaves"].append({
                name: {
                    "hook_ag": r.get("hook_ag"),
                    "bwd_ag": gathers(r["bwd_start"], r["bwd_end"]) if "bwd_start" in r and "bwd_end" in r else None,
                }
                for name, r in current.items()
            })
            if routing:
                rec["routing"].append(routing_counts(model))
    rec["prefetch"] = runtime.calls
    stats = leafpass.gather_stats(model)
    rec["step_gather"], rec["grad_path"] = getattr(stats, "step_gather", None), getattr(stats, "grad_path", None)
    rec["graphs"] = _graph_facts(graphs.graphs, names)
    breaks = torch._dynamo.utils.counters["graph_break"]
    rec["graph_breaks"] = sum(breaks.values()) if compile_inner is not None else 0
    rec["graph_break_reasons"] = sorted({str(reason)[:160] for reason in breaks}) if compile_inner is not None else []
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        rec["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return rec


def _engine(model, config):
    import deepspeed

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _mse(batch):
    x, y = batch
    return lambda engine: F.mse_loss(engine(x), y)


def _runs_body(rank: int, world_size: int, with_mixtral: bool) -> dict:
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.testing.models import ManyTinyBlock, ManyTinyModel, TwoMoE, divergent_routing_batches

    out: dict = {}

    # (a) TwoMoE, ranks routing to different experts; strict limits make every gather visible.
    torch.manual_seed(1234)
    base = TwoMoE(D, N_EXPERTS, TOP_K)
    batches, planned = divergent_routing_batches(base, world_size, N_TOKENS, seed=0)
    set_z3_leaf_modules(base, [MoEBlock])
    out["planned_routing"] = planned
    out["moe_initial"] = {n: p.detach().clone() for n, p in base.named_parameters()}
    for mode, inner in (("eager", None), ("z3leaf", "eager")):
        engine = _engine(copy.deepcopy(base), zero3_config(1, **STRICT))
        out["moe", mode] = _train(engine, _mse(batches[rank]), N_STEPS, LEAVES, compile_inner=inner, routing=True,
                                  gather="hooks")

    # (b) a leaf of many tiny submodules, compiled through aot_autograd.
    torch.manual_seed(99)
    tiny = ManyTinyModel(D, N_TINY)
    set_z3_leaf_modules(tiny, [ManyTinyBlock])
    out["tiny_initial"] = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    gen = torch.Generator().manual_seed(rank)
    batch = (torch.randn(N_TOKENS, D, generator=gen), torch.randn(N_TOKENS, D, generator=gen))
    for mode, inner in (("eager", None), ("z3leaf", "aot_eager")):
        engine = _engine(copy.deepcopy(tiny), zero3_config(1, **STRICT))
        out["tiny", mode] = _train(engine, _mse(batch), N_STEPS, ("block",), compile_inner=inner, gather="hooks")

    # (c) Mixtral, flagged by nobody but DeepSpeed's leaf_module defaults.
    out["mixtral"] = _mixtral_runs(rank) if with_mixtral else None
    return out


def _mixtral_runs(rank: int) -> dict:
    import transformers

    config = transformers.MixtralConfig(**MIXTRAL)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    base.train()
    out: dict = {
        "experts_implementation": base.config._experts_implementation,
        "flagged_before_initialize": [n for n, m in base.named_modules() if getattr(m, "_z3_leaf", False)],
        "block_classes": {n: type(m).__name__ for n, m in base.named_modules() if n in MIXTRAL_LEAVES},
    }
    ids = torch.randint(0, MIXTRAL["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(100 + rank))

    def loss_fn(engine):
        return engine(input_ids=ids, labels=ids).loss

    for mode, inner in (("eager", None), ("z3leaf", "eager")):
        engine = _engine(copy.deepcopy(base), zero3_config(1))  # no leaf flags, no leaf_module key
        out["z3_leaf_attr", mode] = [bool(getattr(engine.module.get_submodule(n), "_z3_leaf", False))
                                     for n in MIXTRAL_LEAVES]
        out[mode] = _train(engine, loss_fn, N_STEPS, MIXTRAL_LEAVES, compile_inner=inner)
    return out


@pytest.fixture(scope="module")
def runs(extension_builds_before) -> list[dict]:
    with_mixtral = importlib.util.find_spec("transformers") is not None
    start = time.monotonic()
    values = run_ranks(_runs_body, with_mixtral, world_size=2, timeout=280, pg_timeout=90,
                       env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    print(f"2-rank eager vs z3leaf ZeRO-3 run: {time.monotonic() - start:.1f}s")
    return values


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def _assert_parity(runs, model: str, initial: dict, frozen: set[str] = frozenset()) -> None:
    """Eager and z3leaf ZeRO-3 agree on every loss and on the parameters after the steps;
    every parameter moved except ``frozen`` ones (experts no rank ever routed to)."""
    for rank, res in enumerate(runs):
        eager, comp = res[model, "eager"], res[model, "z3leaf"]
        assert len(comp["losses"]) == N_STEPS
        diffs = [abs(a - b) for a, b in zip(eager["losses"], comp["losses"])]
        assert max(diffs) <= TOL, (rank, model, eager["losses"], comp["losses"])
        assert len(set(eager["losses"])) == N_STEPS, f"the loss did not move: {eager['losses']}"
        assert _max_diff(eager["final"], comp["final"]) <= TOL, (rank, model)
        unchanged = {n for n, p in comp["final"].items() if torch.equal(p, initial[n])}
        assert unchanged == set(frozen), (rank, model, sorted(unchanged ^ set(frozen)))
    # every rank ends with the same parameters
    for name, p in runs[0][model, "z3leaf"]["final"].items():
        assert torch.equal(p, runs[1][model, "z3leaf"]["final"][name]), (model, name)


def _never_routed(runs) -> set[str]:
    """Parameters of the experts that got no token on any rank at any step."""
    frozen = set()
    for b, leaf in enumerate(LEAVES):
        for e in range(N_EXPERTS):
            if all(res["moe", "z3leaf"]["routing"][step][b][e] == 0 for res in runs for step in range(N_STEPS)):
                frozen.update(f"{leaf}.experts.{e}.{p}" for p in ("up.weight", "up.bias", "down.weight", "down.bias"))
    return frozen


# --------------------------------------------------------------------------------- parity


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_twomoe_with_divergent_routing_matches_eager_zero3(runs):
    _assert_parity(runs, "moe", runs[0]["moe_initial"], _never_routed(runs))
    for rank, res in enumerate(runs):
        comp = res["moe", "z3leaf"]
        # the compiled program kept each MoE block opaque, with one prefetch before it
        assert [c["module"] for c in comp["graphs"]["leaf_calls"]] == list(LEAVES), comp["graphs"]
        assert comp["graphs"]["prefetch_nodes"] == len(LEAVES)
        assert comp["routing"] == res["moe", "eager"]["routing"], rank
    # the ranks route differently inside the compiled run, at every step
    for step in range(N_STEPS):
        routing = [res["moe", "z3leaf"]["routing"][step] for res in runs]  # [rank][block][expert]
        if step == 0:
            assert routing == [res["planned_routing"][rank] for rank, res in enumerate(runs)]
        for rank in range(2):
            other = 1 - rank
            split = [(b, e) for b in range(len(LEAVES)) for e in range(N_EXPERTS)
                     if routing[rank][b][e] == 0 and routing[other][b][e] > 0]
            assert split, f"step {step}: rank {rank} skips no expert that rank {other} uses: {routing}"


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_leaf_of_many_tiny_submodules_matches_eager_zero3_with_aot_eager(runs):
    _assert_parity(runs, "tiny", runs[0]["tiny_initial"])
    for rank, res in enumerate(runs):
        comp, eager = res["tiny", "z3leaf"], res["tiny", "eager"]
        assert [(c["module"], c["n_params"]) for c in comp["graphs"]["leaf_calls"]] == [("block", 2 * N_TINY)]
        by_step = [[c for c in comp["prefetch"] if c["step"] == s] for s in range(N_STEPS)]
        for step in range(N_STEPS):
            # the 48 parameters of the leaf's 24 submodules: one all-gather at its entry
            assert [(c["leaf"], c["n_params"], c["all_gather"], c["other"]) for c in by_step[step]] == [
                ("block", 2 * N_TINY, 1, 0)], (rank, step, by_step[step])
            assert comp["leaves"][step]["block"]["hook_ag"] == 0, (rank, step)
            assert eager["leaves"][step]["block"]["hook_ag"] == 1, (rank, step)
            assert comp["leaves"][step]["block"]["bwd_ag"] == eager["leaves"][step]["block"]["bwd_ag"] == 1
            if step >= STEADY_FROM:
                assert comp["fwd"][step] == eager["fwd"][step] and comp["fwd"][step]["all_gather"] == 3
        print(f"rank {rank} ManyTinyModel z3leaf (aot_eager): {comp['graphs']['n_graphs']} graphs, "
              f"{comp['graph_breaks']} graph breaks, step times {[round(t, 2) for t in comp['times']]}")


@pytest.mark.distributed
@pytest.mark.transformers
@pytest.mark.timeout(300)
def test_mixtral_flagged_by_deepspeed_defaults_matches_eager_zero3(runs):
    pytest.importorskip("transformers")
    for rank, res in enumerate(runs):
        mx = res["mixtral"]
        assert mx["experts_implementation"] == "eager"
        assert set(mx["block_classes"].values()) == {"MixtralSparseMoeBlock"}, mx["block_classes"]
        # nobody flagged anything; deepspeed.initialize applied its leaf_module defaults
        assert mx["flagged_before_initialize"] == []
        for mode in ("eager", "z3leaf"):
            assert mx["z3_leaf_attr", mode] == [True, True], (rank, mode)
            assert mx[mode]["flagged"] == list(MIXTRAL_LEAVES), (rank, mode, mx[mode]["flagged"])
        eager, comp = mx["eager"], mx["z3leaf"]
        diffs = [abs(a - b) for a, b in zip(eager["losses"], comp["losses"])]
        assert len(comp["losses"]) == N_STEPS and max(diffs) <= TOL, (rank, eager["losses"], comp["losses"])
        assert len(set(eager["losses"])) == N_STEPS, eager["losses"]
        assert _max_diff(eager["final"], comp["final"]) <= TOL, rank
        # leafpass saw both blocks: a call_module leaf each, and a prefetch_all per call
        calls = comp["graphs"]["leaf_calls"]
        assert {c["module"] for c in calls} == set(MIXTRAL_LEAVES), calls
        assert {(c["class"], c["n_params"]) for c in calls} == {("MixtralSparseMoeBlock", 3)}, calls
        for step in range(N_STEPS):
            called = [c["leaf"] for c in comp["prefetch"] if c["step"] == step]
            assert called == list(MIXTRAL_LEAVES), (rank, step, called)
            assert all(c["all_gather"] == 0 and c["other"] == 0 for c in comp["prefetch"])
            # DeepSpeed's default limits make gather='auto' choose 'step': one collective for
            # the whole model before the compiled forward (on gloo an all-reduce into place,
            # leafpass.runtime.deepspeed_step_gather); each leaf's prefetch_all finds its
            # parameters gathered
            assert comp["step_gather"] == "in place", (rank, comp["step_gather"])
            assert comp["fwd"][step].get("all_gather", 0) == 0, (rank, step, comp["fwd"][step])
            # (step 0 also runs the one-time check that every rank compiled the same schedule)
            assert comp["fwd"][step].get("all_reduce", 0) == 1 or step == 0, (rank, step, comp["fwd"][step])
        # eager ZeRO-3 gathers module by module while it records its trace (step 0), then
        # prefetches this small model in one bucket
        assert eager["fwd"][0].get("all_gather", 0) > 1 + len(MIXTRAL_LEAVES), (rank, eager["fwd"][0])
        assert comp["graphs"]["n_graphs"] == 1 and comp["graph_breaks"] == 0, (rank, comp["graph_break_reasons"])
        print(f"rank {rank} Mixtral z3leaf: {comp['graphs']['n_graphs']} graphs, {comp['graph_breaks']} graph "
              f"breaks, leaf calls {[(c['target'], c['module']) for c in calls]}, step times "
              f"{[round(t, 2) for t in comp['times']]}")
    final = [res["mixtral"]["z3leaf"]["final"] for res in runs]
    for name, p in final[0].items():
        assert torch.equal(p, final[1][name]), name


# ---------------------------------------------------------------------------- collectives


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_one_all_gather_per_leaf_entry_under_strict_limits(runs):
    for rank, res in enumerate(runs):
        eager, comp = res["moe", "eager"], res["moe", "z3leaf"]
        for step in range(N_STEPS):
            prefetches = [c for c in comp["prefetch"] if c["step"] == step]
            # one prefetch_all per leaf entry, each one all-gather and nothing else
            assert [(c["leaf"], c["n_params"], c["all_gather"], c["other"]) for c in prefetches] == [
                (leaf, 17, 1, 0) for leaf in LEAVES], (rank, step, prefetches)
            for leaf in LEAVES:
                c, e = comp["leaves"][step][leaf], eager["leaves"][step][leaf]
                # DeepSpeed's pre-forward hook finds the leaf gathered; in eager it gathers once
                assert c["hook_ag"] == 0 and e["hook_ag"] == 1, (rank, step, leaf, c, e)
                # backward: DeepSpeed's pre-backward hook re-gathers the released leaf once
                assert c["bwd_ag"] is not None and c["bwd_ag"] <= 1 and c["bwd_ag"] == e["bwd_ag"], (rank, step, leaf)
            if step >= STEADY_FROM:
                # the prefetches replace DeepSpeed's gathers and add none: Linear, MoE, Linear, MoE;
                # leafpass's gradient path (grad_path="leafpass", on gloo) reduces each of
                # DeepSpeed's gradient buckets with an all-reduce where DeepSpeed reduce-scatters it
                assert comp["grad_path"] == "leafpass", (rank, comp["grad_path"])
                for phase in ("fwd", "bwd", "opt"):
                    expected = dict(eager[phase][step])
                    if phase == "bwd" and "reduce_scatter" in expected:
                        expected["all_reduce"] = expected.get("all_reduce", 0) + expected.pop("reduce_scatter")
                    assert comp[phase][step] == expected, (rank, step, phase, comp[phase], eager[phase])
                assert comp["fwd"][step]["all_gather"] == 4 and comp["bwd"][step]["all_gather"] == 4
        print(f"rank {rank} z3leaf TwoMoE per step: fwd {comp['fwd']}, bwd {comp['bwd']}, opt {comp['opt']}; "
              f"{comp['graphs']['n_graphs']} graphs, {comp['graph_breaks']} graph breaks; "
              f"step times {[round(t, 2) for t in comp['times']]}")


# ------------------------------------------------------------------------ failure handling


_EXPLODE = {"armed": False, "message": ""}


class ExplodingMoEBlock(MoEBlock):
    """A MoEBlock whose real (not shape-inference) forward raises while ``_EXPLODE`` is armed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._subclasses.fake_tensor import FakeTensor

        # leafpass runs the leaf's forward on fakes or zeros (no grad) at compile time
        if _EXPLODE["armed"] and torch.is_grad_enabled() and not isinstance(x, FakeTensor):
            raise RuntimeError(_EXPLODE["message"])
        return super().forward(x)


class LinearThenExplodingMoE(torch.nn.Module):
    """``Linear -> ExplodingMoEBlock``: compiles faster than TwoMoE.

    The Linear comes first because ZeRO-3 (eager too) cannot run backward through a leaf
    none of whose inputs requires grad; a plain ``forward`` (no loop over an
    ``nn.Sequential``, which Dynamo does not compile here) keeps the leaf in the graph.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(D, D)
        self.moe = ExplodingMoEBlock(D, N_EXPERTS, TOP_K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.inp(x))


def _exploding_body(rank: int, world_size: int, fail_rank: int, fail_step: int, gather: str = "auto") -> str:
    from deepspeed.utils import set_z3_leaf_modules

    torch.manual_seed(0)
    model = LinearThenExplodingMoE()
    set_z3_leaf_modules(model, [MoEBlock])
    engine = _engine(model, zero3_config(1, **STRICT))
    engine.compile(backend="z3leaf", compile_kwargs={"options": {"inner": "eager", "gather": gather}})
    x = torch.randn(N_TOKENS, D, generator=torch.Generator().manual_seed(rank))
    for step in range(fail_step + 3):
        _EXPLODE["armed"] = rank == fail_rank and step == fail_step
        _EXPLODE["message"] = f"leaf exploded on rank {rank} at step {step}"
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    return "finished"


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_exception_inside_a_compiled_leaf_on_one_rank_fails_every_rank_fast():
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_ranks(_exploding_body, 1, 1, world_size=2, timeout=150, pg_timeout=30)
    elapsed = time.monotonic() - start
    err = info.value
    text = str(err)
    assert_rank_failed_first(err, 1, "RuntimeError: leaf exploded on rank 1 at step 1")
    rank1 = err.reports[1].error
    # it raised from the leaf, called by leafpass's lowered program (the compiled run), not
    # from a leaf that runs eagerly because its caller could not be compiled
    assert "leafpass/lower.py" in rank1 and "_run_uncaptured_leaf" not in rank1, rank1
    # rank 0 fails because rank 1 left, at once (not after the 30 s process-group timeout)
    lag = err.reports[0].reported_at - err.reports[1].reported_at
    assert 0 <= lag < 15, (lag, text)
    assert elapsed < 150, elapsed
    print(f"exception in a compiled leaf: every rank out in {elapsed:.1f}s, rank 0 {lag:.2f}s after rank 1")


def _mismatched_flags_body(rank: int, world_size: int, gather: str = "auto") -> str:
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.testing.models import TwoMoE

    torch.manual_seed(0)
    model = TwoMoE(D, N_EXPERTS, TOP_K)
    if rank == 0:
        set_z3_leaf_modules(model, [MoEBlock])  # moe1 and moe2
    else:
        set_z3_leaf_modules(model.moe1, [MoEBlock])  # moe1 only
    engine = _engine(model, zero3_config(1, **STRICT))
    engine.compile(backend="z3leaf", compile_kwargs={"options": {"inner": "eager", "gather": gather}})
    x = torch.randn(N_TOKENS, D, generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    return "finished"


@pytest.fixture(scope="module")
def mismatched_flags_run() -> tuple[DistributedRunError, float]:
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        # gather="hooks": the check of the flagged leaves at the first compiled call
        # (schedule_check.check_same_leaves, which names them) sees the difference before
        # any collective of the step; "step" and "module" see it in the cross-rank gather
        # check (test_gather_policies.py)
        run_ranks(_mismatched_flags_body, "hooks", world_size=2, timeout=150, pg_timeout=30)
    return info.value, time.monotonic() - start


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_ranks_with_different_leaf_flags_all_exit_nonzero_fast(mismatched_flags_run):
    err, elapsed = mismatched_flags_run
    assert err.hung_ranks == [], str(err)
    assert all(code not in (0, None) for code in err.exitcodes), (err.exitcodes, str(err))
    assert elapsed < 150, elapsed
    print(f"different leaf flags: every rank out in {elapsed:.1f}s, exit codes {err.exitcodes}; "
          f"last lines: {[(r.error or '').strip().splitlines()[-1:] for r in err.reports]}")


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_ranks_with_different_leaf_flags_raise_leaf_schedule_mismatch_naming_moe2(mismatched_flags_run):
    err, _elapsed = mismatched_flags_run
    for report in err.reports:
        assert report.error is not None, (report.rank, report.exitcode, str(err))
        last = report.error.strip().splitlines()[-1]
        assert "LeafScheduleMismatch" in last and "moe2" in last, (report.rank, last)


# ----------------------------------------------------------------------------- no JIT build


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_no_deepspeed_op_was_jit_built(runs, mismatched_flags_run, extension_builds_before):
    assert extension_builds() == extension_builds_before
