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


def test_unknown_gather_value_lists_the_policies_and_what_they_do():
    with pytest.raises(ValueError, match=r"'gather' must be one of \['auto', 'step', 'module', 'hooks'\]; got 'layer'\. 'auto': "):
        leafpass.make_backend(gather="layer")
    with pytest.raises(Exception, match=r"'gather' must be one of .*got 'per-step'"):
        torch.compile(flagged(), backend="z3leaf", options={"gather": "per-step"})(torch.randn(4, 8))
    assert list(leafpass.GATHER_POLICIES) == ["auto", "step", "module", "hooks"]


@pytest.mark.parametrize("key", ["bucket_elements", "prefetch_distance"])
@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_module_gather_settings_must_be_non_negative_ints(key, value):
    with pytest.raises(ValueError, match=rf"z3leaf option '{key}' must be an int >= 0 .*got {value!r}"):
        leafpass.make_backend(gather="module", **{key: value})
    leafpass.make_backend(gather="module", **{key: 0})  # 0 and None are valid
    leafpass.make_backend(gather="module", **{key: None})


def test_gather_is_ignored_for_a_model_that_is_not_partitioned():
    model = flagged()
    x = torch.randn(4, 8)
    with leafpass.record_graphs() as rec:
        out = torch.compile(model, backend="z3leaf", fullgraph=True, options={"gather": "step", "inner": "eager"})(x)
    torch.testing.assert_close(out, model(x))
    assert len(rec.graphs) == 1 and leafpass.gather_stats(model) is None


def test_options_the_gatherer_reads_before_the_frame_follow_the_backends_precedence():
    from leafpass.capture import backend_options

    bound = leafpass.make_backend(gather="hooks", inner="eager")
    assert backend_options(bound) == {"gather": "hooks", "inner": "eager"}

    class Wrapper:  # a backend wrapper that passes options of its own, as a benchmark's does
        def __init__(self, inner, options):
            self.__wrapped__ = inner
            self._leafpass_options = options

    assert backend_options(Wrapper(bound, {"gather": "step"})) == {"gather": "step", "inner": "eager"}
    assert backend_options(Wrapper(lambda gm, ex: gm, {"gather": "step"})) is None  # not leafpass's

    module = torch.nn.Linear(2, 2)
    module.compile(backend=bound, options={"gather": "step"})
    from leafpass import dynamo_internals as internals

    callback = internals.compiled_function_callback(module._compiled_call_impl)
    assert backend_options(callback) == {"gather": "step", "inner": "eager"}  # torch.compile's win
