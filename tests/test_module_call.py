"""leafpass's ``nn.Module.__call__`` wrapper: eager calls behave as plain PyTorch's, and a
later replacement of ``nn.Module.__call__`` that bypasses the wrapper is named at compile
time instead of silently not capturing the leaves."""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn

import leafpass
from leafpass import capture
from leafpass.testing.models import MoEBlock, TwoMoE
from tests.compile_case import CompileTestCase


@contextlib.contextmanager
def module_call(replacement):
    previous = nn.Module.__call__
    nn.Module.__call__ = replacement
    try:
        yield
    finally:
        nn.Module.__call__ = previous


def _bypassing_call(self, *args, **kwargs):
    """Another library's __call__ that goes straight to PyTorch's, skipping leafpass's."""
    return nn.Module._wrapped_call_impl(self, *args, **kwargs)


class TestWrapperInEager(CompileTestCase):
    def test_eager_calls_match_plain_pytorch(self):
        # the fast path (no compile active) skips _wrapped_call_impl; hooks, a per-instance
        # _call_impl and module.compile() still behave as in plain PyTorch
        self.assertTrue(capture.installed())
        model = TwoMoE(8)
        x = torch.randn(5, 8)
        seen = []
        model.inp.register_forward_pre_hook(lambda m, a: seen.append("pre"))
        model.inp.register_forward_hook(lambda m, a, out: seen.append("post"))
        with module_call(nn.Module._wrapped_call_impl):
            plain = model(x)
        self.assertEqual(seen, ["pre", "post"])
        self.assertTrue(torch.equal(model(x), plain))
        self.assertEqual(seen, ["pre", "post"] * 2)
        model.mid._call_impl = lambda *a, **k: torch.zeros(5, 8)  # per-instance redirect
        self.assertTrue(torch.equal(model.mid(x), torch.zeros(5, 8)))

    def test_module_compile_still_takes_the_compiled_route(self):
        model = TwoMoE(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        model.compile(backend=leafpass.make_backend(inner="eager"))
        with leafpass.record_graphs() as rec:
            out = model(torch.randn(4, 8))
        self.assertEqual(out.shape, (4, 8))
        self.assertEqual([n.target for gm in rec.graphs for n in gm.graph.nodes if n.op == "call_module"],
                         ["moe1", "moe2"])


class TestReplacedCall(CompileTestCase):
    def compile_twomoe(self):
        model = TwoMoE(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        compiled = torch.compile(model, backend=leafpass.make_backend(inner="eager"))
        with warnings.catch_warnings(record=True) as caught, leafpass.record_graphs() as rec:
            warnings.simplefilter("always")
            compiled(torch.randn(4, 8))
        return [str(w.message) for w in caught if "nn.Module.__call__" in str(w.message)], rec.graphs

    def test_a_replacement_that_bypasses_leafpass_is_named(self):
        capture._warned_replacements.clear()
        with module_call(_bypassing_call):
            self.assertIs(capture.call_replacement(), _bypassing_call)
            messages, graphs = self.compile_twomoe()
        self.assertEqual(len(messages), 1, messages)
        self.assertIn("test_module_call._bypassing_call", messages[0])
        self.assertIn("Import leafpass after the library", messages[0])
        # what the warning is about: no leaf was captured
        self.assertFalse(any(leafpass.is_leaf_call_node(n) for gm in graphs for n in gm.graph.nodes))

    def test_a_replacement_that_calls_leafpass_is_fine(self):
        capture._warned_replacements.clear()
        wrapped = nn.Module.__call__

        @functools.wraps(wrapped)
        def chained(self, *args, **kwargs):
            return wrapped(self, *args, **kwargs)

        with module_call(chained):
            self.assertIsNone(capture.call_replacement())
            messages, graphs = self.compile_twomoe()
        self.assertEqual(messages, [])
        self.assertEqual(sum(leafpass.is_prefetch_node(n) for gm in graphs for n in gm.graph.nodes), 2)
