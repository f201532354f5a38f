"""Base test case: resets Dynamo around every test, helpers to compare with eager."""

from __future__ import annotations

import copy

import expecttest
import torch
import torch._dynamo

import leafpass


class CompileTestCase(expecttest.TestCase):
    def setUp(self) -> None:
        super().setUp()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)

    def tearDown(self) -> None:
        torch._dynamo.reset()
        super().tearDown()

    def compile(self, model, inner="aot_eager", **kwargs):
        return torch.compile(model, backend="z3leaf", options={"inner": inner}, **kwargs)

    def graphs_of(self, model, *inputs, inner="aot_eager", **kwargs):
        """Compile with fullgraph, run once, return (recorded graphs, output)."""
        with leafpass.record_graphs() as rec:
            out = self.compile(model, inner=inner, fullgraph=True)(*inputs, **kwargs)
        return rec.graphs, out

    def assert_matches_eager(self, model, make_inputs, *, inner="aot_eager", steps=3, atol=1e-5, loss=None):
        """Outputs and every parameter gradient of compiled == eager, over several steps."""
        ref = copy.deepcopy(model)
        compiled = self.compile(model, inner=inner, fullgraph=True)
        loss = loss or (lambda out: (out[0] if isinstance(out, tuple) else out).float().pow(2).sum())
        for step in range(steps):
            inputs = make_inputs(step)
            out, out_ref = compiled(*inputs), ref(*inputs)
            torch.testing.assert_close(_first(out), _first(out_ref), atol=atol, rtol=1e-5)
            loss(out).backward()
            loss(out_ref).backward()
            assert_same_grads(model, ref, f"step {step}", atol=atol)
        return compiled


def assert_same_grads(model, reference, what: str, *, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Every parameter of ``model`` has a gradient exactly where ``reference``'s has one,
    and the two are close; ``what`` (e.g. the step) is named in a failure."""
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert (p.grad is None) == (q.grad is None), f"grad presence of {name}, {what}"
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=f"grad of {name}, {what}")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
