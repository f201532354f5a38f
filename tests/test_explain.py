"""``python -m leafpass explain``: the report on the example target, flagged and not,
breaks placed in modules, suggestions, the trace artifact and the target errors."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch._logging
from torch import nn

import leafpass
from leafpass.tools import explain
from leafpass.tools.explain_frames import Frame
from leafpass.tools.explain_graphs import leaves_of
from leafpass.tools.explain_modules import ModuleIndex
from leafpass.tools.explain_reasons import first_line_of_error
from leafpass.tools.explain_report import build_report
from leafpass.tools.explain_suggest import deepspeed_default_leaf_classes, suggest_leaves
from leafpass.testing.models import ExpertMLP, MoEBlock, TwoMoE

REPO = Path(__file__).resolve().parents[1]
TARGET = "examples/explain_target.py"
MOE_PARAMS = 17  # router.weight + 4 experts x (up.weight, up.bias, down.weight, down.bias)
MOE_BYTES = 4 * (16 * 4 + 4 * (16 * 32 + 32 + 32 * 16 + 16))


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


NONZERO_LINE = _line_of(MoEBlock.forward, ".nonzero(")
_cli = None  # (Popen, trace dir) of the CLI run, started by the _in_repo fixture


# --------------------------------------------------------------------------- targets used by module path


class ForwardBypass(nn.Module):
    """Calls its flagged leaf as ``self.moe.forward(x)``: z3leaf cannot keep that opaque."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.moe = MoEBlock(d)

    def forward(self, x):
        return self.moe.forward(self.inp(x))


def build_forward_bypass():
    torch.manual_seed(0)
    model = ForwardBypass()
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    return model, (torch.randn(5, 8),)


def build_half_flagged():
    """TwoMoE with moe1 flagged and moe2 not, inputs as keyword arguments."""
    torch.manual_seed(0)
    model = TwoMoE(d=8)
    leafpass.set_z3_leaf_modules_by_name(model, ["moe1"])
    return model, {"x": torch.randn(6, 8)}


class Picky(nn.Module):
    """Refuses an all-zero input: unflagged it only breaks the graph (a branch on data); flagged,
    leafpass cannot infer its outputs (fake tensors, then zeros), so compiling it fails."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        if x.abs().sum() == 0:
            raise ValueError("Picky needs a nonzero input")
        return self.lin(x)


def build_picky():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), Picky()), (torch.randn(3, 4),)


class WithHook:
    """An argument leafpass cannot pass through a leaf's opaque call: it holds a module."""

    def __init__(self) -> None:
        self.scale = 2.0
        self.hook = nn.Linear(2, 2)


class Gate(nn.Module):
    """Branches on its data (a graph break while it is not a leaf) and reads an object argument."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, extra):
        y = self.lin(x)
        if y.sum() > 0:
            return y * extra.scale
        return -y * extra.scale


class GateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gate = nn.Linear(4, 4), Gate()

    def forward(self, x, extra):
        return self.gate(self.inp(x), extra)


def build_gate():
    torch.manual_seed(0)
    return GateNet(), (torch.randn(3, 4), WithHook())


class Builds(nn.Module):
    """Builds an ``nn.Linear`` in its forward: Dynamo breaks inside ``Linear.__init__``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        extra = nn.Linear(4, 4)
        return self.b(self.a(x)) + extra(x)


class BuildsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk, self.out = Builds(), nn.Linear(4, 4)

    def forward(self, x):
        return self.out(self.blk(x))


def build_builds():
    torch.manual_seed(0)
    return BuildsNet(), (torch.randn(3, 4),)


# --------------------------------------------------------------------------- helpers


def run_main(argv):
    """(exit code, stdout, stderr, [(metadata, payload)] of leafpass_explain artifacts)."""
    artifacts = []
    real = torch._logging.trace_structured

    def spy(name, metadata_fn=dict, *, payload_fn=lambda: None, **kwargs):
        meta = metadata_fn()
        if name == "artifact" and isinstance(meta, dict) and meta.get("name") == "leafpass_explain":
            artifacts.append((meta, payload_fn()))
        return real(name, metadata_fn, payload_fn=payload_fn, **kwargs)

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(torch._logging, "trace_structured", spy), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = explain.main(list(argv))
    return code, out.getvalue(), err.getvalue(), artifacts


