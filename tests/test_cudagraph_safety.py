"""leafpass's ops under CUDA graphs (``mode="reduce-overhead"``).

Every leafpass op does host-side work (DeepSpeed's parameter status, all-gather handles,
leafpass's bucket registry) that a CUDA graph replay would skip. Each op carries
``torch.Tag.cudagraph_unsafe`` (inductor keeps CUDA graphs off a graph holding one), and
the backend compiles a piece that holds one without CUDA graphs, since inductor does not
see the tag through ``with_effects`` (the wrapper of the effectful ``prefetch_*`` ops).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx

import leafpass  # noqa: F401  (registers the ops)
from leafpass import backend
from leafpass.ops import holds_host_state_op

OPS = ("prefetch_all", "prefetch_start", "gather_start", "gather_wait")


@pytest.mark.parametrize("name", OPS)
def test_every_leafpass_op_is_tagged_cudagraph_unsafe(name):
    assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.leafpass, name).default.tags


def _graph(with_op: bool) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    if with_op:
        graph.call_function(torch.ops.leafpass.prefetch_start.default, ("moe1", 1))
    graph.output(graph.call_function(torch.sin, (x,)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_a_piece_with_a_leafpass_op_is_compiled_without_cuda_graphs(monkeypatch):
    monkeypatch.setattr(backend, "_warned_cudagraphs", [])
    patches = torch._inductor.list_mode_options("reduce-overhead")
    assert patches["triton.cudagraphs"] is True
    assert backend._piece_patches(_graph(False), patches) is patches
    assert not holds_host_state_op(_graph(False)) and holds_host_state_op(_graph(True))
    with pytest.warns(UserWarning, match=r"reduce-overhead.*without CUDA graphs.*gather='step'"):
        off = backend._piece_patches(_graph(True), patches)
    assert off["triton.cudagraphs"] is False and {**off, "triton.cudagraphs": True} == patches
    assert backend._piece_patches(_graph(True), torch._inductor.list_mode_options("max-autotune-no-cudagraphs")) \
        .get("triton.cudagraphs") in (None, False)


def test_inductor_refuses_cuda_graphs_for_a_graph_with_a_tagged_op():
    # the check inductor's compile_fx runs before it records a CUDA graph (torch/_inductor/utils.py)
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    wait = graph.call_function(torch.ops.leafpass.gather_wait.default, (x, [x], 1))
    graph.output(wait)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert get_first_incompatible_cudagraph_node(gm) is wait
    assert get_first_incompatible_cudagraph_node(_graph(False)) is None
