"""``grad_path="leafpass"``: DeepSpeed ZeRO-3's gradient reduction with fewer copies gives
DeepSpeed's partitions bit for bit (``leafpass.runtime.deepspeed_grad_path``).

Every case trains the same model (d=13: no parameter divides by the world size, so every
partition has padding; one expert per token, so some experts get no token and DeepSpeed's
leaf hook reduces zeros for them) twice from the same weights on the same batches: eager
ZeRO-3 as DeepSpeed ships it, and eager ZeRO-3 with leafpass's path installed on its
optimizer. After every backward the rank's gradient partitions (what the optimizer reads)
and after every step the parameter shards must be *equal*, not close, on every rank, and
the way the path reduced must be the one the case is about (``usage``). All 2-rank cases run
in one pair of rank processes; the one-rank cases in one process.
"""

from __future__ import annotations

import pytest
import torch

from leafpass.testing.distributed import run_ranks, zero3_config

D, STEPS, LR = 13, 3, 0.05

# name -> (zero3_config overrides, install strategy, frozen, usage keys that must be counted);
# frozen: False, or which parameters the optimizer is given: the "trainable" ones or "all"
# (DeepSpeed leaves the frozen ones out of its groups either way)
CASES_2 = {
    "fp32": ({}, "auto", False, {"bucket", "partition views"}),
    "interleave": ({}, "interleave", False, {"interleave", "partition views"}),
    "small_buckets": ({"zero_optimization": {"reduce_bucket_size": 150}}, "auto", False,
                      {"bucket", "interleave", "partition views"}),
    "no_contiguous_gradients": ({"zero_optimization": {"contiguous_gradients": False}}, "auto", False,
                                {"interleave", "partition views"}),
    "bf16": ({"bf16": {"enabled": True}}, "auto", False, {"bucket", "partition conversion"}),
    "ga2": ({"gradient_accumulation_steps": 2}, "auto", False, {"bucket", "partition views"}),
    "clipping": ({"gradient_clipping": 0.05}, "auto", False, {"bucket", "partition views"}),
    "frozen": ({}, "auto", "trainable", {"bucket", "partition views"}),
    "frozen_in_optimizer": ({}, "auto", "all", {"bucket", "partition views"}),
}
CASES_1 = {
    "one_rank": ({}, "auto", False, {"one rank", "partition views"}),
    "one_rank_ga2_clipping": ({"gradient_accumulation_steps": 2, "gradient_clipping": 0.05}, "auto", False,
                              {"one rank", "partition views"}),
}


def _train(rank: int, overrides: dict, strategy: str | None, frozen: bool | str) -> dict:
    import copy

    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.runtime import deepspeed_grad_path as grad_path
    from leafpass.testing.models import MoEBlock, MoEStack

    torch.manual_seed(0)
    model = MoEStack(d=D, n_layers=2, n_experts=6, top_k=1)
    if frozen:  # LoRA-style: a dense MLP and the final norm frozen (not all before a leaf: see leaf_inputs)
        for p in (*model.layers[1].mlp.parameters(), *model.norm.parameters()):
            p.requires_grad_(False)
    set_z3_leaf_modules(model, [MoEBlock])
    overrides = copy.deepcopy(overrides)
    ga = overrides.get("gradient_accumulation_steps", 1)
    bf16 = overrides.get("bf16", {}).get("enabled", False)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad or frozen == "all"],
                                               lr=LR),
        config=zero3_config(1, **overrides))
    reason = grad_path.install(engine.optimizer, strategy) if strategy is not None else None
    gen = torch.Generator().manual_seed(100 + rank)
    out: dict = {"losses": [], "grads": [], "shards": [], "reason": reason}
    for _step in range(STEPS):
        for _micro in range(ga):
            x = torch.randn(5, D, generator=gen)
            if bf16:
                x = x.bfloat16()
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            out["losses"].append(loss.detach().clone())
            if engine.is_gradient_accumulation_boundary():
                averaged = engine.optimizer.averaged_gradients  # sub-group -> this rank's partitions
                out["grads"].append([t.detach().clone() for i in sorted(averaged) if averaged[i] is not None
                                     for t in averaged[i]])
            engine.step()
        # a shard's real elements (past them: padding, never initialised, different in each engine)
        out["shards"].append([p.ds_tensor.detach()[:max(0, min(p.ds_tensor.numel(), p.ds_numel - rank * p.ds_tensor.numel()))].clone()
                              for p in engine.module.parameters()])
    out["usage"] = grad_path.usage(engine.optimizer)
    out["installed"] = grad_path.installed(engine.optimizer)
    return out


