"""The documentation runs: README.md and docs/*.md are tested like code.

What runs and what is checked:

* Every ```python block of a Markdown file runs, in order, in one shared namespace, in a
  fresh interpreter per file (cwd = repository root, with a timeout). So each file is
  self-contained: it defines its models or imports them from ``leafpass.testing.models``.
* A ```python block followed by a ```text block (only blank lines between) must print
  exactly that text; trailing whitespace is ignored. That is how graph snapshots and
  other outputs in the docs stay true. ``EXPECTTEST_ACCEPT=1`` rewrites the ```text
  blocks with what is printed, as it does for ``assertExpectedInline``: read the diff.
* Outputs of ``leafpass explain`` quote Dynamo's own view of an unflagged model (its graph
  breaks, their wording, how many graphs): the docs show what the pin, torch 2.13, prints.
  On another torch release (``scripts/test-torch.sh``) such a block still runs, and only its
  recommendation is compared: the ``to apply:`` line, and one graph, no break and no
  recompile once the leaves are flagged.
* ```bash, ```console and ```sh blocks, and blocks without a language, are never run.
* A ```python block placed right after the line ``<!-- docs-test: skip: REASON -->`` is
  compiled (its syntax is checked) but not run. Use it only for fragments that need what
  a single process cannot give (several ranks), and say why in REASON.

Beside the blocks: every heading ``### `dotted.name(args)` `` of docs/api.md must match the
code's signature (and every public name must have one), every exception and warning that
leafpass raises must be in docs/troubleshooting.md, every page of docs/ must be linked
from README.md, and relative links must point at files and headings that exist.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SKIP_MARK = re.compile(r"^<!--\s*docs-test:\s*skip:\s*\S.*-->$")
STARTS_RANKS = {"deepspeed.md"}  # pages whose blocks spawn DeepSpeed ranks: marked `distributed`
RUN_TIMEOUT = {"deepspeed.md": 420}  # seconds per file
DEFAULT_TIMEOUT = 300


# --------------------------------------------------------------------------- Markdown


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skip: bool  # preceded by a docs-test: skip marker
    follows_previous: bool  # only blank lines since the previous block closed


def blocks_of(path: pathlib.Path) -> list[Block]:
    """Fenced blocks at the top level of a Markdown file (``` fences, not indented)."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i, last_close = 0, None
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang = line[3:].strip().split(" ")[0].lower()
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"{path.name}:{start + 1}: unclosed ``` block")
            before = [ln for ln in lines[last_close + 1 if last_close is not None else 0:start] if ln.strip()]
            follows = last_close is not None and not before
            skip = bool(before) and bool(SKIP_MARK.match(before[-1].strip()))
            found.append(Block(lang, "\n".join(body) + "\n", start + 1, skip, follows))
            last_close = i
        i += 1
    return found


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


# The script each file's blocks run in: exec every block in one namespace, capture what
# each prints, stop at the first error. Results go to a JSON file, not stdout.
RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    blocks_file, results_file = sys.argv[1], sys.argv[2]
    with open(blocks_file) as f:
        blocks = json.load(f)
    namespace = {"__name__": "__main__"}
    results = []
    for block in blocks:
        out = io.StringIO()
        entry = {"line": block["line"], "stdout": "", "error": None}
        try:
            # blank lines in front, so tracebacks give the line in the Markdown file
            code = compile("\\n" * block["line"] + block["code"], block["where"], "exec")
            if not block["skip"]:
                with contextlib.redirect_stdout(out):
                    exec(code, namespace)
        except BaseException:
            entry["error"] = traceback.format_exc()
        entry["stdout"] = out.getvalue()
        results.append(entry)
        with open(results_file, "w") as f:
            json.dump(results, f)
        if entry["error"]:
            break
    """
)


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _files_with_python() -> list:
    """Markdown files with python blocks, as pytest params."""
    return [
        pytest.param(p, id=_rel(p), marks=[pytest.mark.distributed] if p.name in STARTS_RANKS else [])
        for p in MARKDOWN
        if any(b.lang == "python" for b in blocks_of(p))
    ]


@pytest.mark.timeout(max(RUN_TIMEOUT.values()) + 60)
@pytest.mark.parametrize("path", _files_with_python())
def test_python_blocks_run_and_print_what_the_docs_show(path, tmp_path):
    blocks = blocks_of(path)
    python = [b for b in blocks if b.lang == "python"]
    payload = [
        {"code": b.code, "line": b.line, "skip": b.skip, "where": _rel(path)} for b in python
    ]
    blocks_file, results_file = tmp_path / "blocks.json", tmp_path / "results.json"
    blocks_file.write_text(json.dumps(payload))
    runner = tmp_path / "run_blocks.py"
    runner.write_text(RUNNER)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
    }
    env.pop("EXPECTTEST_ACCEPT", None)  # expecttest inside a block must not rewrite anything
    timeout = RUN_TIMEOUT.get(path.name, DEFAULT_TIMEOUT)
    try:
        proc = subprocess.run(
            [sys.executable, str(runner), str(blocks_file), str(results_file)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        done = json.loads(results_file.read_text()) if results_file.exists() else []
        pytest.fail(f"{_rel(path)}: blocks still running after {timeout}s; finished blocks at lines "
                    f"{[r['line'] for r in done]}\n{(exc.stderr or b'')[-3000:]!r}")
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    assert proc.returncode == 0 and len(results) == len(python), (
        f"{_rel(path)}: the block runner exited with {proc.returncode} after {len(results)} of "
        f"{len(python)} blocks\n{proc.stderr[-3000:]}"
    )
    for result in results:
        assert result["error"] is None, (
            f"{_rel(path)}:{result['line']}: the python block failed\n{result['error']}\n"
            f"stderr:\n{proc.stderr[-2000:]}"
        )
    by_line = {r["line"]: r for r in results}
    accept = os.environ.get("EXPECTTEST_ACCEPT") == "1"
    rewrites = []
    for before, after in zip(blocks, blocks[1:]):
        if before.lang == "python" and after.lang == "text" and after.follows_previous:
            assert not before.skip, f"{_rel(path)}:{after.line}: output shown for a block that is not run"
            printed, shown = _normalize(by_line[before.line]["stdout"]), _normalize(after.code)
            if "explain" in before.code and not _is_the_pin():
                _assert_same_recommendation(printed, shown, f"{_rel(path)}:{after.line}")
                continue
            if accept and printed != shown:
                rewrites.append((after, printed))
                continue
            assert printed == shown, (
                f"{_rel(path)}:{after.line}: the ```text block differs from what the python block at line "
                f"{before.line} prints.\n--- printed\n{printed}\n--- shown in the docs\n{shown}"
            )
    if rewrites:
        _rewrite_text_blocks(path, rewrites)


def _is_the_pin() -> bool:
    import torch

    from leafpass.versions import in_range

    return in_range(torch.__version__, (2, 13), (2, 14))


def _assert_same_recommendation(printed: str, shown: str, where: str) -> None:
    """An ``explain`` report on a torch other than the pin: the same leaves to apply, and
    after flagging them one graph, no break, no recompile (the text says so on every torch)."""
    def apply_line(text: str) -> list[str]:
        return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("to apply:")]

    assert apply_line(printed) == apply_line(shown) != [], f"{where}: another recommendation\n{printed}"
    assert ": 1 graph, 0 breaks, 0 recompiles (before:" in printed, f"{where}: flagged, not one graph\n{printed}"


def _rewrite_text_blocks(path: pathlib.Path, rewrites: list[tuple[Block, str]]) -> None:
    """Replace the bodies of ``text`` blocks with ``printed`` (bottom first: line numbers hold)."""
    lines = path.read_text().splitlines()
    for block, printed in sorted(rewrites, key=lambda r: -r[0].line):
        first = block.line  # index of the first body line (the fence is at block.line - 1)
        last = first + len(block.code.splitlines())
        lines[first:last] = printed.splitlines()
    path.write_text("\n".join(lines) + "\n")


def test_skip_markers_are_rare_and_attached_to_python_blocks():
    skipped = []
    for path in MARKDOWN:
        lines = path.read_text().splitlines()
        marks = [i + 1 for i, ln in enumerate(lines) if "docs-test:" in ln]
        attached = [b for b in blocks_of(path) if b.skip]
        assert all(b.lang == "python" for b in attached), f"{_rel(path)}: a skip marker before a non-python block"
        assert len(marks) == len(attached), f"{_rel(path)}: a docs-test marker at lines {marks} is malformed or not " \
                                            f"right before a ```python block"
        skipped += [f"{_rel(path)}:{b.line}" for b in attached]
    assert len(skipped) <= 3, f"too many python blocks are not run: {skipped}"


# --------------------------------------------------------------------------- links


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: pathlib.Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors: set[str] = set()
    for line in path.read_text().splitlines():
        match = re.match(r"^#{1,6} (.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchor, n = slug, 1
            while anchor in anchors:
                anchor, n = f"{slug}-{n}", n + 1
            anchors.add(anchor)
    return anchors


def test_relative_links_point_at_files_and_headings_that_exist():
    for path in MARKDOWN:
        for target in LINK.findall(path.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part) if file_part else path
            assert linked.exists(), f"{_rel(path)}: broken link {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{_rel(path)}: no heading #{anchor} in {file_part or path.name}"


# --------------------------------------------------------------------------- API reference

API = DOCS / "api.md"
HEADING = re.compile(r"^#{3,4} `([A-Za-z_][\w.]*)(\(.*\))?`", re.MULTILINE)


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and get the rest as attributes."""
    import leafpass  # noqa: F401  (registers torch.ops.leafpass)

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - not a module (torch.ops.leafpass), try a shorter prefix
            continue
        owner = None
        for attr in parts[cut:]:
            owner, obj = obj, getattr(obj, attr)
        return obj, owner
    raise AssertionError(f"cannot import {dotted}")


def _plain_signature(obj, owner) -> str:
    """``(a, b=1, *, c=None)``: names, kinds and defaults, without annotations."""
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())
    if inspect.isclass(owner) and params and params[0].name in ("self", "cls") and \
            not isinstance(inspect.getattr_static(owner, obj.__name__, None), staticmethod):
        params = params[1:]
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    return str(sig.replace(parameters=plain, return_annotation=inspect.Signature.empty))


