"""``python -m leafpass explain TARGET``: what z3leaf makes of a model.

TARGET is ``path/to/file.py[:func]`` or ``package.module[:func]``; ``func`` (default
``build``) takes no arguments and returns ``(model, example_inputs)``, the inputs a
tuple of positional arguments or a dict of keyword arguments. explain compiles the
model with ``torch.compile(backend=leafpass.make_backend(inner=...))`` on CPU, not
``fullgraph`` so that graph breaks show, runs it once and prints:

* the flagged leaves: qualified name, class, parameter tensors, elements, bytes, how
  each was flagged and how many opaque calls the graphs make to it;
* the number of graphs the backend received (with ``--graph``, each one as
  ``leafpass.format_graph`` text);
* every graph break: reason, user-code location, the module(s) its code is in and
  whether that is inside a flagged leaf; frames Dynamo gave up on (run eagerly);
* recompiles, with Dynamo's guard-failure reason;
* every ``prefetch_all``, in graph order: the leaf and its parameter count;
* with ``--suggest``: modules to flag that would remove the breaks, best first, and a
  check that flags the recommended ones on a copy of the model and compiles again.

``--json`` prints the same as one JSON object. Its keys: ``leaves`` (list of ``{name,
class, qualified_class, params, numel, bytes, flagged_by, opaque_calls}`` where
``params`` counts parameter tensors as ``prefetch_all`` does and ``numel`` their
elements), ``graphs`` (int), ``graph_details`` (per graph: ``ops``, ``leaf_calls``,
``prefetches``, and ``text`` with ``--graph``), ``graph_breaks`` (list of ``{reason,
location, function, module, in_leaf, user_stack, detail}``), ``skipped_frames``
(frames Dynamo gave up on; same fields plus ``code``), ``recompiles`` (a list, one
``{function, location, reason, module, compile_id}`` per recompile: its length is the
count), ``prefetches`` (list of ``{leaf, params}`` in order), and with ``--suggest``
``suggested_leaves`` (list of ``{name, class, breaks, recompiles, params, bytes,
recommended}``) and ``suggestion_check`` (``{flagged, status, graphs_before,
graphs_after, breaks_before, breaks_after, recompiles_before, recompiles_after}``).

The report is also logged as the structured-trace artifact ``leafpass_explain``, so a
run under ``TORCH_TRACE=dir`` shows it in tlparse.

A target that does not exist, does not import or returns the wrong thing prints one
line on stderr and exits with 2; a model that fails when run compiled exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import os
import sys
import traceback
from typing import Any, NoReturn

__all__ = ["main", "load_target", "TargetError", "render_text"]

from leafpass import INNER_COMPILERS as INNER_CHOICES  # noqa: E402  (one list: the backend's)
USAGE_HINT = "TARGET is path/to/file.py[:func] or package.module[:func]"
_load_counter = itertools.count()


class TargetError(Exception):
    """The target cannot be used; the message is one line saying what and how to fix it."""


def _one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_one_line(exc)}" if str(exc) else type(exc).__name__


def _where_in(exc: BaseException, filename: str | None) -> str:
    """`` (at file:line)`` of the innermost traceback frame in ``filename``, else the innermost."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {_rel(exc.filename)}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    if filename:
        mine = [f for f in frames if os.path.abspath(f.filename) == filename]
    else:  # the innermost frame of user code: not torch's, not this package's plumbing
        skip = tuple(os.path.dirname(m.__file__) + os.sep for m in _loaded("torch", "leafpass"))
        mine = [f for f in frames if not os.path.abspath(f.filename).startswith(skip)
                or os.sep + "testing" + os.sep in f.filename]
    frame = (mine or frames)[-1]
    return f" (at {_rel(frame.filename)}:{frame.lineno})"


def _loaded(*names: str) -> list:
    return [sys.modules[n] for n in names if getattr(sys.modules.get(n), "__file__", None)]


