"""z3leaf on a CUDA GPU, one process, no DeepSpeed (marked ``cuda``: skipped without a GPU).

``scripts/gpu-check.sh`` runs these on a GPU machine; the ZeRO-3 ones (NCCL) are in
``tests/distributed/test_cuda_zero3.py``. Each compiles a small MoE whose leaves route
tokens with ``nonzero`` on the GPU and checks one graph, no graph break and parity with
eager (outputs and gradients), with inductor's GPU kernels (triton) as the inner compiler.
"""

from __future__ import annotations

import copy

import pytest
import torch

import leafpass
from leafpass.testing.models import MoEBlock, TwoMoE

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _models(dtype: torch.dtype):
    torch.manual_seed(0)
    eager = TwoMoE(32).to("cuda", dtype)
    compiled = copy.deepcopy(eager)
    leafpass.set_z3_leaf_modules(compiled, [MoEBlock])
    return eager, compiled


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_one_graph_and_parity_with_eager_on_the_gpu(dtype, tol):
    eager, model = _models(dtype)
    x = torch.randn(64, 32, device="cuda", dtype=dtype)
    torch._dynamo.utils.counters.clear()
    with leafpass.record_graphs() as rec:
        compiled = torch.compile(model, backend="z3leaf", fullgraph=True, options={"inner": "inductor"})
        out = compiled(x)
    ref = eager(x)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    assert len(rec.graphs) == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert [n.target for n in rec.graphs[0].graph.nodes if n.op == "call_module"] == ["moe1", "moe2"]
    assert out.device.type == "cuda" and out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is None:  # an expert no token picked
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=tol, rtol=tol, msg=name)


def test_new_batch_sizes_reuse_the_graph_without_breaks():
    eager, model = _models(torch.float32)
    compiled = torch.compile(model, backend="z3leaf", options={"inner": "inductor"})
    torch._dynamo.utils.counters.clear()
    for tokens in (16, 48, 80):
        x = torch.randn(tokens, 32, device="cuda")
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    # the first size is compiled static, the second makes the batch dimension dynamic
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
