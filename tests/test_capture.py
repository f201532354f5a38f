"""Capture: the eager flag is the source of truth, whenever and however it is set."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import torch

import leafpass
from leafpass.testing.models import MoEBlock, TwoMoE
from leafpass.testing.recording import RecordingRuntime
from tests.compile_case import CompileTestCase


def leaf_targets(graphs):
    return [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_module"]


class TestFlagsAreTheSourceOfTruth(CompileTestCase):
    def run_counted(self, compiled, x):
        runtime = RecordingRuntime()
        with leafpass.use_runtime(runtime), leafpass.record_graphs() as rec:
            out = compiled(x)
        return out, runtime, rec.graphs

    def check_ways(self, flag):
        model = TwoMoE(8)
        flag(model)
        compiled = self.compile(model, fullgraph=True)
        x = torch.randn(6, 8)
        out, runtime, graphs = self.run_counted(compiled, x)
        self.assertEqual(leaf_targets(graphs), ["moe1", "moe2"])
        self.assertEqual(runtime.leaves(), [model.moe1, model.moe2])
        torch.testing.assert_close(out, model(x))

    def test_flag_set_by_leafpass_api(self):
        self.check_ways(lambda m: leafpass.set_z3_leaf_modules(m, [MoEBlock]))

    def test_flag_set_by_attribute(self):
        def flag(m):
            m.moe1._z3_leaf = True
            m.moe2._z3_leaf = True

        self.check_ways(flag)

    def test_flag_set_by_deepspeed(self):
        import importlib

        z3 = importlib.import_module("deepspeed.utils.z3_leaf_module")
        self.check_ways(lambda m: z3.set_z3_leaf_modules(m, [MoEBlock]))

    def test_flag_set_by_deepspeed_config(self):
        self.check_ways(lambda m: leafpass.apply_leaf_module_config(m, {"classes": ["MoEBlock"]}))

    def test_set_unset_delete_after_compile_take_effect_next_call(self):
        model = TwoMoE(8)
        compiled = self.compile(model)  # no fullgraph: unflagged MoE blocks break the graph
        x = torch.randn(6, 8)
        states = [
            ("unflagged", lambda: None, []),
            ("set", lambda: leafpass.set_z3_leaf_modules(model, [MoEBlock]), [model.moe1, model.moe2]),
            ("unset", lambda: leafpass.unset_z3_leaf_modules(model, [MoEBlock]), []),
            ("set one", lambda: setattr(model.moe2, "_z3_leaf", True), [model.moe2]),
            ("delete", lambda: delattr(model.moe2, "_z3_leaf"), []),
            ("set again", lambda: leafpass.set_z3_leaf_modules(model, [MoEBlock]), [model.moe1, model.moe2]),
        ]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for label, change, expected in states:
                change()
                out, runtime, _ = self.run_counted(compiled, x)
                self.assertEqual(runtime.leaves(), expected, f"after {label!r} the program ran on a stale flag")
                torch.testing.assert_close(out, model(x), msg=f"wrong output after {label!r}")
        # the first compile broke the graph at the leaf calls; leafpass says how to get one graph back
        self.assertTrue(any("torch._dynamo.reset()" in str(w.message) for w in caught))
        torch._dynamo.reset()
        with leafpass.record_graphs() as rec:
            self.run_counted(compiled, x)
        self.assertEqual(len(rec.graphs), 1)
        self.assertEqual(leaf_targets(rec.graphs), ["moe1", "moe2"])

    def test_toggling_many_times_stays_whole_and_under_the_recompile_limit(self):
        model = TwoMoE(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        compiled = self.compile(model)
        x = torch.randn(6, 8)
        for i in range(12):
            out, runtime, graphs = self.run_counted(compiled, x)
            flagged = i % 2 == 0
            self.assertEqual(runtime.leaves(), [model.moe1, model.moe2] if flagged else [], f"toggle {i}")
            torch.testing.assert_close(out, model(x))
            if flagged and graphs:
                self.assertEqual(len(graphs), 1, "a flagged model came back split into several graphs")
            (leafpass.unset_z3_leaf_modules if flagged else leafpass.set_z3_leaf_modules)(model, [MoEBlock])
        # every flagged call after the first reused the one whole graph
        self.assertEqual(torch._dynamo.utils.counters["stats"]["unique_graphs"] < 10, True)
        frames_at_limit = [k for k in torch._dynamo.utils.counters["recompile_limit"]] if "recompile_limit" in torch._dynamo.utils.counters else []
        self.assertEqual(frames_at_limit, [])

    def test_flagged_then_fullgraph_compiles_in_one_graph(self):
        model = TwoMoE(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        compiled = self.compile(model, fullgraph=True)
        compiled(torch.randn(6, 8))
        self.assertEqual(sum(torch._dynamo.utils.counters["graph_break"].values()), 0)

    def test_other_backends_are_not_affected(self):
        model = TwoMoE(8)
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        runtime = RecordingRuntime()
        with leafpass.use_runtime(runtime):
            out = torch.compile(model, backend="aot_eager")(torch.randn(6, 8))
        self.assertEqual(runtime.calls, [])  # aot_eager traced into the leaves: no prefetch, no opacity
        self.assertEqual(out.shape, (6, 8))

    def test_flagged_model_pickles_copies_and_keeps_state_dict_after_compiling(self):
        model = TwoMoE(8)
        keys = list(model.state_dict())
        leafpass.set_z3_leaf_modules(model, [MoEBlock])
        compiled = self.compile(model, fullgraph=True)
        x = torch.randn(6, 8)
        compiled(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        self.assertTrue(loaded.moe1._z3_leaf)
        torch.testing.assert_close(loaded(x), model(x))
        self.assertEqual(list(model.state_dict()), keys)
        self.assertEqual(list(copy.deepcopy(model).state_dict()), keys)
        pickle.loads(pickle.dumps(model))
        # leafpass stores nothing on the model but the flag (torch.compile marks the root itself)
        self.assertEqual(set(model.__dict__) - set(TwoMoE(8).__dict__) - {"_is_torch_compile"}, set())
        self.assertEqual(set(model.moe1.__dict__) - set(MoEBlock(8).__dict__), {"_z3_leaf"})


def test_backend_found_by_name_in_a_fresh_interpreter():
    code = textwrap.dedent(
        """
        import sys, torch
        assert "z3leaf" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        assert "leafpass" not in sys.modules
        from torch import nn
        m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        m[0]._z3_leaf = True
        out = torch.compile(m, backend="z3leaf", fullgraph=True, options={"inner": "eager"})(torch.randn(2, 4))
        assert "leafpass" in sys.modules
        print("ok", tuple(out.shape))
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok (2, 4)" in result.stdout


def test_wrapped_backend_is_still_recognised():
    """torch._dynamo.testing.CompileCounterWithBackend keeps the backend in `.backend`."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = TwoMoE(8)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    counter = CompileCounterWithBackend(leafpass.make_backend(inner="eager"))
    torch.compile(model, backend=counter, fullgraph=True)(torch.randn(6, 8))
    assert counter.frame_count == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
