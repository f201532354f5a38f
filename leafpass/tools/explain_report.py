"""The data behind ``python -m leafpass explain``: compile a model with z3leaf, run it
once and describe what happened, as one JSON-able dict.

This is a thin layer over leafpass's public API (``make_backend``, ``record_graphs``,
``format_graph``, ``get_z3_leaf_modules``, ``set_z3_leaf_modules_by_name``,
``DEFAULT_LEAF_MODULE_CLASSES`` and the ``torch.ops.leafpass.prefetch_all`` op) plus
what Dynamo records about a compile:

* graph breaks: ``torch._dynamo.utils.graph_break_reasons``, the list Dynamo fills with
  one ``GraphCompileReason(reason, user_stack)`` per graph break and that
  ``torch._dynamo.explain`` reads too (``torch._dynamo.reset()`` clears it);
* frames Dynamo gave up on (the frame falls back to eager, e.g. "graph break in loop")
  and recompiles: ``torch._dynamo.utils.get_compilation_metrics()``, one record per
  frame compile with ``fail_type``/``fail_reason``/``fail_user_frame_*`` and
  ``recompile_reason``.

Which module a break is in is decided from source: each user frame of the break's
stack is matched against the source lines of the ``forward`` of the model's module
classes, walking down the module tree from the outermost frame. Code shared by
several instances (``layers.0.mlp`` and ``layers.1.mlp`` run the same ``forward``
from the same line) cannot be told apart from a stack, so a break names every
instance it may be in (``module``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.utils
from torch import nn

import leafpass

__all__ = ["build_report", "describe_inputs", "summarize_reason"]

REPORT_VERSION = 1


# --------------------------------------------------------------------------- paths and frames


def display_path(filename: str) -> str:
    """``filename`` relative to the working directory, or from ``site-packages/`` on."""
    if not filename:
        return "?"
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        rel = filename
    if not rel.startswith(".." + os.sep) and rel != "..":
        return rel
    marker = "site-packages" + os.sep
    if marker in filename:
        return filename.rsplit(marker, 1)[1]
    return filename


def _norm(filename: str) -> str:
    return os.path.normcase(os.path.realpath(filename)) if filename else ""


@dataclasses.dataclass(frozen=True)
class Frame:
    filename: str  # as Dynamo recorded it
    lineno: int
    name: str
    via_call: bool = False  # entered through ``module(...)`` (nn.Module.__call__), not a plain call

    def location(self) -> str:
        return f"{display_path(self.filename)}:{self.lineno}"


def _plumbing_codes() -> set[tuple[str, str]]:
    """(file, function) of the frames every module call goes through: ``nn.Module.__call__``
    as installed (leafpass wraps it), ``_wrapped_call_impl`` and ``_call_impl``."""
    codes = set()
    for fn in (nn.Module.__call__, getattr(nn.Module, "_wrapped_call_impl", None), getattr(nn.Module, "_call_impl", None)):
        code = getattr(inspect.unwrap(fn), "__code__", None) if fn is not None else None
        if code is not None:
            codes.add((_norm(code.co_filename), code.co_name))
    return codes


def user_frames(stack: Iterable[Any]) -> list[Frame]:
    """The frames of a Dynamo user stack without the module-call plumbing, outermost first."""
    plumbing = _plumbing_codes()
    frames = []
    via_call = False
    for f in stack:
        filename, lineno, name = getattr(f, "filename", ""), getattr(f, "lineno", 0) or 0, getattr(f, "name", "?")
        if (_norm(filename), name) in plumbing:
            via_call = True
            continue
        frames.append(Frame(filename, int(lineno), name, via_call))
        via_call = False
    return frames


# --------------------------------------------------------------------------- reasons


_EXPLANATION = re.compile(r"^\s*Explanation:\s*(.*)$", re.M)


def summarize_reason(text: str) -> str:
    """One line for a Dynamo break reason: its first line, plus the explanation if any."""
    text = (text or "").strip()
    if not text:
        return "(no reason recorded)"
    if text.startswith("generic_jump "):  # the frame's own branch; the message Dynamo logs is elsewhere
        return f"Data-dependent branching: a branch on {text[len('generic_jump '):]} (Dynamo generic_jump)"
    first = text.splitlines()[0].strip()
    match = _EXPLANATION.search(text)
    if match and match.group(1).strip() and match.group(1).strip() not in first:
        return f"{first}: {match.group(1).strip()}"
    return first


# --------------------------------------------------------------------------- the module tree


class ModuleIndex:
    """Module names of a model and the source lines of their classes, to place frames in modules."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.named: list[tuple[str, nn.Module]] = list(model.named_modules())
        self.name_of: dict[int, str] = {id(m): n for n, m in self.named}
        self.by_name: dict[str, nn.Module] = dict(self.named)
        self.order: dict[str, int] = {n: i for i, (n, _) in enumerate(self.named)}
        self.flagged: set[str] = {n for n, m in self.named if leafpass.z3_leaf_module(m)}
        self._forward_range: dict[type, tuple[str, int, int] | None] = {}
        self._class_range: dict[type, tuple[str, int, int] | None] = {}

    # source ranges ---------------------------------------------------------

    @staticmethod
    def _range(obj) -> tuple[str, int, int] | None:
        try:
            obj = inspect.unwrap(obj)
            filename = inspect.getsourcefile(obj)
            lines, start = inspect.getsourcelines(obj)
        except (TypeError, OSError, ValueError):
            return None
        if not filename:
            return None
        return _norm(filename), start, start + len(lines) - 1

    def forward_range(self, cls: type) -> tuple[str, int, int] | None:
        if cls not in self._forward_range:
            forward = getattr(cls, "forward", None)
            unimplemented = getattr(nn.Module, "forward", None)
            self._forward_range[cls] = None if forward is None or forward is unimplemented else self._range(forward)
        return self._forward_range[cls]

    def class_range(self, cls: type) -> tuple[str, int, int] | None:
        if cls not in self._class_range:
            self._class_range[cls] = self._range(cls)
        return self._class_range[cls]

    @staticmethod
    def _covers(rng, frame: Frame) -> bool:
        return rng is not None and rng[0] == _norm(frame.filename) and rng[1] <= frame.lineno <= rng[2]

    def callable_module(self, name: str) -> bool:
        """Whether the module has a ``forward`` of its own (``ModuleList`` and friends do not)."""
        return self.forward_range(type(self.by_name[name])) is not None

    # tree ----------------------------------------------------------------------

    @staticmethod
    def is_under(name: str, ancestor: str) -> bool:
        """``name`` is ``ancestor`` or inside it."""
        return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")

    @staticmethod
    def depth(name: str) -> int:
        return 0 if name == "" else name.count(".") + 1

    def _matching(self, frame: Frame, names: Iterable[str], use_class: bool) -> list[str]:
        found = []
        for name in names:
            cls = type(self.by_name[name])
            rng = self.class_range(cls) if use_class else self.forward_range(cls)
            if self._covers(rng, frame):
                found.append(name)
        return found

    def place(self, frames: list[Frame]) -> list[str]:
        """The innermost modules whose code the stack ``frames`` (outermost first) is in.

        The outermost frame picks every module whose ``forward`` (else whose class body)
        holds it; each following frame moves down to the descendants whose ``forward``
        holds it, or stays (a helper function or another method of the same module).
        A frame entered through ``module(...)`` from a traced frame is not in a flagged
        leaf: z3leaf keeps such a call opaque (``leaf.forward(...)`` is not kept opaque).
        """
        all_names = [n for n, _ in self.named]
        current: list[str] | None = None
        for frame in frames:
            if current is None:
                found = self._matching(frame, all_names, False) or self._matching(frame, all_names, True)
                if found:
                    # the outermost modules holding the frame: a frame of one forward is in
                    # every module of that class, keep the ones not inside another match
                    current = [n for n in found if not any(o != n and self.is_under(n, o) for o in found)]
                continue
            below = [n for n in all_names if n not in current and any(self.is_under(n, c) for c in current)]
            found = self._matching(frame, below, False)
            if not found and not self._matching(frame, current, True):
                found = self._matching(frame, below, True)
            if frame.via_call:
                found = [n for n in found if n not in self.flagged] or found
            if found:
                current = [n for n in found if not any(o != n and self.is_under(n, o) for o in found)]
        return sorted(current or [], key=self.order.__getitem__)


