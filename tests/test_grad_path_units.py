"""Single-process parts of ``leafpass.runtime.deepspeed_grad_path`` and its option.

The reduction itself is checked bit for bit against DeepSpeed on real ZeRO-3 ranks in
tests/distributed/test_grad_path.py.
"""

from __future__ import annotations

import pytest
import torch

from leafpass.options import GRAD_PATHS, check_options
from leafpass.runtime import deepspeed_grad_path as grad_path


def test_adjacent_views_of_one_buffer_become_one_view():
    buffer = torch.arange(10.0)
    parts = [buffer.narrow(0, 0, 3), buffer.narrow(0, 3, 4), buffer.narrow(0, 7, 2)]
    run = grad_path._adjacent_run(parts)
    assert run is not None and run.numel() == 9
    assert run.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(run, torch.cat(parts))


@pytest.mark.parametrize("parts", [
    lambda b: [b.narrow(0, 0, 3), b.narrow(0, 4, 2)],            # a gap
    lambda b: [b.narrow(0, 3, 2), b.narrow(0, 0, 3)],            # out of order
    lambda b: [b.narrow(0, 0, 3), torch.zeros(2)],               # another storage (a frozen parameter's zeros)
    lambda b: [b.narrow(0, 0, 3), b.narrow(0, 3, 2).double()],   # another dtype
    lambda b: [b[::2]],                                          # not contiguous
    lambda b: [],
])
def test_anything_else_is_not_a_run(parts):
    assert grad_path._adjacent_run(parts(torch.arange(10.0))) is None


def test_own_chunk_matches_deepspeeds_partitioning():
    flat = torch.arange(13.0)  # 13 over 2 ranks: chunks of 7, the second one short
    assert torch.equal(grad_path._own_chunk(flat, 2, 0), flat[:7])
    assert torch.equal(grad_path._own_chunk(flat, 2, 1), flat[7:])
    assert grad_path._own_chunk(torch.arange(2.0), 4, 3).numel() == 0  # a rank with no real element


def test_not_a_zero3_optimizer_is_refused_with_the_reason():
    reason = grad_path.install(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    assert reason is not None and "not DeepSpeed's ZeRO-3 optimizer" in reason


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(ValueError, match="strategy must be one of"):
        grad_path.install(object(), strategy="fast")


def test_grad_path_option_default_and_error():
    assert check_options({})["grad_path"] == "leafpass"
    assert check_options({"grad_path": "deepspeed"})["grad_path"] == "deepspeed"
    with pytest.raises(ValueError, match="'grad_path' must be one of") as info:
        check_options({"grad_path": "fast"})
    assert all(name in str(info.value) for name in GRAD_PATHS)