def _api_headings() -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in HEADING.finditer(API.read_text())]


def test_api_reference_signatures_match_the_code():
    headings = _api_headings()
    assert len(headings) > 20, "docs/api.md has lost its ### `name(args)` headings"
    wrong = []
    for name, documented in headings:
        obj, owner = _resolve(name)
        if documented is None:
            continue
        actual = _plain_signature(obj, owner)
        if re.sub(r"\s+", "", documented) != re.sub(r"\s+", "", actual):
            wrong.append(f"{name}{documented}  !=  code: {name}{actual}")
    assert not wrong, "docs/api.md signatures that differ from the code:\n" + "\n".join(wrong)


def test_api_reference_covers_every_public_name():
    import leafpass
    import leafpass.testing.distributed
    import leafpass.testing.models
    import leafpass.testing.recording

    documented = {name for name, _ in _api_headings()}
    wanted = [f"leafpass.{n}" for n in leafpass.__all__]
    wanted += [f"leafpass.testing.distributed.{n}" for n in ("run_ranks", "zero3_config", "DistributedRunError")]
    wanted += ["leafpass.testing.recording.RecordingRuntime"]
    wanted += [f"leafpass.testing.models.{n}" for n in leafpass.testing.models.__all__]
    missing = [n for n in wanted if n not in documented]
    assert not missing, f"docs/api.md has no ### heading for {missing}"


