"""leafpass's DeepSpeed runtime against eager ZeRO-3: real DeepSpeed, 2 ranks, gloo, CPU.

Before each call of a ZeRO-3 leaf, the compiled program calls
``deepspeed_runtime().prefetch_all(leaf, params)`` and then calls the leaf eagerly. Here a
forward pre-hook registered with ``prepend=True`` (so it runs before DeepSpeed's own hooks)
does the same on an eager ZeRO-3 engine, and every result is compared with an identical
engine that does not prefetch. One 2-rank run (the ``runs`` fixture) trains, eager and
prefetching, ``TwoMoE`` under three sets of ZeRO-3 limits (``CONFIGS``: gather each module
at its entry and release it after use; DeepSpeed's defaults; a one-element trace prefetch
that leaves a leaf partly in flight) and a model whose leaf holds many tiny submodules, and
the tests below read its record. Each rank gets its own batch, chosen so that the ranks
route tokens to different experts. The last tests check failure handling and the harness.
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.shared import assert_rank_failed_first, extension_builds, gathers
from leafpass.testing.distributed import DistributedRunError, run_ranks, zero3_config

D, N_EXPERTS, TOP_K, N_TOKENS, N_STEPS = 16, 4, 2, 8, 4
LEAVES = ("moe1", "moe2")
STRICT = {"max_live_parameters": 0, "max_reuse_distance": 0, "prefetch_bucket_size": 0}
# "bucket": DeepSpeed's trace-based prefetch starts one parameter of the next module early, so
# from the second step a leaf arrives with one parameter in flight and the rest partitioned.
BUCKET = {"max_reuse_distance": 0, "prefetch_bucket_size": 1}
CONFIGS = {"strict": STRICT, "default": {}, "bucket": BUCKET}
MODES = ("eager", "prefetch")
TOL = 1e-6
N_TINY = 64  # leafpass.testing.models.ManyTinyModel defaults to 200; 64 keeps the run short


# ----------------------------------------------------------------- what runs on each rank


def _statuses(module: torch.nn.Module) -> list[str]:
    return [p.ds_status.name for p in module.parameters()]


def _instrument(engine, counter, prefetch: bool, current: dict, leaves: tuple[str, ...]) -> None:
    """Hooks on each leaf that record, per call, who gathered what and the parameter states.

    ``before_ds`` runs before DeepSpeed's hooks (prepend=True) and prefetches as the compiled
    program would; ``after_ds_pre`` runs after DeepSpeed's pre-forward fetch; ``after_ds_post``
    after DeepSpeed's post-forward release. Tensor hooks on the leaf's (DeepSpeed-wrapped)
    output and input bracket the leaf's backward: DeepSpeed's pre-backward fetch runs right
    after the first and its post-backward release right after the second.
    """
    from leafpass.runtime.deepspeed import deepspeed_runtime

    # Test-only peek at DeepSpeed's live-parameter count (private, name-mangled), which the
    # coordinator adds to when it gathers and subtracts from when it releases.
    coordinator = engine.optimizer._get_param_coordinator()

    def n_available():
        return coordinator._PartitionedParameterCoordinator__n_available_params

    def hooks(name):
        def before_ds(mod, args):
            rec = current.setdefault(name, {})
            rec["status_before"] = _statuses(mod)
            s0 = counter.snapshot()
            if prefetch:
                deepspeed_runtime().prefetch_all(mod, list(mod.parameters()))
            rec["s1"] = counter.snapshot()
            rec["prefetch_ag"] = gathers(s0, rec["s1"])
            rec["status_after_prefetch"] = _statuses(mod)

        def after_ds_pre(mod, args):
            rec = current[name]
            rec["hook_ag"] = gathers(rec["s1"], counter.snapshot())
            rec["status_entry"] = _statuses(mod)
            rec["n_available_entry"] = n_available()
            if args[0].requires_grad:
                args[0].register_hook(lambda g: rec.__setitem__("bwd_end", counter.snapshot()))

        def after_ds_post(mod, args, out):
            rec = current[name]
            rec["status_after_fwd"] = _statuses(mod)
            rec["numel_after_fwd"] = sum(p.data.numel() for p in mod.parameters())
            rec["n_available_after_fwd"] = n_available()
            if out.requires_grad:
                out.register_hook(lambda g: rec.__setitem__("bwd_start", counter.snapshot()))

        return before_ds, after_ds_pre, after_ds_post

    for name in leaves:
        leaf = engine.module.get_submodule(name)
        assert getattr(leaf, "_z3_leaf", False), name
        before_ds, after_ds_pre, after_ds_post = hooks(name)
        leaf.register_forward_pre_hook(before_ds, prepend=True)
        leaf.register_forward_pre_hook(after_ds_pre)
        leaf.register_forward_hook(after_ds_post)


def _train(engine, batch, prefetch: bool, n_steps: int, leaves: tuple[str, ...] = LEAVES,
           full_grads: bool = True) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    from leafpass.tools.deepspeed_probe import count_collectives
    from leafpass.testing.models import routing_counts

    model = engine.module
    leaf_params = [(n, p) for n, p in model.named_parameters() if n.split(".")[0] in leaves]
    x, y = batch
    rec: dict = {k: [] for k in ("losses", "fwd", "bwd", "opt", "leaves", "routing", "grad_missing",
                                 "full_grads", "status_after_step", "active_after_step", "numel_after_step")}
    current: dict = {}
    with count_collectives() as counter:
        _instrument(engine, counter, prefetch, current, leaves)
        for _ in range(n_steps):
            current.clear()
            s0 = counter.snapshot()
            loss = F.mse_loss(engine(x), y)
            s1 = counter.snapshot()
            engine.backward(loss)
            s2 = counter.snapshot()
            # Read the reduced gradients before the optimizer step consumes them.
            grad_missing = [n for n, p in leaf_params if safe_get_local_grad(p) is None]
            grads = {}
            if full_grads:
                grads = {n: safe_get_full_grad(p).detach().clone() for n, p in model.named_parameters()}
            s3 = counter.snapshot()
            engine.step()
            s4 = counter.snapshot()
            rec["losses"].append(loss.item())
            rec["fwd"].append(counter.delta(s0, s1))
            rec["bwd"].append(counter.delta(s1, s2))
            rec["opt"].append(counter.delta(s3, s4))
            rec["leaves"].append({
                name: {
                    "prefetch_ag": r["prefetch_ag"],
                    "hook_ag": r["hook_ag"],
                    "bwd_ag": gathers(r["bwd_start"], r["bwd_end"]) if "bwd_start" in r and "bwd_end" in r else None,
                    "status_before": r["status_before"],
                    "status_after_prefetch": r["status_after_prefetch"],
                    "status_entry": r["status_entry"],
                    "status_after_fwd": r["status_after_fwd"],
                    "numel_after_fwd": r["numel_after_fwd"],
                    "n_available": (r["n_available_entry"], r["n_available_after_fwd"]),
                }
                for name, r in current.items()
            })
            rec["routing"].append(routing_counts(model))
            rec["grad_missing"].append(grad_missing)
            rec["full_grads"].append(grads)
            rec["status_after_step"].append({n: p.ds_status.name for n, p in model.named_parameters()})
            rec["active_after_step"].append(
                {n: sorted(p.ds_active_sub_modules) for n, p in model.named_parameters() if p.ds_active_sub_modules})
            rec["numel_after_step"].append({n: p.data.numel() for n, p in leaf_params})
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        rec["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return rec


def _compare_body(rank: int, world_size: int, n_steps: int) -> dict:
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.testing.models import ManyTinyBlock, ManyTinyModel, MoEBlock, TwoMoE, divergent_routing_batches

    torch.manual_seed(1234)
    base = TwoMoE(D, N_EXPERTS, TOP_K)
    batches, planned_routing = divergent_routing_batches(base, world_size, N_TOKENS, seed=0)
    set_z3_leaf_modules(base, [MoEBlock])
    initial = {n: p.detach().clone() for n, p in base.named_parameters()}
    out: dict = {"planned_routing": planned_routing, "initial": initial}
    for cfg_name, limits in CONFIGS.items():
        for mode in MODES:
            model = copy.deepcopy(base)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_config(1, **limits))
            if "runtime" not in out:
                out["runtime"] = _runtime_facts(engine.module)
            out[cfg_name, mode] = _train(engine, batches[rank], mode == "prefetch", n_steps)

    # A leaf of many tiny submodules (128 parameters): still one gather at its entry.
    torch.manual_seed(99)
    tiny = ManyTinyModel(D, N_TINY)
    set_z3_leaf_modules(tiny, [ManyTinyBlock])
    gen = torch.Generator().manual_seed(rank)
    batch = (torch.randn(N_TOKENS, D, generator=gen), torch.randn(N_TOKENS, D, generator=gen))
    for mode in MODES:
        model = copy.deepcopy(tiny)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_config(1, **STRICT))
        out["tiny", mode] = _train(engine, batch, mode == "prefetch", 2, leaves=("block",), full_grads=False)
    return out


def _runtime_facts(model) -> dict:
    """What leafpass.runtime picks for partitioned parameters, and the shapes it reports."""
    import deepspeed.comm.comm as ds_comm

    from leafpass.runtime import logical_shape, runtime_for
    from leafpass.runtime.deepspeed import DeepSpeedRuntime, deepspeed_runtime

    params = list(model.moe1.parameters())
    runtime = runtime_for(params)
    return {
        "is_deepspeed_runtime": isinstance(runtime, DeepSpeedRuntime) and runtime is deepspeed_runtime(),
        # Test-only peek: the CPU shared-memory op DeepSpeed would have JIT-built (private).
        "shm_comm_op": repr(getattr(ds_comm.cdb, "shm_comm_op", "missing")),
        "shapes": {n: (tuple(p.shape), tuple(logical_shape(p))) for n, p in model.named_parameters()},
    }


@pytest.fixture(scope="module")
def runs(extension_builds_before) -> list[dict]:
    start = time.monotonic()
    values = run_ranks(_compare_body, N_STEPS, world_size=2, timeout=150, pg_timeout=60)
    print(f"2-rank ZeRO-3 comparison run: {time.monotonic() - start:.1f}s")
    return values


# --------------------------------------------------------------------------------- tests


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_prefetch_matches_eager_zero3(runs):
    for rank, res in enumerate(runs):
        for cfg in CONFIGS:
            eager, pre = res[cfg, "eager"], res[cfg, "prefetch"]
            losses_e, losses_p = torch.tensor(eager["losses"]), torch.tensor(pre["losses"])
            assert (losses_e - losses_p).abs().max().item() <= TOL, (rank, cfg, eager["losses"], pre["losses"])
            assert len(set(eager["losses"])) == N_STEPS, f"the loss did not move: {eager['losses']}"
            for step in range(N_STEPS):
                for name, g in eager["full_grads"][step].items():
                    diff = (g - pre["full_grads"][step][name]).abs().max().item()
                    assert diff <= TOL, (rank, cfg, step, name, diff)
            moved = 0
            for name, p in eager["final"].items():
                diff = (p - pre["final"][name]).abs().max().item()
                assert diff <= TOL, (rank, cfg, name, diff)
                moved += not torch.equal(p, res["initial"][name])
            assert moved == len(eager["final"]), "some parameters never changed"
    # Both ranks end with the same (gathered) parameters.
    for cfg in CONFIGS:
        for name, p in runs[0][cfg, "prefetch"]["final"].items():
            assert torch.equal(p, runs[1][cfg, "prefetch"]["final"][name]), (cfg, name)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_one_all_gather_per_leaf_entry(runs):
    for rank, res in enumerate(runs):
        eager, pre = res["strict", "eager"], res["strict", "prefetch"]
        for step in range(N_STEPS):
            for leaf in LEAVES:
                p, e = pre["leaves"][step][leaf], eager["leaves"][step][leaf]
                # Prefetching: one gather, DeepSpeed's pre-forward hook finds nothing to fetch.
                assert (p["prefetch_ag"], p["hook_ag"]) == (1, 0), (rank, step, leaf, p)
                # Eager ZeRO-3: the hook's one coalesced gather.
                assert (e["prefetch_ag"], e["hook_ag"]) == (0, 1), (rank, step, leaf, e)
                # Backward: DeepSpeed's pre-backward hook re-gathers the released leaf once.
                assert p["bwd_ag"] is not None and p["bwd_ag"] <= 1 and p["bwd_ag"] == e["bwd_ag"], (rank, step, leaf)
            # The prefetch replaces DeepSpeed's gather; it adds none.
            assert pre["fwd"][step] == eager["fwd"][step], (rank, step)
            assert pre["bwd"][step] == eager["bwd"][step], (rank, step)
            assert pre["opt"][step] == eager["opt"][step], (rank, step)
        # Once the trace is recorded, each step gathers every module once in forward and once
        # in backward: Linear, MoE, Linear, MoE.
        assert pre["fwd"][-1]["all_gather"] == 4 and pre["bwd"][-1]["all_gather"] == 4, pre["fwd"][-1]

        # Default limits: DeepSpeed's trace-based prefetch has already started (or finished)
        # the leaves' gathers when prefetch_all runs from the second step on, so it gathers
        # nothing and the hook waits for the gather in flight.
        dp, de = res["default", "prefetch"], res["default", "eager"]
        for leaf in LEAVES:
            assert dp["leaves"][0][leaf]["prefetch_ag"] == 1 and dp["leaves"][0][leaf]["hook_ag"] == 0
            for step in range(1, N_STEPS):
                rec = dp["leaves"][step][leaf]
                assert "NOT_AVAILABLE" not in rec["status_before"], (rank, step, leaf, rec["status_before"])
                assert rec["prefetch_ag"] == 0 and rec["hook_ag"] == 0, (rank, step, leaf, rec)
        for step in range(N_STEPS):
            assert dp["fwd"][step] == de["fwd"][step] and dp["bwd"][step] == de["bwd"][step], (rank, step)

        # Bucket: the leaf arrives with a parameter in flight. prefetch_all gathers only the
        # partitioned rest, in one call; DeepSpeed's hook then gathers nothing of this leaf
        # (every parameter is AVAILABLE or INFLIGHT, and it only gathers NOT_AVAILABLE ones)
        # but still starts its one-parameter prefetch of the next module, as in eager.
        bp, be = res["bucket", "prefetch"], res["bucket", "eager"]
        for step in range(N_STEPS):
            for leaf in LEAVES:
                p, e = bp["leaves"][step][leaf], be["leaves"][step][leaf]
                if step > 0:
                    assert sorted(set(p["status_before"])) == ["INFLIGHT", "NOT_AVAILABLE"], p["status_before"]
                    assert p["status_before"].count("INFLIGHT") == 1
                    assert p["status_after_prefetch"].count("INFLIGHT") == 1
                assert "NOT_AVAILABLE" not in p["status_after_prefetch"], (rank, step, leaf)
                assert p["prefetch_ag"] == 1 and p["prefetch_ag"] + p["hook_ag"] == e["hook_ag"], (rank, step, p, e)
                assert p["bwd_ag"] == e["bwd_ag"], (rank, step, leaf)
            assert bp["fwd"][step] == be["fwd"][step] and bp["bwd"][step] == be["bwd"][step], (rank, step)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_leaf_with_many_tiny_submodules_is_gathered_once(runs):
    for rank, res in enumerate(runs):
        eager, pre = res["tiny", "eager"], res["tiny", "prefetch"]
        assert eager["losses"] == pre["losses"] or max(
            abs(a - b) for a, b in zip(eager["losses"], pre["losses"])) <= TOL
        for name, p in eager["final"].items():
            assert (p - pre["final"][name]).abs().max().item() <= TOL, name
        for step in range(2):
            p, e = pre["leaves"][step]["block"], eager["leaves"][step]["block"]
            assert len(p["status_before"]) == 2 * N_TINY
            assert (p["prefetch_ag"], p["hook_ag"]) == (1, 0) and (e["prefetch_ag"], e["hook_ag"]) == (0, 1)
            assert p["bwd_ag"] == e["bwd_ag"] == 1
            assert set(p["status_after_fwd"]) == {"NOT_AVAILABLE"}
            assert pre["fwd"][step] == eager["fwd"][step] and pre["fwd"][step]["all_gather"] == 3


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_ranks_route_differently_and_every_leaf_param_gets_a_gradient(runs):
    for cfg in CONFIGS:
        per_rank = [res[cfg, "prefetch"] for res in runs]
        for step in range(N_STEPS):
            routing = [r["routing"][step] for r in per_rank]  # [rank][block][expert]
            if step == 0:
                assert routing == [res["planned_routing"][rank] for rank, res in enumerate(runs)]
                for rank in range(2):
                    other = 1 - rank
                    split = [(b, e) for b in range(len(LEAVES)) for e in range(N_EXPERTS)
                             if routing[rank][b][e] == 0 and routing[other][b][e] > 0]
                    assert split, f"rank {rank} skips no expert that rank {other} uses: {routing}"
            for rank, r in enumerate(per_rank):
                assert r["grad_missing"][step] == [], (cfg, step, rank, r["grad_missing"][step])
            grads = [r["full_grads"][step] for r in per_rank]
            for name in grads[0]:
                assert torch.equal(grads[0][name], grads[1][name]), (cfg, step, name)
            for b, leaf in enumerate(LEAVES):
                assert grads[0][f"{leaf}.router.weight"].abs().sum() > 0
                for e in range(N_EXPERTS):
                    used = any(routing[rank][b][e] > 0 for rank in range(2))
                    for pname in ("up.weight", "up.bias", "down.weight", "down.bias"):
                        g = grads[0][f"{leaf}.experts.{e}.{pname}"]
                        assert (g.abs().sum() > 0) == used, (cfg, step, leaf, e, pname, routing)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_release_matches_eager(runs):
    for rank, res in enumerate(runs):
        for cfg in CONFIGS:
            eager, pre = res[cfg, "eager"], res[cfg, "prefetch"]
            for step in range(N_STEPS):
                for leaf in LEAVES:
                    p, e = pre["leaves"][step][leaf], eager["leaves"][step][leaf]
                    assert set(p["status_entry"]) == {"AVAILABLE"} == set(e["status_entry"])
                    assert p["status_after_fwd"] == e["status_after_fwd"], (rank, cfg, step, leaf)
                    assert p["numel_after_fwd"] == e["numel_after_fwd"], (rank, cfg, step, leaf)
                    # DeepSpeed's live-parameter count agrees with eager at entry and after release.
                    assert p["n_available"] == e["n_available"], (rank, cfg, step, leaf, p, e)
                assert pre["status_after_step"][step] == eager["status_after_step"][step], (rank, cfg, step)
                assert pre["active_after_step"][step] == {} == eager["active_after_step"][step], (rank, cfg, step)
            if cfg == "strict":
                for step in range(N_STEPS):
                    for leaf in LEAVES:
                        rec = pre["leaves"][step][leaf]
                        assert set(rec["status_after_fwd"]) == {"NOT_AVAILABLE"} and rec["numel_after_fwd"] == 0
                    assert set(pre["status_after_step"][step].values()) == {"NOT_AVAILABLE"}
                    assert set(pre["numel_after_step"][step].values()) == {0}


# ------------------------------------------------------------------------ failure handling


def _failing_body(rank: int, world_size: int, fail_rank: int, fail_step: int) -> str:
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.runtime.deepspeed import deepspeed_runtime
    from leafpass.testing.models import MoEBlock, TwoMoE

    torch.manual_seed(0)
    model = TwoMoE(D, N_EXPERTS, TOP_K)
    set_z3_leaf_modules(model, [MoEBlock])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_config(1, **STRICT))
    leaf = engine.module.moe1
    leaf.register_forward_pre_hook(lambda m, a: deepspeed_runtime().prefetch_all(m, list(m.parameters())),
                                   prepend=True)
    state = {"step": 0}
    forward = leaf.forward

    def exploding_forward(*args, **kwargs):
        if rank == fail_rank and state["step"] == fail_step:
            raise RuntimeError(f"leaf exploded on rank {rank} at step {fail_step}")
        return forward(*args, **kwargs)

    leaf.forward = exploding_forward
    x = torch.randn(N_TOKENS, D, generator=torch.Generator().manual_seed(rank))
    for step in range(fail_step + 3):
        state["step"] = step
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    return "finished"


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_exception_inside_a_leaf_on_one_rank_fails_every_rank_fast():
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_ranks(_failing_body, 1, 1, world_size=2, timeout=60, pg_timeout=20)
    elapsed = time.monotonic() - start
    err = info.value
    assert elapsed < 60, elapsed
    assert_rank_failed_first(err, 1, "RuntimeError: leaf exploded on rank 1 at step 1")


def _hang_body(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_harness_kills_and_names_a_hung_rank():
    # 30 s leaves room for both ranks to start (importing torch and leafpass) on a busy machine
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_ranks(_hang_body, world_size=2, timeout=30, deepspeed=False)
    assert time.monotonic() - start < 90
    assert info.value.hung_ranks == [1], str(info.value)
    assert "rank(s) [1] still running after 30s" in str(info.value)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_deepspeed_built_nothing(runs, extension_builds_before):
    assert [res["runtime"]["shm_comm_op"] for res in runs] == ["None", "None"]
    assert extension_builds() == extension_builds_before


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_runtime_is_chosen_for_partitioned_params_and_reports_full_shapes(runs):
    for res in runs:
        facts = res["runtime"]
        assert facts["is_deepspeed_runtime"]
        for name, (shape, logical) in facts["shapes"].items():
            assert shape == (0,), (name, shape)  # partitioned: an empty placeholder
            assert logical == tuple(res["initial"][name].shape), (name, logical)


# --------------------------------------------------------------------- no processes needed


@pytest.mark.timeout(60)
def test_importing_the_runtime_does_not_import_deepspeed():
    import subprocess
    import sys

    code = (
        "import sys, leafpass.runtime.deepspeed, leafpass.tools.deepspeed_probe\n"
        "assert 'deepspeed' not in sys.modules, sorted(m for m in sys.modules if 'deepspeed' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unsupported_deepspeed_version_is_refused_clearly(monkeypatch):
    import sys
    import types

    from leafpass.runtime.deepspeed import check_deepspeed_version

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(__version__="0.18.4"))
    with pytest.raises(RuntimeError, match=r">=0\.19\.0,<0\.20\.0.*found deepspeed 0\.18\.4"):
        check_deepspeed_version()
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(__version__="0.19.8"))
    assert check_deepspeed_version() == "0.19.8"