def _rel(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


# --------------------------------------------------------------------------- loading the target


def split_target(target: str) -> tuple[str, str]:
    """``'a/b.py:make'`` -> ``('a/b.py', 'make')``; ``func`` defaults to ``build``."""
    if not target or not target.strip():
        raise TargetError(f"empty TARGET; {USAGE_HINT}, e.g. examples/explain_target.py:build")
    spec, func = target, "build"
    if ":" in target:
        head, tail = target.rsplit(":", 1)
        if tail == "":
            raise TargetError(f"target {target!r} ends with ':' but names no function; write {head}:build "
                              f"or leave out the ':'")
        if all(part.isidentifier() for part in tail.split(".")):
            spec, func = head, tail
        elif not (len(head) == 1 and head.isalpha()):  # not a Windows drive letter
            raise TargetError(f"target {target!r}: {tail!r} is not a function name; {USAGE_HINT}")
    if not spec:
        raise TargetError(f"target {target!r} names no file or module; {USAGE_HINT}")
    return spec, func


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _import_file(spec: str):
    path = os.path.abspath(spec)
    if not os.path.exists(path):
        raise TargetError(f"target file {spec!r} does not exist (looked in {os.getcwd()}); {USAGE_HINT}")
    if os.path.isdir(path):
        raise TargetError(f"target {spec!r} is a directory; name a Python file in it, e.g. {spec.rstrip('/')}/model.py:build")
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    name = f"_leafpass_explain_target_{next(_load_counter)}_{stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise TargetError(f"target {spec!r} is not a Python file that can be imported; {USAGE_HINT}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)  # like `python file.py`: sibling modules import
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - anything the file raises, SystemExit included
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise TargetError(f"importing target file {spec!r} failed: {_exc_text(exc)}{_where_in(exc, path)}; "
                          f"fix that error (the file must import cleanly with `python {spec}`)") from None
    return module, path


def _import_module(spec: str):
    try:
        module = importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (spec == missing or spec.startswith(missing + ".")):
            raise TargetError(f"target module {spec!r} not found (no module named {missing!r}); {USAGE_HINT} - "
                              f"check the spelling, or run from the directory that holds the package") from None
        raise TargetError(f"importing target module {spec!r} failed: {_exc_text(exc)}{_where_in(exc, None)}; "
                          f"install the missing module or fix the import") from None
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        filename = getattr(sys.modules.get(spec), "__file__", None)
        raise TargetError(f"importing target module {spec!r} failed: {_exc_text(exc)}{_where_in(exc, filename)}; "
                          f"fix that error") from None
    return module, getattr(module, "__file__", None)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"


def load_target(target: str):
    """Import TARGET and call its function: ``(model, inputs, 'file.py:func')``; raises TargetError."""
    import torch

    spec, func = split_target(target)
    if _is_file_spec(spec):
        module, filename = _import_file(spec)
    else:
        module, filename = _import_module(spec)
    where = f"{spec}:{func}"
    obj = module
    for part in func.split("."):
        if not hasattr(obj, part):
            available = sorted(
                n for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
                and not isinstance(v, type)
            )
            listed = f" (functions defined there: {', '.join(available[:6])})" if available else ""
            raise TargetError(f"{spec!r} has no function {func!r}{listed}; define {func}() returning "
                              f"(model, example_inputs), or name another one as {spec}:NAME")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TargetError(f"{where} is {_describe(obj)}, not a function; it must be a function taking no "
                          f"arguments that returns (model, example_inputs)")
    try:
        result = obj()
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise TargetError(f"calling {where}() failed: {_exc_text(exc)}{_where_in(exc, filename and os.path.abspath(filename))}; "
                          f"it must take no arguments and return (model, example_inputs)") from None
    shape_hint = ("it must return (model, example_inputs): a torch.nn.Module and a tuple of positional "
                  "inputs or a dict of keyword inputs, e.g. `return model, (x,)`")
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TargetError(f"{where}() returned {_describe(result)}; {shape_hint}")
    model, inputs = result
    if not isinstance(model, torch.nn.Module):
        raise TargetError(f"{where}() returned {_describe(model)} as the model; {shape_hint}")
    if isinstance(inputs, torch.Tensor):
        raise TargetError(f"{where}() returned a single Tensor as example_inputs; wrap it in a tuple: "
                          f"`return model, (x,)`")
    if not isinstance(inputs, (tuple, list, dict)):
        raise TargetError(f"{where}() returned {_describe(inputs)} as example_inputs; {shape_hint}")
    if isinstance(inputs, dict) and not all(isinstance(k, str) for k in inputs):
        raise TargetError(f"{where}() returned a dict of example_inputs with non-string keys; keyword inputs "
                          f"are passed as model(**inputs), so the keys must be argument names")
    return model, (dict(inputs) if isinstance(inputs, dict) else tuple(inputs)), where


# --------------------------------------------------------------------------- text


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _modules(names: list[str]) -> str:
    shown = [n or "(root)" for n in names]
    if not shown:
        return "(no module)"
    if len(shown) > 4:
        return " | ".join(shown[:3]) + f" | ... ({len(shown)} modules)"
    return " | ".join(shown)


