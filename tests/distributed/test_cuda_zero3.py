"""z3leaf under real DeepSpeed ZeRO-3 on CUDA GPUs, NCCL, one rank per GPU (marked ``cuda``).

Skipped without a GPU; ``scripts/gpu-check.sh`` runs it on the GPU machine. One run of
rank processes (world 1 on one GPU, 2 on two or more) trains a ``TwoMoE`` (fp32, SGD,
strict ZeRO-3 limits so every module is gathered at its entry) from the same weights
eagerly and compiled with ``engine.compile(backend="z3leaf")`` under each gather policy
(``step``: the whole model gathered once before the compiled forward; ``module``: the
graph gathers the modules itself), with inductor's GPU kernels as the inner compiler, and
the tests read its record: one graph, no graph break, losses and final weights equal to
eager ZeRO-3's. A fourth way, ``eager_grad_path``, is eager ZeRO-3 with leafpass's gradient
path installed on its optimizer (``grad_path="leafpass"``: on NCCL strided copies into the
interleaved layout and one reduce-scatter; on one GPU no collective): its losses and weights
must equal plain eager ZeRO-3's bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from leafpass.testing.distributed import run_ranks, zero3_config
from leafpass.testing.models import MoEBlock

pytestmark = [pytest.mark.cuda, pytest.mark.distributed]

D, N_TOKENS, N_STEPS, LR, TOL = 32, 64, 4, 0.05, 1e-4
STRICT = {"max_live_parameters": 0, "max_reuse_distance": 0, "prefetch_bucket_size": 0}
POLICIES = ("step", "module")


def _train(engine, x, y, n_steps: int) -> list[float]:
    losses = []
    for _ in range(n_steps):
        loss = F.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _body(rank: int, world_size: int) -> dict:
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.testing.models import TwoMoE

    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    base = TwoMoE(D)
    set_z3_leaf_modules(base, [MoEBlock])
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(N_TOKENS, D, generator=gen).to(device)
    y = torch.randn(N_TOKENS, D, generator=gen).to(device)
    out: dict = {"device": None}
    from leafpass.runtime import deepspeed_grad_path as grad_path

    for way in ("eager", "eager_grad_path", *POLICIES):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_config(1, **STRICT))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        if way == "eager_grad_path":
            assert grad_path.install(engine.optimizer) is None
        elif way != "eager":
            engine.compile(backend="z3leaf", compile_kwargs={"options": {"inner": "inductor", "gather": way}})
        losses = _train(engine, x, y, N_STEPS)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            final = {n: p.detach().cpu().clone() for n, p in engine.module.named_parameters()}
            out["device"] = str(next(engine.module.parameters()).device)
        counters = torch._dynamo.utils.counters
        out[way] = {
            "losses": losses,
            "final": final,
            "graphs": counters["stats"]["unique_graphs"],
            "breaks": sum(counters["graph_break"].values()),
            "grad_path_usage": grad_path.usage(engine.optimizer),
        }
    return out


@pytest.fixture(scope="module")
def runs():
    world = min(torch.cuda.device_count(), 2)
    return run_ranks(_body, world_size=world, timeout=150, pg_timeout=120, process_group="nccl")


def test_the_model_trains_on_the_gpu(runs):
    assert all(r["device"].startswith("cuda") for r in runs)


@pytest.mark.parametrize("policy", POLICIES)
def test_one_graph_no_break(runs, policy):
    for rank, r in enumerate(runs):
        assert r[policy]["graphs"] == 1, (rank, r[policy]["graphs"])
        assert r[policy]["breaks"] == 0, rank


def test_leafpass_grad_path_is_deepspeeds_bit_for_bit(runs):
    for rank, r in enumerate(runs):
        usage = r["eager_grad_path"]["grad_path_usage"]
        assert ("interleave" if len(runs) > 1 else "one rank") in usage, (rank, usage)
        assert r["eager_grad_path"]["losses"] == r["eager"]["losses"], rank
        for name, value in r["eager"]["final"].items():
            assert torch.equal(r["eager_grad_path"]["final"][name], value), (rank, name)
        for policy in POLICIES:  # the compiled ways install it by default
            assert r[policy]["grad_path_usage"], (rank, policy)


@pytest.mark.parametrize("policy", POLICIES)
def test_losses_and_weights_match_eager_zero3(runs, policy):
    for rank, r in enumerate(runs):
        torch.testing.assert_close(r[policy]["losses"], r["eager"]["losses"], atol=TOL, rtol=TOL)
        for name, value in r["eager"]["final"].items():
            torch.testing.assert_close(r[policy]["final"][name], value, atol=TOL, rtol=TOL, msg=f"{rank} {name}")