# --------------------------------------------------------------------------- one compile


@dataclasses.dataclass
class Run:
    graphs: list[torch.fx.GraphModule]
    breaks: list[tuple[str, list[Frame]]]  # (reason, user frames)
    skipped: list[dict[str, Any]]  # compile records of frames Dynamo gave up on
    recompiles: list[dict[str, Any]]
    error: BaseException | None = None


def call_model(fn: Callable, inputs: Any):
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    return fn(*inputs)


def compile_and_run(model: nn.Module, inputs: Any, inner: str, no_grad: bool = False) -> Run:
    """Compile ``model`` with z3leaf (not fullgraph), run it once, collect what Dynamo recorded."""
    torch._dynamo.reset()
    utils = torch._dynamo.utils
    utils.counters.clear()
    getattr(utils, "clear_compilation_metrics", lambda: None)()
    compiled = torch.compile(model, backend=leafpass.make_backend(inner=inner))
    error = None
    with leafpass.record_graphs() as recorder:
        try:
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                call_model(compiled, inputs)
        except Exception as exc:  # reported by the caller
            error = exc
    breaks = [
        (str(getattr(r, "reason", "")), user_frames(getattr(r, "user_stack", []) or []))
        for r in getattr(utils, "graph_break_reasons", [])
    ]
    skipped, recompiles = [], []
    for record in getattr(utils, "get_compilation_metrics", list)():
        entry = {
            "compile_id": str(record.compile_id) if record.compile_id is not None else None,
            "function": record.co_name,
            "code": Frame(record.co_filename or "", int(record.co_firstlineno or 0), record.co_name or "?"),
        }
        if record.fail_type and record.fail_type != "SkipFrame":
            at = None
            if record.fail_user_frame_filename:
                at = Frame(record.fail_user_frame_filename, int(record.fail_user_frame_lineno or 0), "?")
            skipped.append({**entry, "fail_type": record.fail_type, "reason": record.fail_reason or "", "at": at})
        if record.recompile_reason:
            recompiles.append({**entry, "reason": record.recompile_reason})
    return Run(list(recorder.graphs), breaks, skipped, recompiles, error)


