"""Each private DeepSpeed API the gatherers use, checked directly on real ZeRO-3 (2 ranks).

``leafpass/runtime/deepspeed.py`` reaches DeepSpeed's internals for ``gather="step"``: the
offload object of the root module, the handles of the hooks DeepSpeed registered, the
coordinator's gather and release, ``reset_step`` and the live-parameter cap. If a DeepSpeed
upgrade changes one of them, a test here fails by name before the symptoms spread.
"""

from __future__ import annotations

import pytest
import torch

from leafpass.testing.distributed import run_ranks, zero3_config

MAX_LIVE = 123_457
PREFETCH_BUCKET = 7_654


def _body(rank: int, world_size: int) -> dict:
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from leafpass.runtime import deepspeed as ds
    from leafpass.runtime import deepspeed_shards
    from leafpass.tools.deepspeed_probe import GatheredElementsTracker, count_collectives
    from leafpass.testing.models import MoEBlock, TwoMoE

    torch.manual_seed(0)
    model = TwoMoE(13, 4, 2)
    set_z3_leaf_modules(model, [MoEBlock])
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=zero3_config(1, max_live_parameters=MAX_LIVE,
                                                          prefetch_bucket_size=PREFETCH_BUCKET))
    root = engine.module
    out: dict = {}
    owner = ds.root_offload(root)
    out["root_found"] = owner is not None
    out["child_is_not_root"] = ds.root_offload(root.inp) is None and ds.root_offload(root.moe1) is None
    out["max_live"] = ds.max_live_parameters(owner)
    slots = ds.hook_slots(owner)
    out["slots_present"] = all(key in hooks for hooks, key in slots)
    names = ("_start_of_forward_hook", "_pre_forward_module_hook", "_post_forward_module_hook",
             "_pre_backward_module_hook", "_post_backward_module_hook")
    out["hook_names"] = sorted({n for hooks, key in slots for n in names if ds._find_function(hooks[key], n)})
    module_dicts = {id(d) for m in root.modules() for d in (m._forward_pre_hooks, m._forward_hooks)}
    out["slots_on_modules"] = all(id(hooks) in module_dicts for hooks, _key in slots)
    out["root_start_hook"] = any(hooks is root._forward_pre_hooks and
                                 ds._find_function(hooks[key], "_start_of_forward_hook") is not None
                                 for hooks, key in slots)

    params = list(root.parameters())
    out["partitioned"] = all(ds.partitioned(p) for p in params)
    out["all_missing"] = len(ds.not_available(params)) == len(params)
    out["external"] = ds.external_parameters(root.inp)
    ds.start_of_forward(owner)  # reset_step(): no error, nothing gathered
    total = sum(int(p.ds_numel) for p in params)
    with GatheredElementsTracker(root) as tracker, count_collectives() as counter:
        ds.gather_and_wait(owner, params, what="test")
        out["gather_collectives"] = counter.snapshot()
        out["gathered_shapes_ok"] = all(tuple(p.shape) == tuple(p.ds_shape) for p in params)
        out["none_missing_after_gather"] = ds.not_available(params) == []
        out["released"] = ds.release(owner, params)
        out["peak"] = tracker.peak
    out["total"] = total
    out["all_missing_after_release"] = len(ds.not_available(params)) == len(params)

    # gather="module": the shard layout its gather op relies on, read against DeepSpeed's own gather
    import torch.distributed as dist

    out["prefetch_bucket"] = ds.prefetch_bucket_size(owner)
    out["persistent"] = [deepspeed_shards.persistent(p) for p in params]
    shards = [deepspeed_shards.shard(p) for p in params]
    out["shard_group_is_param_group"] = all(g is p.ds_process_group for p, (_, g) in zip(params, shards))
    whole_by_shards = []
    for p, (t, g) in zip(params, shards):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(g))]
        dist.all_gather(parts, t.contiguous(), group=g)
        whole_by_shards.append(torch.cat(parts)[: p.ds_numel].view(p.ds_shape))
    with deepspeed.zero.GatheredParameters(params):
        out["shards_rebuild_params"] = all(torch.equal(w, p.data) for w, p in zip(whole_by_shards, params))
    # issue, then wait: INFLIGHT in between, AVAILABLE after; one all-gather
    with count_collectives() as counter:
        ds.start_gather(owner, params)
        out["in_flight_after_start"] = len(ds.in_flight(params)) == len(params)
        ds.wait_gathered(owner, params, what="test")
        out["start_wait_collectives"] = counter.snapshot()
    out["available_after_wait"] = not ds.not_available(params) and not ds.in_flight(params)
    ds.release(owner, params)
    # ZeRO-3's Init replaced torch.nn.functional.linear with its own; torch's is kept aside
    import torch.nn.functional as F

    swap = ds.plain_linear_swap()
    out["linear_swap"] = swap is not None and swap[0] is F.linear and swap[1] is not F.linear
    # the leaf marks and the shard location the configuration checks read
    out["leaf_when_hooked"] = {"moe1": ds.leaf_when_hooked(root.moe1), "root": ds.leaf_when_hooked(root)}
    out["leaf_marks"] = sorted({n.split(".")[0] for n, p in root.named_parameters()
                                if getattr(p, "ds_z3_leaf_module", None) is not None})
    out["on_nvme"] = any(deepspeed_shards._on_nvme(p.ds_tensor) for p in params)
    out["shard_locations"] = sorted({str(getattr(p.ds_tensor, "final_location", None)) for p in params})
    out["root_flagged_by_threshold"] = ds.root_flagged_by_threshold(owner, root)
    out["emptied_when_nothing_kept"] = ds.empty_released_data(params)
    return out