def _compiled(rank: int) -> dict:
    """``engine.compile(backend="z3leaf")`` installs the path on the engine's optimizer by
    default; ``grad_path="deepspeed"`` takes it away again."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    import leafpass
    from leafpass.runtime import deepspeed_grad_path as grad_path
    from leafpass.testing.models import MoEBlock, MoEStack

    torch.manual_seed(0)
    model = MoEStack(d=D, n_layers=2, n_experts=6, top_k=1)
    set_z3_leaf_modules(model, [MoEBlock])
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=zero3_config(1))
    out: dict = {}
    for choice in ("leafpass", "deepspeed", "leafpass"):
        torch._dynamo.reset()
        engine.compile(backend="z3leaf", compile_kwargs={"options": {"grad_path": choice}})
        x = torch.randn(5, D, generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(x).pow(2).mean())
        engine.step()
        out.setdefault("stats", []).append(leafpass.gather_stats(engine.module).grad_path)
        out.setdefault("installed", []).append(grad_path.installed(engine.optimizer))
        out.setdefault("usage", []).append(grad_path.usage(engine.optimizer))
        engine._is_compiled = False  # let the next engine.compile() recompile with the new options
    return out


def _body(rank: int, world_size: int, cases: dict) -> dict:
    results = {"compiled": _compiled(rank)} if world_size > 1 else {}
    for name, (overrides, strategy, frozen, _expect) in cases.items():
        try:
            results[name] = (_train(rank, overrides, None, frozen), _train(rank, overrides, strategy, frozen))
        except Exception as exc:  # record and go on: one failing case must not hide the others
            import traceback

            results[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return results


def _unsupported_body(rank: int, world_size: int) -> dict:
    """Configurations that keep DeepSpeed's path: install() says why and changes nothing."""
    import deepspeed

    from leafpass.runtime import deepspeed_grad_path as grad_path
    from leafpass.testing.models import TwoMoE

    torch.manual_seed(0)
    model = TwoMoE(D)
    config = zero3_config(1, zero_optimization={"offload_optimizer": {"device": "cpu"}}, zero_force_ds_cpu_optimizer=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=config)
    reason = grad_path.install(engine.optimizer)
    return {"reason": reason, "installed": grad_path.installed(engine.optimizer),
            "not_zero3": grad_path.unsupported_reason(object())}


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_body, CASES_2, world_size=2, timeout=600)


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(_body, CASES_1, world_size=1, timeout=300)


def _check(ranks: list[dict], name: str, expect: set[str]) -> None:
    for rank, results in enumerate(ranks):
        got = results[name]
        assert not isinstance(got, str), f"rank {rank}, case {name}: {got}"
        deepspeed_run, leafpass_run = got
        assert leafpass_run["reason"] is None and leafpass_run["installed"], (name, leafpass_run["reason"])
        assert not deepspeed_run["installed"]
        assert set(leafpass_run["usage"]) >= expect, (name, leafpass_run["usage"])
        assert len(deepspeed_run["grads"]) == STEPS
        for what in ("losses", "grads", "shards"):
            a, b = deepspeed_run[what], leafpass_run[what]
            flat_a = [t for x in a for t in (x if isinstance(x, list) else [x])]
            flat_b = [t for x in b for t in (x if isinstance(x, list) else [x])]
            assert len(flat_a) == len(flat_b) > 0, (name, what)
            for i, (ta, tb) in enumerate(zip(flat_a, flat_b)):
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), (
                    f"rank {rank}, case {name}: {what}[{i}] differs from DeepSpeed's by "
                    f"{(ta.float() - tb.float()).abs().max().item():.3g}")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES_2))
def test_two_ranks_equal_deepspeed_bitwise(two_ranks, name):
    _check(two_ranks, name, CASES_2[name][3])


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES_1))
def test_one_rank_equal_deepspeed_bitwise(one_rank, name):
    _check(one_rank, name, CASES_1[name][3])


@pytest.mark.distributed
def test_z3leaf_installs_the_path_and_the_option_removes_it(two_ranks):
    for rank in two_ranks:
        got = rank["compiled"]
        assert got["stats"] == ["leafpass", "deepspeed", "leafpass"]
        assert got["installed"] == [True, False, True]
        assert got["usage"][0].get("bucket") == 1 and got["usage"][0].get("partition views") == 1
        assert got["usage"][2].get("bucket") == 1  # counted afresh after being installed again


@pytest.mark.distributed
def test_unsupported_configuration_keeps_deepspeeds_path():
    (r0, r1) = run_ranks(_unsupported_body, world_size=2, timeout=300)
    for r in (r0, r1):
        assert r["reason"] is not None and "offload_optimizer" in r["reason"]
        assert not r["installed"]
        assert "not DeepSpeed's ZeRO-3 optimizer" in r["not_zero3"]