# --------------------------------------------------------------------------- report pieces


def _param_stats(module: nn.Module) -> tuple[int, int, int]:
    """(parameter tensors, elements, bytes) of ``module``'s subtree, each parameter once.

    Under ZeRO-3 a partitioned parameter's full size is ``ds_numel``."""
    tensors = elements = nbytes = 0
    for p in module.parameters():
        numel = int(getattr(p, "ds_numel", p.numel()))
        tensors += 1
        elements += numel
        nbytes += numel * p.element_size()
    return tensors, elements, nbytes


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_inputs(inputs: Any) -> list[dict[str, Any]]:
    def one(name: str, value: Any) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            return {"name": name, "type": "tensor", "dtype": str(value.dtype).replace("torch.", ""),
                    "shape": list(value.shape), "device": str(value.device)}
        return {"name": name, "type": type(value).__name__}

    if isinstance(inputs, Mapping):
        return [one(str(k), v) for k, v in inputs.items()]
    return [one(f"args[{i}]", v) for i, v in enumerate(inputs)]


def _leaves(index: ModuleIndex, graphs: list[torch.fx.GraphModule]) -> list[dict[str, Any]]:
    calls: dict[str, int] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                name = _model_name_of_submodule(index, gm, node.target)
                calls[name] = calls.get(name, 0) + 1
    defaults = set(leafpass.DEFAULT_LEAF_MODULE_CLASSES)
    flagged = leafpass.get_z3_leaf_modules(index.model)
    names = [index.name_of[id(m)] for m in flagged if id(m) in index.name_of]
    leaves = []
    for name in names:
        module = index.by_name[name]
        tensors, elements, nbytes = _param_stats(module)
        outer = [o for o in names if o != name and index.is_under(name, o)]
        entry = {
            "name": name,
            "class": type(module).__name__,
            "qualified_class": _qualname(type(module)),
            "params": tensors,
            "numel": elements,
            "bytes": nbytes,
            "flagged_by": "deepspeed default class" if _qualname(type(module)) in defaults else "flag attribute",
            "opaque_calls": calls.get(name, 0),
        }
        if outer:
            entry["inside_leaf"] = outer[0]
        leaves.append(entry)
    return leaves


def _model_name_of_submodule(index: ModuleIndex, gm: torch.fx.GraphModule, target: str) -> str:
    try:
        module = gm.get_submodule(target)
    except AttributeError:
        return target
    return index.name_of.get(id(module), target)


_is_prefetch = leafpass.is_prefetch_node  # the graph vocabulary's predicate (leafpass.graph_nodes)