def _table(rows: list[list[str]], right: set[int] = frozenset(), indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _inputs_text(inputs: list[dict[str, Any]]) -> str:
    parts = []
    for item in inputs:
        if item["type"] == "tensor":
            parts.append(f"{item['name']}: {item['dtype']}{item['shape']}")
        else:
            parts.append(f"{item['name']}: {item['type']}")
    return ", ".join(parts) or "(none)"


def render_text(report: dict[str, Any]) -> str:
    out: list[str] = []
    add = out.append
    model, backend = report["model"], report["backend"]
    add(f"leafpass explain {report.get('target') or ''}".rstrip())
    add(f"model     {model['class']}: {model['params']} parameters, {model['numel']:,} elements, {_size(model['bytes'])}")
    add(f"inputs    {_inputs_text(report['inputs'])}")
    grad = ", no_grad" if backend["no_grad"] else ""
    add(f"compiled  torch.compile(backend=\"z3leaf\", inner=\"{backend['inner']}\"), not fullgraph{grad}; "
        f"ran once  (torch {report['torch']}, leafpass {report['leafpass']})")

    leaves = report["leaves"]
    add("")
    add(f"leaves: {len(leaves)}")
    if leaves:
        rows = [["name", "class", "params", "elements", "bytes", "flagged by", "opaque calls"]]
        for leaf in leaves:
            rows.append([leaf["name"] or "(root)", leaf["class"], str(leaf["params"]), f"{leaf['numel']:,}",
                         _size(leaf["bytes"]), leaf["flagged_by"], str(leaf["opaque_calls"])])
        out.extend(_table(rows, right={2, 3, 6}))
        for leaf in leaves:
            if "inside_leaf" in leaf:
                add(f"  note: {leaf['name']} is inside leaf {leaf['inside_leaf']}; the outermost flagged module wins")
            elif leaf["opaque_calls"] == 0:
                add(f"  note: no compiled graph calls {leaf['name'] or '(root)'}: it ran eagerly or not at all")
    else:
        add("  (no module is flagged: set module._z3_leaf = True, e.g. leafpass.set_z3_leaf_modules(model, [Block]))")

    add("")
    add(f"graphs: {report['graphs']}")
    for g in report["graph_details"]:
        calls = ", ".join(g["leaf_calls"]) or "none"
        add(f"  graph {g['index']}: {g['ops']} ops, leaf calls: {calls}")

    breaks = report["graph_breaks"]
    add("")
    add(f"graph breaks: {len(breaks)}")
    for i, b in enumerate(breaks, 1):
        add(f"  {i}. {b['location']} in {b['function']}   module: {_modules(b['module'])}   "
            f"in leaf: {'yes' if b['in_leaf'] else 'no'}")
        add(f"     {b['reason']}")
        if len(b["user_stack"]) > 1:
            add(f"     stack: {' > '.join(b['user_stack'])}")

    skipped = report["skipped_frames"]
    if any(e["in_leaf"] for e in breaks + skipped):
        add("  note: a break in leaf code means the leaf's code was traced, not kept opaque: it was entered")
        add("        other than by module(...) from a compiled frame (e.g. leaf.forward(...)); call the leaf itself")
    if skipped:
        add("")
        add(f"frames Dynamo gave up on (they ran eagerly): {len(skipped)}")
        for i, s in enumerate(skipped, 1):
            add(f"  {i}. {s['function']} ({s['code']}), at {s['location']}   module: {_modules(s['module'])}   "
                f"in leaf: {'yes' if s['in_leaf'] else 'no'}")
            add(f"     {s['reason']}")

    recompiles = report["recompiles"]
    add("")
    add(f"recompiles: {len(recompiles)}")
    for i, r in enumerate(recompiles, 1):
        add(f"  {i}. {r['function']} ({r['location']})   module: {_modules(r['module'])}")
        add(f"     {_one_line(r['reason'], 200)}")

    prefetches = report["prefetches"]
    add("")
    add(f"prefetches (in order): {len(prefetches)}")
    n = 0
    for g in report["graph_details"]:
        for p in g["prefetches"]:
            n += 1
            add(f"  {n}. graph {g['index']}  prefetch_all {p['leaf']} ({p['params']} params)")

    if "suggested_leaves" in report:
        out.extend(_suggestions_text(report))

    if any("text" in g for g in report["graph_details"]):
        for g in report["graph_details"]:
            add("")
            add(f"graph {g['index']}:")
            out.extend("  " + line for line in g["text"].rstrip("\n").splitlines())
    return "\n".join(out) + "\n"


def _suggestions_text(report: dict[str, Any]) -> list[str]:
    out = ["", "suggested leaves (best first; * = recommended set):"]
    suggestions = report["suggested_leaves"]
    if not suggestions:
        out.append("  none: no break or recompile is in a module that could be flagged")
        return out
    rows = [["", "name", "class", "breaks", "recompiles", "params", "bytes"]]
    for s in suggestions:
        rows.append(["*" if s["recommended"] else " ", s["name"], s["class"], str(s["breaks"]),
                     str(s["recompiles"]), str(s["params"]), _size(s["bytes"])])
    out.extend(_table(rows, right={3, 4, 5}))
    check = report.get("suggestion_check") or {}
    if check.get("status") == "checked":
        out.append(f"  check: with {', '.join(check['flagged'])} flagged on a copy of the model: "
                   f"graph breaks + eager frames {check['breaks_before']} -> {check['breaks_after']}, "
                   f"graphs {check['graphs_before']} -> {check['graphs_after']}, "
                   f"recompiles {check['recompiles_before']} -> {check['recompiles_after']}")
    elif check.get("status"):
        out.append(f"  check: {check['status']}")
    if check.get("apply"):
        out.append(f"  to apply: {check['apply']}")
    return out


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(2, f"leafpass explain: {message} (see python -m leafpass explain --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m leafpass explain",
        description="Compile a model with the z3leaf backend (on CPU, not fullgraph), run it once and report "
                    "its leaves, graphs, graph breaks, recompiles and prefetches.",
        epilog="TARGET's function takes no arguments and returns (model, example_inputs), the inputs a tuple of "
               "positional arguments or a dict of keyword arguments. Example: "
               "python -m leafpass explain examples/explain_target.py:build_unflagged --suggest",
    )
    p.add_argument("target", metavar="TARGET", help="path/to/file.py[:func] or package.module[:func] (func defaults to build)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--graph", action="store_true", help="include the format_graph text of every graph")
    p.add_argument("--suggest", action="store_true",
                   help="suggest modules to flag as leaves that would remove the graph breaks, and check them")
    p.add_argument("--no-verify", action="store_true",
                   help="with --suggest, do not compile again with the recommended leaves flagged")
    p.add_argument("--inner", choices=INNER_CHOICES, default="aot_eager",
                   help="compiler for the non-leaf pieces (default: aot_eager, the fastest that still runs AOTAutograd)")
    p.add_argument("--no-grad", action="store_true", help="run the model under torch.no_grad()")
    return p


def _fail(message: str, code: int) -> int:
    print(f"leafpass explain: {_one_line(message, 600)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)

    from .explain_report import RunFailed, build_report

    # Everything the target prints goes to stderr: stdout holds the report only.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            model, inputs, where = load_target(args.target)
        except TargetError as exc:
            return _fail(str(exc), 2)
        try:
            report = build_report(model, inputs, inner=args.inner, suggest=args.suggest,
                                  verify=not args.no_verify, graphs_text=args.graph,
                                  no_grad=args.no_grad, target=where)
        except RunFailed as exc:
            cause = exc.__cause__
            return _fail(f"running {where}'s model compiled with z3leaf failed: {exc}"
                         f"{_where_in(cause, None) if cause is not None else ''}; "
                         f"run it eagerly to check the model and inputs, or try --inner eager", 1)
    if "suggested_leaves" in report:
        report["suggestion_check"]["apply"] = _apply_hint(model, report)
    _emit_trace(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_text(report), end="")
    return 0


def _apply_hint(model, report: dict[str, Any]) -> str | None:
    """The leafpass call that flags the recommended suggestions."""
    names = [s["name"] for s in report["suggested_leaves"] if s["recommended"]]
    if not names:
        return None
    by_name = dict(model.named_modules())
    classes = sorted({type(by_name[n]).__name__ for n in names})
    instances = sorted(n for n, m in by_name.items() if type(m).__name__ in classes and not getattr(m, "_z3_leaf", False))
    if instances == sorted(names):
        return f"leafpass.set_z3_leaf_modules(model, {classes!r})"
    return f"leafpass.set_z3_leaf_modules_by_name(model, {names!r})"


def _emit_trace(report: dict[str, Any]) -> None:
    import torch._logging

    payload = json.dumps(report)
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "leafpass_explain", "encoding": "json"},
        payload_fn=lambda: payload,
        expect_trace_id=False,
    )


if __name__ == "__main__":
    sys.exit(main())
