"""Options of the z3leaf backend, and the errors bad ones give."""

from __future__ import annotations

import pytest
import torch

import leafpass
from leafpass.testing.models import MoEBlock, TwoMoE


def flagged():
    torch._dynamo.reset()
    model = TwoMoE(8)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    return model


def test_unknown_option_names_it_and_lists_valid_ones():
    with pytest.raises(Exception, match=r"unknown z3leaf option\(s\) \['innr'\]; valid options: 'inner'"):
        torch.compile(flagged(), backend="z3leaf", options={"innr": "eager"})(torch.randn(4, 8))


def test_unknown_inner_value_lists_choices():
    with pytest.raises(Exception, match=r"'inner' must be one of \['inductor', 'aot_eager', 'eager'\].*got 'tvm'"):
        torch.compile(flagged(), backend="z3leaf", options={"inner": "tvm"})(torch.randn(4, 8))


def test_make_backend_validates_eagerly():
    with pytest.raises(ValueError, match="unknown z3leaf option"):
        leafpass.make_backend(gather="step", innner="eager")
    with pytest.raises(ValueError, match="'inner' must be one of"):
        leafpass.make_backend(inner=3)


def test_make_backend_is_the_same_backend():
    model = flagged()
    backend = leafpass.make_backend(inner="eager")
    with leafpass.record_graphs() as rec:
        out = torch.compile(model, backend=backend, fullgraph=True)(torch.randn(4, 8))
    assert out.shape == (4, 8)
    assert [n.target for n in rec.graphs[0].graph.nodes if n.op == "call_module"] == ["moe1", "moe2"]


def test_mode_is_accepted_with_inductor():
    model = flagged()
    x = torch.randn(4, 8)
    out = torch.compile(model, backend="z3leaf", mode="reduce-overhead")(x)  # inner defaults to inductor
    torch.testing.assert_close(out, model(x))


def test_use_runtime_rejects_objects_without_prefetch_all():
    with pytest.raises(TypeError, match="prefetch_all"):
        with leafpass.use_runtime(object()):
            pass