def _prefetches_of(index: ModuleIndex, gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """``{leaf, params}`` of each ``prefetch_all`` of ``gm``, in graph order; the leaf named as in the model."""
    out = []
    for node in gm.graph.nodes:
        if not _is_prefetch(node):
            continue
        # prefetch_all(params, leaf, leaf_id) sits right before the leaf's call_module
        params, leaf = node.args[0], node.args[1]
        nxt = node.next
        name = _model_name_of_submodule(index, gm, nxt.target) if nxt.op == "call_module" else str(leaf)
        out.append({"leaf": name, "params": len(params)})
    return out


def _graph_details(index: ModuleIndex, graphs, with_text: bool) -> list[dict[str, Any]]:
    details = []
    for i, gm in enumerate(graphs):
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        entry = {
            "index": i,
            "ops": len([n for n in nodes if not _is_prefetch(n)]),
            "leaf_calls": [_model_name_of_submodule(index, gm, n.target) for n in nodes if n.op == "call_module"],
            "prefetches": _prefetches_of(index, gm),
        }
        if with_text:
            entry["text"] = leafpass.format_graph(gm)
        details.append(entry)
    return details


def _in_leaf(modules: list[str], flagged: list[str]) -> bool:
    return bool(modules) and all(any(ModuleIndex.is_under(m, f) for f in flagged) for m in modules)


def _function_name(index: ModuleIndex, modules: list[str], frame: Frame | None) -> str:
    if frame is None:
        return "?"
    classes = {type(index.by_name[m]).__name__ for m in modules}
    if len(classes) == 1 and frame.name not in ("?", "") and not frame.name.startswith("torch_dynamo_resume"):
        cls = next(iter(classes))
        if index._covers(index.class_range(type(index.by_name[modules[0]])), frame):
            return f"{cls}.{frame.name}"
    return frame.name


def _events(index: ModuleIndex, run: Run, flagged: list[str]):
    """Graph breaks, skipped frames and recompiles, each placed in the model's modules."""
    breaks = []
    for reason, frames in run.breaks:
        modules = index.place(frames)
        inner = frames[-1] if frames else None
        breaks.append({
            "reason": summarize_reason(reason),
            "location": inner.location() if inner else "?",
            "function": _function_name(index, modules, inner),
            "module": modules,
            "in_leaf": _in_leaf(modules, flagged),
            "user_stack": [f"{f.location()} in {f.name}" for f in frames],
            "detail": reason.strip(),
        })
    skipped = []
    for rec in run.skipped:
        frames = [rec["code"]] + ([rec["at"]] if rec["at"] is not None else [])
        modules = index.place(frames)
        at = rec["at"] or rec["code"]
        skipped.append({
            "function": _function_name(index, index.place([rec["code"]]), rec["code"]),
            "code": rec["code"].location(),
            "reason": summarize_reason(rec["reason"]),
            "location": at.location(),
            "module": modules,
            "in_leaf": _in_leaf(modules, flagged),
            "compile_id": rec["compile_id"],
            "detail": rec["reason"].strip(),
        })
    recompiles = []
    for rec in run.recompiles:
        modules = index.place([rec["code"]])
        recompiles.append({
            "function": _function_name(index, modules, rec["code"]),
            "location": rec["code"].location(),
            "reason": rec["reason"].strip(),
            "module": modules,
            "compile_id": rec["compile_id"],
        })
    return breaks, skipped, recompiles


# --------------------------------------------------------------------------- suggestions


def suggest_leaves(index: ModuleIndex, breaks, skipped, recompiles, flagged: list[str]) -> list[dict[str, Any]]:
    """Modules that would remove the observed breaks if flagged, best first.

    A module's ``breaks`` counts the graph breaks and skipped frames whose code lies in
    its subtree (a break in code shared by several instances counts for each);
    ``recompiles`` the same for recompiled frames (shapes that change from call to
    call, such as data-dependent token counts). A module is dropped when a module
    inside it accounts for exactly the same events (the innermost one covering them
    wins), and so are the root, modules without a ``forward`` of their own, flagged
    modules and modules inside them. Ranked by breaks, then recompiles, then depth
    (innermost first). ``recommended`` marks a smallest set that covers every break
    placed in a module (greedy, in rank order).
    """
    break_units = [(i, m) for i, ev in enumerate(breaks + skipped) for m in ev["module"]]
    recompile_units = [(i, m) for i, ev in enumerate(recompiles) for m in ev["module"]]

    def eligible(name: str) -> bool:
        return (name != "" and index.callable_module(name)
                and not any(index.is_under(name, f) for f in flagged))

    def covered(name: str, units) -> set:
        return {u for u in units if index.is_under(u[1], name)}

    stats = {}
    for name, _ in index.named:
        if not eligible(name):
            continue
        b, r = covered(name, break_units), covered(name, recompile_units)
        if b or r:
            stats[name] = (b, r)
    # distinct events, not (event, instance) pairs
    counts = {n: (len({u[0] for u in b}), len({u[0] for u in r})) for n, (b, r) in stats.items()}
    kept = [
        n for n in stats
        if not any(d != n and index.is_under(d, n) and counts[d] == counts[n] for d in stats)
    ]
    kept.sort(key=lambda n: (-counts[n][0], -counts[n][1], -index.depth(n), index.order[n]))

    remaining = set(break_units)
    chosen: list[str] = []
    for name in kept:
        mine = stats[name][0] & remaining
        if mine and not any(index.is_under(name, c) for c in chosen):
            chosen.append(name)
            remaining -= mine
    result = []
    for name in kept:
        if name not in chosen and any(index.is_under(name, c) for c in chosen):
            continue  # inside a recommended module: flagging it adds nothing
        module = index.by_name[name]
        tensors, elements, nbytes = _param_stats(module)
        result.append({
            "name": name,
            "class": type(module).__name__,
            "breaks": counts[name][0],
            "recompiles": counts[name][1],
            "params": tensors,
            "bytes": nbytes,
            "recommended": name in chosen,
        })
    return result


# --------------------------------------------------------------------------- the report


class RunFailed(RuntimeError):
    """The compiled model raised; ``__cause__`` holds the error."""


def build_report(
    model: nn.Module,
    inputs: Any,
    *,
    inner: str = "aot_eager",
    suggest: bool = False,
    verify: bool = True,
    graphs_text: bool = False,
    no_grad: bool = False,
    target: str | None = None,
) -> dict[str, Any]:
    """Compile ``model`` with z3leaf, run it once on ``inputs`` and describe it (see ``explain``)."""
    pristine = None
    if suggest and verify:
        try:
            pristine = copy.deepcopy(model)
        except Exception as exc:  # a model that cannot be copied is not checked
            pristine = exc
    index = ModuleIndex(model)
    run = compile_and_run(model, inputs, inner, no_grad)
    if run.error is not None:
        raise RunFailed(f"{type(run.error).__name__}: {run.error}") from run.error
    flagged = [index.name_of[id(m)] for m in leafpass.get_z3_leaf_modules(model) if id(m) in index.name_of]
    breaks, skipped, recompiles = _events(index, run, flagged)
    tensors, elements, nbytes = _param_stats(model)
    details = _graph_details(index, run.graphs, graphs_text)
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "target": target,
        "model": {"class": type(model).__name__, "params": tensors, "numel": elements, "bytes": nbytes},
        "inputs": describe_inputs(inputs),
        "backend": {"name": "z3leaf", "inner": inner, "fullgraph": False, "no_grad": no_grad},
        "torch": torch.__version__,
        "leafpass": leafpass.__version__,
        "leaves": _leaves(index, run.graphs),
        "graphs": len(run.graphs),
        "graph_details": details,
        "graph_breaks": breaks,
        "skipped_frames": skipped,
        "recompiles": recompiles,
        "prefetches": [p for g in details for p in g["prefetches"]],
    }
    if suggest:
        suggestions = suggest_leaves(index, breaks, skipped, recompiles, flagged)
        report["suggested_leaves"] = suggestions
        report["suggestion_check"] = _check(pristine, inputs, inner, no_grad, suggestions, report)
    return report