def test_explain_options_are_documented():
    from leafpass.tools.explain import _parser

    text = API.read_text()
    options = [s for action in _parser()._actions for s in action.option_strings if s.startswith("--")]
    missing = [o for o in options if f"`{o}" not in text]
    assert not missing, f"docs/api.md does not describe explain's options {missing}"


def test_demo_options_are_documented():
    import contextlib
    import io

    from leafpass.tools.demo import parse_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    options = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", out.getvalue())))
    text = API.read_text()
    missing = [o for o in options if f"`{o}`" not in text]
    assert options and not missing, f"docs/api.md does not describe demo's options {missing}"


def test_backend_options_are_documented():
    from leafpass.backend import INNER_COMPILERS, OPTIONS

    text = API.read_text()
    assert all(f"`{o}`" in text for o in OPTIONS), list(OPTIONS)
    assert all(f'"{c}"' in text for c in INNER_COMPILERS), INNER_COMPILERS


# --------------------------------------------------------------------------- troubleshooting

TROUBLESHOOTING = DOCS / "troubleshooting.md"

# Raise sites documented as a family by one section instead of message by message: the
# exception class -> the text that section must contain.
FAMILIES = {
    "TargetError": "exits with 2",  # every unusable explain TARGET: one line on stderr
    "RunFailed": "exits with 1",  # explain: the target's model failed when run compiled
    "DistributedRunError": "DistributedRunError",  # run_ranks: message assembled from the ranks' reports
    "ArgumentTypeError": "A bad command-line value",  # argparse reports it as a usage error, exit 2
}


