"""The cross-rank schedule check: which programs it checks, the device of its all-reduce,
what a mismatch names, and that a check without a partner fails instead of hanging.

The 2-rank cases need no DeepSpeed (the null runtime's ``prefetch_all`` issues no
collective; only the check does) and run in the same two rank processes, in order.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import leafpass
from leafpass.schedule_check import (
    LeafScheduleMismatch,
    TIMEOUT_ENV,
    check_same_schedule,
    check_timeout,
    collective_device,
    device_for_backend,
)
from leafpass.testing.distributed import run_ranks
from leafpass.testing.models import TwoMoE

D = 8

# ------------------------------------------------------------------------ the device


def test_device_for_backend_follows_the_backend_and_the_accelerator():
    cpu = torch.device("cpu")
    assert device_for_backend("gloo") == cpu
    assert device_for_backend("gloo", accelerator="cuda:0") == cpu  # gloo reduces CPU tensors
    assert device_for_backend("cpu:gloo,cuda:nccl", accelerator="cuda:1") == cpu
    assert device_for_backend("nccl") == torch.device("cuda")  # the current CUDA device
    assert device_for_backend("NCCL", accelerator="cuda:1") == torch.device("cuda:1")
    assert device_for_backend("xccl") == torch.device("xpu")
    # backends torch does not know (Habana's and Ascend's are both "hccl"): the accelerator's
    # device (an Ascend "npu" device name parses only once torch_npu is imported)
    assert device_for_backend("hccl", accelerator="hpu") == torch.device("hpu")
    assert device_for_backend("hccl", accelerator="hpu:1") == torch.device("hpu:1")
    # an accelerator the backend does not take is not used
    assert device_for_backend("nccl", accelerator="cpu") == torch.device("cuda")


def test_device_for_an_unknown_backend_without_an_accelerator_is_a_clear_error():
    if torch.accelerator.current_accelerator() is not None:
        pytest.skip("an accelerator is available here: it would be chosen")
    with pytest.raises(ValueError, match="cannot tell which device the process group backend 'mybackend'"):
        device_for_backend("mybackend")


@pytest.fixture
def gloo_world_of_one():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_collective_device_of_a_gloo_group_is_cpu(gloo_world_of_one):
    assert collective_device() == torch.device("cpu")
    assert collective_device(dist.group.WORLD) == torch.device("cpu")
    check_same_schedule([("moe", 3)], "f (x.py:1)")  # one rank: nothing to compare, no collective


def test_check_timeout_reads_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert check_timeout().total_seconds() == 1800
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert check_timeout().total_seconds() == 2.5
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=f"{TIMEOUT_ENV} must be a number of seconds"):
        check_timeout()


def test_compiling_frame_names_the_frame_dynamo_compiles():
    from leafpass import dynamo_internals as internals

    seen = []

    def backend(gm, example_inputs):
        seen.append(internals.compiling_frame())
        return gm.forward

    def traced_here(x):
        return x + 1

    torch.compile(traced_here, backend=backend)(torch.randn(2))
    line = traced_here.__code__.co_firstlineno
    assert seen == [f"traced_here ({__file__}:{line})"], seen
    assert internals.compiling_frame() is None  # outside compilation


# ------------------------------------------------------------------------------ 2 ranks


def _leaf_free(x):
    return torch.relu(x) * 2


# Each case compiles a frame of its own (checks pair up on *first* compiles of a frame, and
# a second TwoMoE would be a recompile of TwoMoE.forward's frame).
class Same(TwoMoE):
    def forward(self, x):
        return self.moe2(self.moe1(x))


class Different(TwoMoE):
    def forward(self, x):
        return self.moe2(self.moe1(x))


def _model(cls, leaf_names: list[str]) -> TwoMoE:
    torch.manual_seed(0)
    model = cls(D, 2, 1)
    leafpass.set_z3_leaf_modules_by_name(model, leaf_names)
    return model


def _check_cases(rank: int, world_size: int) -> dict:
    out = {}
    x = torch.randn(4, D)
    # 1. a leaf-free frame compiled on rank 0 only: no check, so nothing to pair with
    if rank == 0:
        torch.compile(_leaf_free, backend="z3leaf")(x)
    # 2. the same model with the same leaves on both ranks: its check pairs and passes
    out["same"] = torch.compile(_model(Same, ["moe1", "moe2"]), backend="z3leaf")(x).shape
    # 3. different leaves: every rank raises, naming the leaf and the frame
    try:
        torch.compile(_model(Different, ["moe1", "moe2"] if rank == 0 else ["moe1"]), backend="z3leaf")(x)
    except LeafScheduleMismatch as e:
        out["mismatch"] = str(e)
    # 4. a frame with leaves on rank 0 only: rank 0's check finds no partner and fails after
    # the timeout (rank 1 issues no collective meanwhile); last, as the group is broken after it
    os.environ[TIMEOUT_ENV] = "3"
    if rank == 0:
        start = time.monotonic()
        try:
            torch.compile(lambda m, x: m.moe1(x), backend="z3leaf")(_model(TwoMoE, ["moe1"]), x)
        except LeafScheduleMismatch as e:
            out["alone"] = (str(e), time.monotonic() - start)
    else:
        time.sleep(8)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_check_cases, world_size=2, timeout=240, pg_timeout=60, deepspeed=False)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_leaf_free_frame_compiled_on_one_rank_only_is_not_checked(two_ranks):
    for res in two_ranks:
        assert res["same"] == (4, D)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_mismatch_names_the_leaf_and_the_frame_on_every_rank(two_ranks):
    for rank, res in enumerate(two_ranks):
        text = res.get("mismatch")
        assert text is not None, (rank, res)
        assert "ranks compiled different leaf schedules" in text and "Leaves that differ: moe2" in text, text
        # the frame: Different.forward, with its file and line
        line = Different.forward.__code__.co_firstlineno
        for r in (0, 1):
            assert f"rank {r} in frame forward ({__file__}:{line})" in text, text


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_check_without_a_partner_fails_after_the_timeout_naming_the_frame(two_ranks):
    text, elapsed = two_ranks[0]["alone"]
    assert "rank 0 found no other rank to check frame <lambda> (" in text, text
    assert "tests/test_schedule_check.py:" in text and "(leaves and gathers: moe1(9))" in text, text
    assert "it waited up to 3 s" in text, text
    assert 3 <= elapsed < 60, elapsed
    assert "alone" not in two_ranks[1]