@pytest.fixture(scope="module")
def facts() -> list[dict]:
    return run_ranks(_body, world_size=2, timeout=150, pg_timeout=60)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_root_offload_and_live_parameter_cap(facts):
    for f in facts:
        assert f["root_found"] and f["child_is_not_root"]
        assert f["max_live"] == MAX_LIVE


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_hook_slots_name_deepspeeds_module_hooks(facts):
    for f in facts:
        assert f["slots_present"] and f["slots_on_modules"] and f["root_start_hook"]
        assert f["hook_names"] == sorted({"_start_of_forward_hook", "_pre_forward_module_hook",
                                          "_post_forward_module_hook", "_pre_backward_module_hook",
                                          "_post_backward_module_hook"}), f["hook_names"]


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_gather_and_release_through_the_coordinator(facts):
    for f in facts:
        assert f["partitioned"] and f["all_missing"] and f["external"] == []
        assert f["gather_collectives"] == {"all_gather": 1}, f["gather_collectives"]
        assert f["gathered_shapes_ok"] and f["none_missing_after_gather"]
        assert f["released"] == f["total"] == f["peak"]
        assert f["all_missing_after_release"]


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_what_the_module_gather_relies_on(facts):
    for f in facts:
        assert f["prefetch_bucket"] == PREFETCH_BUCKET
        assert not any(f["persistent"])  # zero3_config's persistence threshold is 0
        # rank r holds elements [r * part, (r + 1) * part) of each flat parameter
        assert f["shard_group_is_param_group"] and f["shards_rebuild_params"]
        assert f["in_flight_after_start"] and f["available_after_wait"]
        assert f["start_wait_collectives"] == {"all_gather": 1}, f["start_wait_collectives"]
        assert f["linear_swap"]


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_leaf_marks_threshold_and_shard_location(facts):
    """What the configuration checks read: DeepSpeed marks the parameters of leaves flagged
    before ``deepspeed.initialize`` (``ds_z3_leaf_module``), so a module with unmarked
    hooked children (the root here) is not one DeepSpeed hooked as a leaf; without
    ``stage3_module_granularity_threshold`` nothing was flagged by threshold; shards in
    memory are not on NVMe (``final_location`` unset or DeepSpeed's ``'not-nvme'``);
    released parameters hold no data to empty (no fast sharding without a threshold)."""
    for rank, f in enumerate(facts):
        assert f["leaf_when_hooked"] == {"moe1": True, "root": False}, (rank, f["leaf_when_hooked"])
        assert f["leaf_marks"] == ["moe1", "moe2"], (rank, f["leaf_marks"])
        assert not f["on_nvme"] and set(f["shard_locations"]) <= {"None", "not-nvme"}, (rank, f["shard_locations"])
        assert f["root_flagged_by_threshold"] is None, rank
        assert f["emptied_when_nothing_kept"] == 0, rank
