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
* graph breaks and frames Dynamo gave up on (run eagerly), grouped by cause (the same
  location and reason): how many times each hit, the module(s) its code is in and
  whether that is inside a flagged leaf, and one short stack (the model's ``forward``s
  and the user's own code; library frames folded);
* recompiles, with Dynamo's guard-failure reason;
* every ``prefetch_all``, in graph order: the leaf and its parameter count;
* with ``--suggest``: modules to flag that would remove the breaks (the smallest module
  holding each, DeepSpeed's default leaf classes first), what each gathers at once, and
  a check that flags the recommended ones on a copy of the model, compiles again and
  says in one line what is left.

``--json`` prints the same as one JSON object. Its keys: ``leaves`` (list of ``{name,
class, qualified_class, params, numel, bytes, flagged_by, opaque_calls}`` where
``params`` counts parameter tensors as ``prefetch_all`` does and ``numel`` their
elements), ``graphs`` (int), ``graph_details`` (per graph: ``ops``, ``leaf_calls``,
``prefetches``, and ``text`` with ``--graph``), ``graph_breaks`` (the raw list, one
``{reason, location, function, module, in_leaf, constructing, user_stack, detail}`` per break
Dynamo recorded; ``constructing`` names the module class being built when the break is in
its ``__init__``, a module built inside a ``forward``, else null), ``skipped_frames`` (frames Dynamo gave up on; same fields plus ``code``),
``break_causes`` (both grouped by location and reason, most frequent first: ``{location,
reason, function, module, in_leaf, constructing, breaks, eager_frames, eager_functions, graph_breaks,
skipped_frames, stack, folded_frames}``, ``graph_breaks``/``skipped_frames`` being indices
into the raw lists and ``stack`` the short stack), ``recompiles`` (a list, one
``{function, location, reason, module, compile_id}`` per recompile: its length is the
count), ``prefetches`` (list of ``{leaf, params}`` in order), and with ``--suggest``
``suggested_leaves`` (list of ``{class, qualified_class, names, deepspeed_default, why,
breaks, recompiles, params, numel, bytes, recommended, after, apply}``, ``after`` being
``{graphs, breaks, recompiles}`` as the check measured or null) and ``suggestion_check``
(``{flagged, status, graphs_before, graphs_after, breaks_before, breaks_after,
recompiles_before, recompiles_after, apply}``, plus ``failed_class``, a one-line
``error`` and ``ran_eagerly`` when ``status`` is ``failed``: ``ran_eagerly`` is true when the
model ran but a flagged leaf's call could not be compiled, a ``LeafArgumentError`` that
Dynamo caught and answered by running the calling frame eagerly).

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
    shown = _compact_names([n or "(root)" for n in names])
    if not shown:
        return "(no module)"
    if len(shown) > 4:
        return " | ".join(shown[:3]) + f" | ... ({len(names)} modules)"
    return " | ".join(shown)


def _compact_names(names: list[str]) -> list[str]:
    """``['model.layers.0.mlp', 'model.layers.1.mlp']`` -> ``['model.layers.{0,1}.mlp']``: names
    that differ only in one numbered part are written once."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = None
        for i, part in enumerate(parts):
            if part.isdigit():
                key = (tuple(parts[:i]), tuple(parts[i + 1:]))
                break
        groups.setdefault(key if key is not None else (name,), []).append(name)
    out = []
    for key, members in groups.items():
        if len(key) == 2 and len(members) > 1 and all(m.split(".")[len(key[0])].isdigit() for m in members):
            numbers = ",".join(m.split(".")[len(key[0])] for m in members)
            out.append(".".join([*key[0], "{" + numbers + "}", *key[1]]))
        else:
            out.extend(members)
    return out


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
    details = report["graph_details"]
    if len(details) > 4:  # many pieces: their sizes on one line, the ones that call leaves on their own
        add(f"  ops per graph: {', '.join(str(g['ops']) for g in details)}")
        details = [g for g in details if g["leaf_calls"]]
    for g in details:
        calls = ", ".join(g["leaf_calls"]) or "none"
        add(f"  graph {g['index']}: {g['ops']} ops, leaf calls: {calls}")

    breaks, skipped, causes = report["graph_breaks"], report["skipped_frames"], report["break_causes"]
    add("")
    if breaks or skipped:
        add(f"graph breaks: {len(breaks)}, frames Dynamo gave up on (they ran eagerly): {len(skipped)}; "
            f"by cause: {len(causes)}")
    else:
        add("graph breaks: 0")
    for i, c in enumerate(causes, 1):
        counts = [f"{c['breaks']} break{'s' * (c['breaks'] != 1)}"] if c["breaks"] else []
        if c["eager_frames"]:
            counts.append(f"{c['eager_frames']} eager frame{'s' * (c['eager_frames'] != 1)}")
        add(f"  {i}. {c['location']} in {c['function']}: {', '.join(counts)}")
        add(f"     {c['reason']}")
        built = f"   constructing a {c['constructing']}" if c.get("constructing") else ""
        add(f"     module: {_modules(c['module'])}   in leaf: {'yes' if c['in_leaf'] else 'no'}{built}")
        if len(c["stack"]) > 1:
            folded = f"  (+{c['folded_frames']} library frames)" if c["folded_frames"] else ""
            add(f"     stack: {' > '.join(c['stack'])}{folded}")
    if any(c["reason"].startswith("LeafArgumentError:") for c in causes):
        add("  note: a LeafArgumentError means a flagged leaf's call could not be compiled: Dynamo ran the frame")
        add("        that calls it eagerly (no error is raised); its message names the leaf, the argument and the fix")
    if any(c["in_leaf"] for c in causes):
        add("  note: a break in leaf code means the leaf's code was traced, not kept opaque: it was entered")
        add("        other than by module(...) from a compiled frame (e.g. leaf.forward(...)); call the leaf itself")

    recompiles = report["recompiles"]
    add("")
    add(f"recompiles: {len(recompiles)}")
    by_code: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in recompiles:
        by_code.setdefault((r["function"], r["location"]), []).append(r)
    for i, ((function, location), group) in enumerate(by_code.items(), 1):
        times = f", {len(group)} times" if len(group) > 1 else ""
        add(f"  {i}. {function} ({location}{times})   module: {_modules(group[0]['module'])}")
        add(f"     {_one_line(group[0]['reason'].split(' User stack trace:')[0], 200)}")

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


_WHY = {"DeepSpeed default leaf class": "DeepSpeed default", "innermost module holding the breaks": "innermost",
        "encloses a recommended module": "encloses *"}


def _suggestions_text(report: dict[str, Any]) -> list[str]:
    out = ["", "suggested leaves (* = recommended; DeepSpeed's default leaf classes first):"]
    suggestions = report["suggested_leaves"]
    if not suggestions:
        out.append("  none: no break is in a module that could be flagged")
        return out
    rows = [["", "class", "modules", "why", "breaks", "recompiles", "gathers: params", "bytes",
             "after: graphs", "breaks"]]
    for s in suggestions:
        after = s.get("after") or {}
        rows.append(["*" if s["recommended"] else " ", s["class"], _modules(s["names"]), _WHY.get(s["why"], s["why"]),
                     str(s["breaks"]), str(s["recompiles"]), str(s["params"]), _size(s["bytes"]),
                     str(after.get("graphs", "-")), str(after.get("breaks", "-"))])
    out.extend(_table(rows, right={4, 5, 6, 8, 9}))
    out.append("  breaks: graph breaks and eager frames in the modules; gathers: one call's parameters, gathered at "
               "once; after: measured by the check")
    out.append(f"  {check_line(report.get('suggestion_check') or {}, suggestions)}")
    apply = (report.get("suggestion_check") or {}).get("apply")
    if apply:
        out.append(f"  to apply: {apply}")
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_line(check: dict[str, Any], suggestions: list[dict[str, Any]]) -> str:
    """The check of the recommended leaves, in one line."""
    classes = ", ".join(dict.fromkeys(s["class"] for s in suggestions if s["recommended"])) or "nothing"
    status = check.get("status")
    if status == "checked":
        return (f"check: with {classes} flagged on a copy of the model: {_plural(check['graphs_after'], 'graph')}, "
                f"{_plural(check['breaks_after'], 'break')}, {_plural(check['recompiles_after'], 'recompile')} "
                f"(before: {_plural(check['graphs_before'], 'graph')}, {_plural(check['breaks_before'], 'break')}, "
                f"{_plural(check['recompiles_before'], 'recompile')})")
    if status == "failed" and check.get("ran_eagerly"):
        return (f"check: failed: with {check['failed_class']} flagged on a copy of the model, a leaf's call could "
                f"not be compiled (Dynamo ran its frame eagerly): {_one_line(check['error'], 400)}")
    if status == "failed":
        return (f"check: failed: with {check['failed_class']} flagged on a copy of the model, the model raised "
                f"{_one_line(check['error'], 400)}")
    return f"check: {_one_line(status or 'not run', 300)}"


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
    _emit_trace(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_text(report), end="")
    return 0


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
