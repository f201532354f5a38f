"""``gather="module"``: no graph input holding a stand-in reaches an op other than a gather.

A plan that does not name a parameter holding a stand-in (the gatherer once reused a plan
made for other leaf flags) would make the compiled graph compute with the stand-in's one
element: wrong numbers, silently. The backend checks the graph after the passes and
refuses it, naming the parameter and its module. The 2-rank case with real DeepSpeed is
``module_flag_changed_between_steps`` in tests/distributed/test_gather_policies.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import leafpass
from leafpass.passes.check_stand_ins import StandInReadError, check_stand_ins, looks_like_stand_in
from leafpass.testing.models import MoEBlock
from tests.test_module_gather import Chain, compile_with_plan, make_plan, partition


def _chain():
    torch.manual_seed(0)
    reference = Chain()
    leafpass.set_z3_leaf_modules(reference, [MoEBlock])
    model = copy.deepcopy(reference)
    return reference, model, partition(model)


def test_a_plan_that_misses_a_stand_in_is_refused_naming_the_parameter_and_module():
    torch._dynamo.reset()
    _, model, store = _chain()
    missing = {id(model.b.weight), id(model.b.bias)}
    plan = make_plan(model, store, gather_ids=set(store) - missing)
    with pytest.raises(Exception) as info:
        compile_with_plan(model, plan)(torch.randn(6, 8))
    error = getattr(info.value, "inner_exception", info.value)  # Dynamo wraps the backend's error
    assert isinstance(error, StandInReadError), info.value
    text = str(error)
    assert "parameter 'b.weight' of module 'b' holds a gather='module' stand-in" in text, text
    assert "linear" in text, text  # the op that would read it


def test_a_complete_plan_passes_the_check():
    torch._dynamo.reset()
    reference, model, store = _chain()
    x = torch.randn(6, 8)
    out = compile_with_plan(model, make_plan(model, store))(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-6)


def test_the_check_reads_only_stand_in_inputs():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x)

    net = Net()
    gm = torch.fx.symbolic_trace(net)
    x = torch.zeros(1).expand(2, 3)  # zero strides, but an input, not a parameter
    assert not looks_like_stand_in(x) and not looks_like_stand_in(net.lin.weight)
    check_stand_ins(gm, [x])  # nothing to check
    # a predicate that calls the input a stand-in: refused, named by its node
    with pytest.raises(StandInReadError, match="parameter 'x' of module '<root>'"):
        check_stand_ins(gm, [x], is_stand_in=lambda t: t is x)
