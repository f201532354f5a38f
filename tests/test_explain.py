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
from leafpass.tools.explain_report import Frame, ModuleIndex, _leaves, suggest_leaves
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


def test_suggest_lists_the_moe_blocks_first_and_checks_them(unflagged):
    suggestions = unflagged["suggested_leaves"]
    top = [(s["name"], s["class"], s["recommended"]) for s in suggestions[:2]]
    assert top == [("moe1", "MoEBlock", True), ("moe2", "MoEBlock", True)]
    assert all(s["breaks"] >= len(unflagged["graph_breaks"]) for s in suggestions[:2])
    check = unflagged["suggestion_check"]
    assert check["flagged"] == ["moe1", "moe2"]
    assert check["status"] == "checked"
    assert (check["breaks_after"], check["graphs_after"]) == (0, 1)
    assert check["apply"] == "leafpass.set_z3_leaf_modules(model, ['MoEBlock'])"


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
    names = [s["name"] for s in report["suggested_leaves"]]
    assert names[0] == "moe2"
    assert not any(n == "moe1" or n.startswith("moe1.") for n in names), "suggested a flagged module"
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
    assert not any(s["name"].startswith("moe") for s in report["suggested_leaves"])


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


def test_suggest_prefers_the_innermost_module_covering_a_subtree():
    model = Outer()
    index = ModuleIndex(model)

    def event(*modules):
        return {"module": list(modules)}

    # breaks in pair.a and pair.b: pair covers both; root and flagged modules are never suggested
    got = suggest_leaves(index, [event("pair.a"), event("pair.b"), event("")], [], [], [])
    assert [(s["name"], s["breaks"], s["recommended"]) for s in got] == [("pair", 2, True)]
    # only pair.a breaks: pair adds nothing over pair.a, which wins
    got = suggest_leaves(index, [event("pair.a"), event("pair.a")], [], [], [])
    assert [(s["name"], s["breaks"]) for s in got] == [("pair.a", 2)]
    got = suggest_leaves(index, [event("pair.a"), event("other")], [], [event("other")], ["pair"])
    assert [(s["name"], s["breaks"], s["recompiles"]) for s in got] == [("other", 1, 1)]


def test_flagged_by_deepspeed_default_class():
    cls = type("MixtralSparseMoeBlock", (nn.Module,),
               {"__module__": "transformers.models.mixtral.modeling_mixtral", "forward": lambda self, x: x})
    model = nn.Sequential(nn.Linear(2, 2), cls(), nn.Sequential(nn.Linear(2, 2)))
    leafpass.set_z3_leaf_modules(model, [cls, "Sequential"], raise_if_not_found=False)
    leafpass.set_z3_leaf_module(model, False)
    leaves = {leaf["name"]: leaf for leaf in _leaves(ModuleIndex(model), [])}
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
