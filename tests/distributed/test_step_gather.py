"""``gather="step"`` on gloo: leafpass's whole-model gather by one all-reduce into place
(``leafpass.runtime.deepspeed_step_gather``) against DeepSpeed's own coalesced all-gather, on
real ZeRO-3 with 2 ranks: the same values in every parameter, the same states, the same
live-parameter count in DeepSpeed's coordinator, and a release that leaves DeepSpeed's state
as its own gather would. The training-level comparison (z3leaf under ``gather="step"``
against eager ZeRO-3, step by step) is tests/distributed/test_configurations.py.
"""

from __future__ import annotations

import pytest
import torch

from leafpass.testing.distributed import run_ranks, zero3_config


def _body(rank: int, world_size: int) -> dict:
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    import leafpass
    from leafpass.runtime import deepspeed as ds
    from leafpass.runtime import deepspeed_step_gather as step_gather
    from leafpass.testing.models import MoEBlock, TwoMoE

    torch.manual_seed(0)
    model = TwoMoE(13, 4, 2)  # 13: no parameter divides by 2, every partition is padded
    with torch.no_grad():
        model.inp.weight[0, 0] = -0.0  # the one bit an all-reduce with zeros may change
    set_z3_leaf_modules(model, [MoEBlock])
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=zero3_config(1))
    root = engine.module
    owner = ds.root_offload(root)
    coordinator = owner.get_param_coordinator()
    live = lambda: getattr(coordinator, "_PartitionedParameterCoordinator__n_available_params")  # noqa: E731
    params = list(root.parameters())
    out: dict = {"live_before": live(), "reason": step_gather.unsupported_reason(owner, params)}

    ds.gather_and_wait(owner, params, what="test")
    deepspeed_values = [p.data.clone() for p in params]
    out["live_deepspeed"] = live()
    ds.release(owner, params)
    out["live_released"] = live()

    out["in_place"] = step_gather.gather_in_place(owner, list(reversed(params)))  # order does not matter
    out["available"] = [p.ds_status.name for p in params]
    out["equal"] = [torch.equal(p.data, v) for p, v in zip(params, deepspeed_values)]
    out["shapes"] = [tuple(p.shape) == tuple(p.ds_shape) for p in params]
    out["one_buffer"] = len({p.data.untyped_storage().data_ptr() for p in params}) == 1
    out["live_in_place"] = live()
    ds.release(owner, params)
    out["released"] = [p.ds_status.name for p in params]
    out["empty"] = [p.data.numel() == 0 for p in params]
    out["live_after"] = live()
    out["nothing"] = step_gather.unsupported_reason(owner, [])

    # the buffer is kept between gathers, and reused only once every parameter is released
    buffer = step_gather.GatherBuffer()
    step_gather.gather_in_place(owner, params, buffer)
    first = buffer.tensor.untyped_storage().data_ptr()
    ds.release(owner, params)
    step_gather.gather_in_place(owner, params, buffer)  # into the used buffer: zeroed first
    out["reused"] = buffer.tensor.untyped_storage().data_ptr() == first
    out["equal_reused"] = [torch.equal(p.data, v) for p, v in zip(params, deepspeed_values)]
    still_held = params[:1]
    ds.release(owner, params[1:])
    out["refused_while_held"] = buffer.take(buffer.tensor.numel(), buffer.tensor.dtype, buffer.tensor.device,
                                            still_held).untyped_storage().data_ptr() != first
    ds.release(owner, still_held)

    # a compiled step under gather="step" uses it, and trains like eager ZeRO-3 (test_configurations)
    engine.compile(backend="z3leaf", compile_kwargs={"options": {"gather": "step"}})
    x = torch.randn(6, 13, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    out["stats"] = leafpass.gather_stats(root).step_gather
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_body, world_size=2, timeout=300)


@pytest.mark.distributed
def test_gather_in_place_equals_deepspeeds_gather(ranks):
    for r in ranks:
        assert r["reason"] is None
        assert r["in_place"] is None
        assert all(r["equal"]) and all(r["shapes"]) and r["one_buffer"]
        assert set(r["available"]) == {"AVAILABLE"}


@pytest.mark.distributed
def test_buffer_is_reused_only_when_every_parameter_is_released(ranks):
    for r in ranks:
        assert r["refused_while_held"] and r["reused"]
        assert all(r["equal_reused"])  # zeroed before reuse: no stale values summed in


@pytest.mark.distributed
def test_coordinator_bookkeeping_is_deepspeeds(ranks):
    for r in ranks:
        assert r["live_in_place"] == r["live_deepspeed"] > r["live_before"]
        assert r["live_after"] == r["live_released"] == r["live_before"]
        assert set(r["released"]) == {"NOT_AVAILABLE"} and all(r["empty"])


@pytest.mark.distributed
def test_compiled_step_policy_gathers_in_place(ranks):
    for r in ranks:
        assert r["stats"] == "in place"
        assert r["nothing"] == "nothing to gather"