def _check(pristine, inputs, inner, no_grad, suggestions, report) -> dict[str, Any]:
    """Flag the recommended suggestions on a copy of the model, compile again, count what is left."""
    names = [s["name"] for s in suggestions if s["recommended"]]
    check: dict[str, Any] = {"flagged": names}
    if not names:
        check["status"] = "nothing to check"
        return check
    if pristine is None:
        check["status"] = "skipped (--no-verify)"
        return check
    if isinstance(pristine, BaseException):
        check["status"] = f"skipped: the model cannot be deep-copied ({type(pristine).__name__}: {pristine})"
        return check
    leafpass.set_z3_leaf_modules_by_name(pristine, names)
    run = compile_and_run(pristine, inputs, inner, no_grad)
    torch._dynamo.reset()
    if run.error is not None:
        check["status"] = f"failed: the model raised {type(run.error).__name__}: {run.error}"
        return check
    check.update({
        "status": "checked",
        "graphs_before": report["graphs"],
        "graphs_after": len(run.graphs),
        "breaks_before": len(report["graph_breaks"]) + len(report["skipped_frames"]),
        "breaks_after": len(run.breaks) + len(run.skipped),
        "recompiles_before": len(report["recompiles"]),
        "recompiles_after": len(run.recompiles),
    })
    return check