@dataclasses.dataclass
class RaiseSite:
    where: str
    kind: str  # exception class, or "warning"
    key: str | None  # the leading literal words of its message, None if not literal


def _literal_key(node: ast.AST) -> str | None:
    """The first six words of a message's first literal run of three words or more
    (else of its longest run); None if the message is not a literal.

    ``f"leafpass: leaf {leaf!r} (id {leaf_id}) no longer exists; the compiled program ..."``
    -> ``no longer exists; the compiled program``: a phrase the troubleshooting page quotes.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        segments = [node.value]
    elif isinstance(node, ast.JoinedStr):
        segments = [v.value for v in node.values if isinstance(v, ast.Constant)]
    else:
        return None
    runs = [" ".join(s.split()).lstrip(" :;,.-)'\"").rstrip(" :;,.-('\"") for s in segments]
    runs = [r.split(" ") for r in runs if r]
    if not runs:
        return None
    chosen = next((r for r in runs if len(r) >= 3), max(runs, key=len))
    return " ".join(chosen[:6]).rstrip(" :;,.")


def raise_sites() -> list[RaiseSite]:
    sites = []
    for path in sorted((ROOT / "leafpass").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                kind = ast.unparse(node.exc.func).split(".")[-1]
                key = _literal_key(node.exc.args[0]) if node.exc.args else None
                sites.append(RaiseSite(where, kind, key))
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("warnings.warn", "warn") and node.args:
                sites.append(RaiseSite(where, "warning", _literal_key(node.args[0])))
    return sites


def test_every_error_and_warning_is_in_troubleshooting():
    text = " ".join(TROUBLESHOOTING.read_text().split())
    sites = raise_sites()
    assert len(sites) > 30, "the raise-site scan found too little; has the layout changed?"
    undocumented = []
    for site in sites:
        if site.kind in FAMILIES:
            if FAMILIES[site.kind] not in text:
                undocumented.append(f"{site.where}: {site.kind} (section with {FAMILIES[site.kind]!r})")
            continue
        if site.kind != "warning" and site.kind not in text:
            undocumented.append(f"{site.where}: {site.kind} is never named")
        if site.key is not None and site.key not in text:
            undocumented.append(f"{site.where}: {site.kind} {site.key!r}")
    assert not undocumented, (
        "docs/troubleshooting.md does not cover these raise/warn sites (quote the start of the "
        "message and say what to do):\n" + "\n".join(undocumented)
    )