CLI_TEST = "test_cli_subprocess_json_and_torch_trace"


@pytest.fixture(scope="module", autouse=True)
def _in_repo(request, tmp_path_factory):
    """Run in the repository; start the CLI subprocess first so it overlaps the in-process tests."""
    cwd = os.getcwd()
    os.chdir(REPO)
    proc = None
    if any(item.name == CLI_TEST for item in request.session.items):
        trace_dir = tmp_path_factory.mktemp("torch_trace")
        proc = subprocess.Popen([sys.executable, "-m", "leafpass", "explain", TARGET, "--json"], cwd=REPO,
                                env={**os.environ, "TORCH_TRACE": str(trace_dir)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        request.module._cli = (proc, trace_dir)
    yield
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()
    torch._dynamo.reset()
    os.chdir(cwd)


@pytest.fixture(scope="module")
def flagged():
    code, out, err, artifacts = run_main([TARGET, "--json", "--inner", "eager"])
    assert code == 0, err
    return json.loads(out), artifacts


@pytest.fixture(scope="module")
def unflagged():
    code, out, err, _ = run_main([f"{TARGET}:build_unflagged", "--json", "--suggest", "--inner", "eager"])
    assert code == 0, err
    return json.loads(out)


# --------------------------------------------------------------------------- the flagged example


def test_flagged_leaves(flagged):
    report, _ = flagged
    leaves = [{k: leaf[k] for k in ("name", "class", "params", "bytes", "flagged_by", "opaque_calls")}
              for leaf in report["leaves"]]
    expected = {"class": "MoEBlock", "params": MOE_PARAMS, "bytes": MOE_BYTES, "flagged_by": "flag attribute",
                "opaque_calls": 1}
    assert leaves == [{"name": "moe1", **expected}, {"name": "moe2", **expected}]
    assert report["leaves"][0]["numel"] == MOE_BYTES // 4


def test_flagged_one_graph_no_breaks_prefetch_order(flagged):
    report, _ = flagged
    assert report["graphs"] == 1
    assert report["graph_breaks"] == []
    assert report["skipped_frames"] == []
    assert report["recompiles"] == []
    assert report["prefetches"] == [{"leaf": "moe1", "params": MOE_PARAMS}, {"leaf": "moe2", "params": MOE_PARAMS}]
    assert report["graph_details"][0]["leaf_calls"] == ["moe1", "moe2"]
    assert report["target"] == f"{TARGET}:build"
    assert "suggested_leaves" not in report


def test_report_is_a_trace_artifact(flagged):
    report, artifacts = flagged
    assert len(artifacts) == 1
    meta, payload = artifacts[0]
    assert meta == {"name": "leafpass_explain", "encoding": "json"}
    assert json.loads(payload) == report


def test_text_report(capsys):
    assert explain.main([TARGET, "--inner", "eager", "--graph"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"leafpass explain {TARGET}:build\n")
    for line in [
        "leaves: 2",
        "graphs: 1",
        "graph breaks: 0",
        "recompiles: 0",
        "prefetches (in order): 2",
        "  1. graph 0  prefetch_all moe1 (17 params)",
        "  2. graph 0  prefetch_all moe2 (17 params)",
        "  prefetch_all moe1 (17 params)",  # the --graph text
        "  t1 = moe1(t0)",
    ]:
        assert line in out.splitlines(), f"{line!r} not in:\n{out}"
    row = next(line for line in out.splitlines() if line.strip().startswith("moe1 "))
    assert row.split()[:3] == ["moe1", "MoEBlock", "17"] and "flag attribute" in row


# --------------------------------------------------------------------------- breaks and suggestions


def test_unflagged_breaks_are_outside_leaves(unflagged):
    report = unflagged
    assert report["leaves"] == [] and report["prefetches"] == []
    assert report["graphs"] > 1
    breaks = report["graph_breaks"]
    assert breaks, "unflagged MoE blocks must break the graph"
    for b in breaks:
        assert b["in_leaf"] is False
        assert b["location"] == f"leafpass{os.sep}testing{os.sep}models.py:{NONZERO_LINE}"
        assert b["function"] == "MoEBlock.forward"
        assert b["module"] == ["moe1", "moe2"]  # one forward, called from one line: either block
        assert "nonzero" in b["detail"]
    for s in report["skipped_frames"]:
        assert s["in_leaf"] is False and set(s["module"]) <= {"moe1", "moe2"}
    # grouped: the nonzero is one cause, with every break and the modules it may be in
    nonzero = [c for c in report["break_causes"] if c["location"].endswith(f"models.py:{NONZERO_LINE}")]
    assert len(nonzero) == 1, report["break_causes"]
    (cause,) = nonzero
    assert (cause["breaks"], cause["graph_breaks"]) == (len(breaks), list(range(len(breaks))))
    assert (cause["function"], cause["module"], cause["in_leaf"]) == ("MoEBlock.forward", ["moe1", "moe2"], False)
    assert cause["stack"][-1] == f"models.py:{NONZERO_LINE} in MoEBlock.forward"
    grouped = sum(c["breaks"] for c in report["break_causes"]), sum(c["eager_frames"] for c in report["break_causes"])
    assert grouped == (len(breaks), len(report["skipped_frames"]))


def test_suggest_lists_the_moe_blocks_first_and_checks_them(unflagged):
    first, *others = unflagged["suggested_leaves"]
    assert (first["class"], first["names"], first["recommended"], first["why"]) == (
        "MoEBlock", ["moe1", "moe2"], True, "innermost module holding the breaks")
    assert first["breaks"] == len(unflagged["graph_breaks"]) + len(unflagged["skipped_frames"])
    assert (first["params"], first["bytes"]) == (MOE_PARAMS, MOE_BYTES)  # one block is gathered at a time
    assert first["after"] == {"graphs": 1, "breaks": 0, "recompiles": 0}
    assert not any(s["recommended"] for s in others)
    check = unflagged["suggestion_check"]
    assert check["flagged"] == ["moe1", "moe2"]
    assert check["status"] == "checked"
    assert (check["breaks_after"], check["graphs_after"]) == (0, 1)
    assert check["apply"] == first["apply"] == "leafpass.set_z3_leaf_modules(model, ['MoEBlock'])"


def test_half_flagged_module_target_with_kwargs():
    code, out, err, _ = run_main(["tests.test_explain:build_half_flagged", "--json", "--suggest",
                                  "--no-verify", "--inner", "eager"])
    assert code == 0, err
    report = json.loads(out)
    assert [leaf["name"] for leaf in report["leaves"]] == ["moe1"]
    assert report["inputs"][0]["name"] == "x"
    assert report["graph_breaks"]
    for b in report["graph_breaks"]:
        # the stack cannot tell moe1 from moe2, but moe1 is called as an opaque leaf
        assert b["module"] == ["moe2"] and b["in_leaf"] is False
    assert report["suggested_leaves"][0]["names"] == ["moe2"]
    names = [n for s in report["suggested_leaves"] for n in s["names"]]
    assert not any(n == "moe1" or n.startswith("moe1.") for n in names), "suggested a flagged module"
    assert report["suggestion_check"]["status"] == "skipped (--no-verify)"
    assert report["prefetches"] == [{"leaf": "moe1", "params": MOE_PARAMS}]


def test_break_in_leaf_code_entered_through_forward():
    code, out, err, _ = run_main(["tests.test_explain:build_forward_bypass", "--json", "--suggest",
                                  "--inner", "eager"])
    assert code == 0, err
    report = json.loads(out)
    (b,) = report["graph_breaks"]
    assert (b["module"], b["in_leaf"], b["function"]) == (["moe"], True, "MoEBlock.forward")
    assert b["user_stack"][0].endswith(f"test_explain.py:{_line_of(ForwardBypass.forward, 'forward(self.inp')} in forward")
    assert report["leaves"][0]["opaque_calls"] == 0
    assert not any(n.startswith("moe") for s in report["suggested_leaves"] for n in s["names"])
    assert report["break_causes"][0]["in_leaf"] is True


# --------------------------------------------------------------------------- pieces, no compile


def test_place_walks_down_the_module_tree():
    model = TwoMoE(8)
    index = ModuleIndex(model)
    file = inspect.getsourcefile(TwoMoE)
    call = Frame(file, _line_of(TwoMoE.forward, "return self.moe2"), "forward")
    route = Frame(file, NONZERO_LINE, "forward", via_call=True)
    expert = Frame(file, _line_of(ExpertMLP.forward, "return"), "forward", via_call=True)
    assert index.place([call]) == [""]
    assert index.place([call, route]) == ["moe1", "moe2"]
    assert index.place([route]) == ["moe1", "moe2"]
    assert index.place([call, route, expert]) == [f"moe{i}.experts.{e}" for i in (1, 2) for e in range(4)]
    assert index.place([Frame("/nowhere.py", 1, "f")]) == []
    leafpass.set_z3_leaf_modules_by_name(model, ["moe1"])
    assert ModuleIndex(model).place([call, route]) == ["moe2"]
    assert ModuleIndex(model).place([call, Frame(file, NONZERO_LINE, "forward")]) == ["moe1", "moe2"]


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.b(self.a(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair, self.other = Pair(), nn.Linear(2, 2)

    def forward(self, x):
        return self.other(self.pair(x))


def _event(*modules, in_leaf=False):
    return {"module": list(modules), "in_leaf": in_leaf}


def _picks(got):
    return [(s["class"], s["names"], s["recommended"], s["breaks"]) for s in got]


def test_suggest_the_innermost_module_holding_each_break():
    index = ModuleIndex(Outer())
    # breaks in pair.a and pair.b: both Linears (one group), the Pair around them only as an
    # alternative; the root is never suggested
    got = suggest_leaves(index, [_event("pair.a"), _event("pair.b"), _event("")], [], [], [])
    assert _picks(got) == [("Linear", ["pair.a", "pair.b"], True, 2), ("Pair", ["pair"], False, 2)]
    assert got[1]["why"] == "encloses a recommended module"
    # a break in Pair's own code: Pair holds it, and a Linear inside it adds nothing
    got = suggest_leaves(index, [_event("pair"), _event("pair.a")], [], [_event("pair.b")], [])
    assert _picks(got) == [("Pair", ["pair"], True, 2), ("Linear", ["pair.a"], False, 1)]
    assert (got[0]["recompiles"], got[0]["params"], got[0]["bytes"]) == (1, 4, 48)
    # flagged modules, the ones inside them and breaks in leaf code are left out
    got = suggest_leaves(index, [_event("pair.a", in_leaf=True), _event("other")], [_event("pair.b")], [], ["pair"])
    assert _picks(got) == [("Linear", ["other"], True, 1)]


def test_suggest_prefers_a_deepspeed_default_class_around_the_break():
    moe = type("Qwen3MoeSparseMoeBlock", (nn.Module,), {
        "__module__": "transformers.models.qwen3_moe.modeling_qwen3_moe",
        "__init__": lambda self: (nn.Module.__init__(self), setattr(self, "experts", Pair()))[0],
        "forward": lambda self, x: self.experts(x)})
    layer = nn.Sequential(nn.Linear(2, 2), moe())
    index = ModuleIndex(nn.Sequential(layer))
    breaks = [_event("0.1.experts"), _event("0.1.experts")]
    got = suggest_leaves(index, breaks, [], [], [], default_classes=leafpass.DEFAULT_LEAF_MODULE_CLASSES)
    assert _picks(got) == [("Qwen3MoeSparseMoeBlock", ["0.1"], True, 2), ("Pair", ["0.1.experts"], False, 2),
                           ("Sequential", ["0"], False, 2)]
    assert got[0]["deepspeed_default"] is True and got[0]["why"] == "DeepSpeed default leaf class"
    # without the default classes the innermost module wins
    got = suggest_leaves(index, breaks, [], [], [], default_classes=())
    assert _picks(got)[0] == ("Pair", ["0.1.experts"], True, 2)


def test_deepspeed_default_leaf_classes_with_and_without_deepspeed():
    deepspeed_default_leaf_classes.cache_clear()
    try:
        with mock.patch.dict(sys.modules, {"deepspeed.runtime.zero.leaf_module_config": None}):
            assert deepspeed_default_leaf_classes() == leafpass.DEFAULT_LEAF_MODULE_CLASSES
        deepspeed_default_leaf_classes.cache_clear()
        pytest.importorskip("deepspeed")
        from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES
        assert deepspeed_default_leaf_classes() == tuple(DEFAULT_LEAF_MODULE_CLASSES)
        assert set(DEFAULT_LEAF_MODULE_CLASSES) == set(leafpass.DEFAULT_LEAF_MODULE_CLASSES), "the copy is stale"
    finally:
        deepspeed_default_leaf_classes.cache_clear()


def test_compact_module_names():
    assert explain._compact_names(["model.layers.0.mlp", "model.layers.1.mlp"]) == ["model.layers.{0,1}.mlp"]
    assert explain._compact_names(["a.0", "b", "a.1", "c.0.d"]) == ["a.{0,1}", "b", "c.0.d"]
    assert explain._modules([]) == "(no module)" and explain._modules([""]) == "(root)"


def test_first_line_of_error_takes_the_leafpass_error_in_the_chain():
    try:
        try:
            try:
                raise ValueError("inner")
            except ValueError as exc:
                raise leafpass.LeafShapeError("leafpass could not infer the outputs of leaf X\nmore") from exc
        except leafpass.LeafShapeError:
            raise RuntimeError("wrapper\nwith a long stack") from None  # as Dynamo raises
    except RuntimeError as exc:
        assert first_line_of_error(exc) == "LeafShapeError: leafpass could not infer the outputs of leaf X"
    assert first_line_of_error(KeyError()) == "KeyError"


def test_flagged_by_deepspeed_default_class():
    cls = type("MixtralSparseMoeBlock", (nn.Module,),
               {"__module__": "transformers.models.mixtral.modeling_mixtral", "forward": lambda self, x: x})
    model = nn.Sequential(nn.Linear(2, 2), cls(), nn.Sequential(nn.Linear(2, 2)))
    leafpass.set_z3_leaf_modules(model, [cls, "Sequential"], raise_if_not_found=False)
    leafpass.set_z3_leaf_module(model, False)
    leaves = {leaf["name"]: leaf for leaf in leaves_of(ModuleIndex(model), [])}
    assert leaves["1"]["flagged_by"] == "deepspeed default class"
    assert leaves["2"]["flagged_by"] == "flag attribute"
    assert (leaves["2"]["params"], leaves["2"]["bytes"]) == (2, 24)


# --------------------------------------------------------------------------- target errors


def _bad(tmp_path, source: str) -> str:
    path = tmp_path / "bad_target.py"
    path.write_text(source)
    return str(path)


@pytest.mark.parametrize("make, expect", [
    (lambda tmp: "no/such/file.py", "does not exist"),
    (lambda tmp: "no_such_package_xyz.models", "not found"),
    (lambda tmp: _bad(tmp, "import torch\nx = 1 / 0\n"), "ZeroDivisionError"),
    (lambda tmp: _bad(tmp, "def build(:\n"), "SyntaxError"),
    (lambda tmp: f"{TARGET}:nope", "has no function 'nope'"),
    (lambda tmp: _bad(tmp, "import torch\ndef build():\n    return torch.nn.Linear(2, 2), torch.ones(2)\n"),
     "single Tensor"),
    (lambda tmp: _bad(tmp, "def build():\n    return 'model'\n"), "returned a str"),
    (lambda tmp: _bad(tmp, "def build():\n    return 'model', ()\n"), "as the model"),
    (lambda tmp: _bad(tmp, "def build():\n    raise RuntimeError('no weights')\n"), "no weights"),
    (lambda tmp: _bad(tmp, "build = 3\n"), "not a function"),
], ids=["missing-file", "missing-module", "import-error", "syntax-error", "no-func", "tensor-inputs",
        "not-a-pair", "not-a-module", "func-raises", "not-callable"])
def test_bad_target_one_line_exit_2(tmp_path, capsys, make, expect):
    target = make(tmp_path)
    assert explain.main([target, "--json"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("leafpass explain: ") and expect in lines[0]
    assert target.split(":")[0] in lines[0] or os.path.basename(target) in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_usage(capsys):
    assert explain.main(["--help"]) == 0
    assert "TARGET" in capsys.readouterr().out
    assert explain.main([TARGET, "--inner", "nope"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--inner" in err


# --------------------------------------------------------------------------- the real command


def test_cli_subprocess_json_and_torch_trace():
    """`python -m leafpass explain examples/explain_target.py --json` under TORCH_TRACE (started by _in_repo)."""
    proc, trace_dir = _cli
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    report = json.loads(stdout)
    assert report["backend"]["inner"] == "aot_eager"
    assert [(leaf["name"], leaf["class"], leaf["params"], leaf["bytes"]) for leaf in report["leaves"]] == [
        ("moe1", "MoEBlock", MOE_PARAMS, MOE_BYTES), ("moe2", "MoEBlock", MOE_PARAMS, MOE_BYTES)]
    assert report["graphs"] == 1 and report["graph_breaks"] == [] and report["recompiles"] == []
    assert report["prefetches"] == [{"leaf": "moe1", "params": MOE_PARAMS}, {"leaf": "moe2", "params": MOE_PARAMS}]
    logs = list(trace_dir.glob("*.log"))
    assert logs, "TORCH_TRACE wrote no log"
    assert any('"leafpass_explain"' in log.read_text() for log in logs)


def test_model_that_fails_compiled_exits_1(tmp_path, capsys):
    target = _bad(tmp_path, "import torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
                            "        raise ValueError('expected 3 rows')\n"
                            "def build():\n    return M(), (torch.ones(2, 2),)\n")
    assert explain.main([target, "--inner", "eager"]) == 1
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("leafpass explain: running ") and "ValueError: expected 3 rows" in last
    assert "bad_target.py:4" in last and captured.out == ""


def test_a_check_that_fails_is_one_line():
    code, out, err, _ = run_main(["tests.test_explain:build_picky", "--suggest", "--inner", "eager"])
    assert code == 0, err
    assert "Traceback" not in out + err
    lines = [line for line in out.splitlines() if "check:" in line]
    assert lines == ["  check: failed: with Picky flagged on a copy of the model, the model raised LeafShapeError: "
                     "leafpass could not infer the outputs of leaf Picky: under fake tensors it raised a "
                     "data-dependent error; on zero inputs it raised ValueError: Picky needs a nonzero input. "
                     "Make the leaf's forward run on zero-filled inputs, or unflag it (module._z3_leaf = False)."]
    assert "  to apply: leafpass.set_z3_leaf_modules(model, ['Picky'])" in out.splitlines()


LEAF_ARGUMENT_ERROR = ("LeafArgumentError: leaf Gate is called with args[1].hook = Linear, which cannot go through the "
                       "leaf's opaque call (leafpass copies objects attribute by attribute: tensors, constants, "
                       "lists/tuples/dicts and nested plain objects). Pass it differently (as tensors or "
                       "constants), or unflag the leaf (module._z3_leaf = False).")


def test_a_leaf_argument_error_fails_the_check_with_its_message():
    # unflagged, Gate's branch breaks the graph and --suggest recommends Gate; flagged, its
    # `extra` cannot be copied into the opaque call: Dynamo catches the LeafArgumentError and
    # runs the frame eagerly, so the model runs and only the check can say what failed
    code, out, err, _ = run_main(["tests.test_explain:build_gate", "--json", "--suggest", "--inner", "eager"])
    assert code == 0, err
    report = json.loads(out)
    assert report["suggested_leaves"][0]["names"] == ["gate"] and report["suggested_leaves"][0]["recommended"]
    check = report["suggestion_check"]
    assert (check["status"], check["failed_class"], check["ran_eagerly"]) == ("failed", "Gate", True)
    assert check["error"] == LEAF_ARGUMENT_ERROR
    line = explain.check_line(check, report["suggested_leaves"])
    assert line == ("check: failed: with Gate flagged on a copy of the model, a leaf's call could not be compiled "
                    f"(Dynamo ran its frame eagerly): {LEAF_ARGUMENT_ERROR}")


def test_a_flagged_leaf_with_an_argument_it_cannot_take_shows_the_error():
    model, inputs = build_gate()
    leafpass.set_z3_leaf_modules(model, [Gate])

    report = build_report(model, inputs, inner="eager")
    assert report["graphs"] == 0
    (cause,) = report["break_causes"]
    assert (cause["reason"], cause["eager_frames"]) == (LEAF_ARGUMENT_ERROR, 1)
    text = explain.render_text(report)
    assert f"     {LEAF_ARGUMENT_ERROR}" in text.splitlines()
    assert "  note: a LeafArgumentError means a flagged leaf's call could not be compiled: Dynamo ran the frame" in text


def test_a_break_while_building_a_module_is_in_the_module_that_builds_it():
    # the break is in Linear.__init__ (a new Linear, built in Builds.forward): it is Builds's,
    # not blk.a's and blk.b's, and the report says it happens in construction
    code, out, err, _ = run_main(["tests.test_explain:build_builds", "--json", "--suggest", "--inner", "eager"])
    assert code == 0, err
    report = json.loads(out)
    (cause,) = report["break_causes"]
    assert (cause["module"], cause["constructing"], cause["function"]) == (["blk"], "Linear", "Linear.__init__")
    assert cause["stack"][-1].endswith("in Linear.__init__")
    for b in report["graph_breaks"]:
        assert (b["module"], b["constructing"]) == (["blk"], "Linear")
    assert [(s["class"], s["names"], s["recommended"]) for s in report["suggested_leaves"]] == [
        ("Builds", ["blk"], True)]
    assert report["suggestion_check"]["breaks_after"] == 0
    text = explain.render_text(report)
    assert "     module: blk   in leaf: no   constructing a Linear" in text.splitlines()
    index = ModuleIndex(BuildsNet())
    init = Frame(inspect.getsourcefile(nn.Linear), _line_of(nn.Linear.__init__, "super().__init__()"), "__init__")
    call = Frame(__file__, _line_of(Builds.forward, "extra = nn.Linear"), "forward")
    top = Frame(__file__, _line_of(BuildsNet.forward, "return"), "forward")
    assert index.place([top, call, init]) == ["blk"] and index.constructing([top, call, init]) == "Linear"
    assert index.place([top, call]) == ["blk"] and index.constructing([top, call]) is None


# --------------------------------------------------------------------------- a transformers model, as a new user runs it

QWEN_TARGET = "examples/explain_qwen3_moe.py"


@pytest.fixture(scope="module")
def qwen3_moe():
    """``explain examples/explain_qwen3_moe.py --suggest`` on a tiny Qwen3-MoE: nothing flagged,
    the eager experts loop, ``use_cache`` at its default (the layers receive a DynamicCache)."""
    transformers = pytest.importorskip("transformers")
    code, out, err, _ = run_main([QWEN_TARGET, "--json", "--suggest", "--inner", "eager"])
    assert code == 0, err
    experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts
    return json.loads(out), _line_of(experts.forward, "nonzero(")


@pytest.mark.transformers
def test_qwen3_moe_breaks_are_one_line_per_cause(qwen3_moe):
    report, nonzero_line = qwen3_moe
    location = f"modeling_qwen3_moe.py:{nonzero_line}"
    raw = [b for b in report["graph_breaks"] if b["location"].endswith(location)]
    assert len(raw) > 1, "the issue's model breaks at the experts' nonzero once per compiled frame"
    (cause,) = [c for c in report["break_causes"] if c["location"].endswith(location)]
    assert cause == report["break_causes"][0]  # the most frequent first
    assert cause["breaks"] == len(raw) and "aten.nonzero" in cause["reason"]
    assert cause["module"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert cause["stack"][0].endswith("in Qwen3MoeForCausalLM.forward")
    assert cause["stack"][-1] == f"{location} in Qwen3MoeExperts.forward"
    assert cause["folded_frames"] > 0 and len(cause["stack"]) < len(max(b["user_stack"] for b in raw))
    text = explain.render_text(report).splitlines()
    section = text[text.index(next(t for t in text if t.startswith("graph breaks:"))):text.index("recompiles: "
                                                                                                  f"{len(report['recompiles'])}")]
    headlines = [t for t in section if t.startswith("  ") and t.split(".")[0].strip().isdigit()]
    assert len(headlines) == len(report["break_causes"])
    eager = f", {cause['eager_frames']} eager frames" if cause["eager_frames"] > 1 else ""
    assert headlines[0].endswith(f"{location} in Qwen3MoeExperts.forward: {len(raw)} breaks{eager}"), headlines
    assert sum(location in t for t in headlines) == 1
    block = section[section.index(headlines[0]) + 1:section.index(headlines[1]) if len(headlines) > 1 else None]
    assert [t.split(":")[0].strip() for t in block] == ["Dynamic shape operator", "module", "stack"]  # one stack


@pytest.mark.transformers
def test_qwen3_moe_suggests_the_sparse_moe_block_and_checks_it(qwen3_moe):
    report, _ = qwen3_moe
    recommended = [s for s in report["suggested_leaves"] if s["recommended"]]
    assert [(s["class"], s["names"], s["deepspeed_default"]) for s in recommended] == [
        ("Qwen3MoeSparseMoeBlock", ["model.layers.0.mlp", "model.layers.1.mlp"], True)]
    (block,) = recommended
    assert block["after"] == {"graphs": 1, "breaks": 0, "recompiles": 0}
    others = {s["class"]: s for s in report["suggested_leaves"] if not s["recommended"]}
    assert set(others) == {"Qwen3MoeExperts", "Qwen3MoeDecoderLayer"}
    assert others["Qwen3MoeDecoderLayer"]["params"] > block["params"]  # a layer gathers more at once
    assert others["Qwen3MoeDecoderLayer"]["after"] is None  # not checked
    check = report["suggestion_check"]
    assert (check["status"], check["graphs_after"], check["breaks_after"]) == ("checked", 1, 0)
    assert check["apply"] == "leafpass.set_z3_leaf_modules(model, ['Qwen3MoeSparseMoeBlock'])"
    lines = [t for t in explain.render_text(report).splitlines() if "check:" in t]
    assert len(lines) == 1 and lines[0].startswith(
        "  check: with Qwen3MoeSparseMoeBlock flagged on a copy of the model: 1 graph, 0 breaks, 0 recompiles (before: ")


def test_a_leaf_argument_error_is_read_from_the_reason_as_every_torch_writes_it():
    from leafpass.tools.explain_reasons import leaf_argument_error

    message = "leafpass: leaf Gate is called with args[1].hook = Linear, which cannot go through it."
    torch_2_13 = f'Developer debug context: raised exception LeafArgumentError("{message}")'
    torch_2_11 = f'Developer debug context: raised exception LeafArgumentError((ConstantVariable(str: "{message}"),))'
    for reason in (torch_2_13, torch_2_11):
        assert leaf_argument_error(reason) == "LeafArgumentError: " + message.removeprefix("leafpass: ")
    assert leaf_argument_error("Observed exception") is None
