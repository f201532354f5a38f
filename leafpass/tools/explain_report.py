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
import functools
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

REPORT_VERSION = 2  # 2: break_causes; suggested_leaves grouped by class


# --------------------------------------------------------------------------- paths and frames


def display_path(filename: str) -> str:
    """``filename`` relative to the working directory, or from ``site-packages/`` on."""
    if not filename:
        return "?"
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        rel = filename
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):  # an installed package: from its name on
        if marker in filename:
            return filename.rsplit(marker, 1)[1]
    if not rel.startswith(".." + os.sep) and rel != "..":
        return rel
    return filename


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    """Directories whose frames are library code, folded in a short stack: installed
    packages, the standard library, torch, and leafpass itself (not ``leafpass/testing``)."""
    import sysconfig

    roots = {sysconfig.get_paths().get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {os.path.dirname(torch.__file__), os.path.dirname(leafpass.__file__)}
    return tuple(_norm(r) + os.sep for r in roots if r)


def is_library_file(filename: str) -> bool:
    """Whether a frame of ``filename`` is library code rather than the user's own."""
    path = _norm(filename)
    if os.sep + "site-packages" + os.sep in path or os.sep + "dist-packages" + os.sep in path:
        return True
    if path.startswith(_norm(os.path.dirname(leafpass.__file__)) + os.sep + "testing" + os.sep):
        return False
    return path.startswith(_library_roots())


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
        self.classes: set[type] = {type(m) for _, m in self.named}
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

    def forward_owner(self, frame: Frame) -> str | None:
        """``Class.forward`` when ``frame`` is in the ``forward`` of one of the model's module classes."""
        owners = {cls.__name__ for cls in self.classes if self._covers(self.forward_range(cls), frame)}
        return f"{owners.pop()}.forward" if len(owners) == 1 else None

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
    """Graph breaks, skipped frames and recompiles, each placed in the model's modules; and
    the user frames of each break and skipped frame (outermost first), in that order."""
    breaks, stacks = [], []
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
        stacks.append(frames)
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
        stacks.append(frames)
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
    return breaks, skipped, recompiles, stacks


# --------------------------------------------------------------------------- causes


def short_stack(index: ModuleIndex, frames: list[Frame]) -> tuple[list[str], int]:
    """The frames worth reading, outermost first, and how many were folded away.

    Kept: the user's own code, the ``forward`` of a module of the model (named
    ``Class.forward``) and the innermost frame, where the break is. Folded: every
    other frame of a library (decorators, wrappers, helpers of transformers or torch).
    """
    kept, folded = [], 0  # file:line in Class.forward (the full paths are in each break's user_stack)
    for i, frame in enumerate(frames):
        owner = index.forward_owner(frame)
        if owner is None and is_library_file(frame.filename) and i != len(frames) - 1:
            folded += 1
            continue
        where = f"{os.path.basename(display_path(frame.filename))}:{frame.lineno}"
        name = owner or (frame.name if frame.name not in ("", "?") else None)
        kept.append(f"{where} in {name}" if name else where)
    return kept, folded


def group_causes(index: ModuleIndex, breaks, skipped, stacks) -> list[dict[str, Any]]:
    """Graph breaks and skipped frames grouped by cause: the same location and reason.

    Dynamo records one break per frame it compiles, so one ``nonzero`` in an expert's
    ``forward`` reached through ten wrapper frames is ten breaks, and frames it gave up
    on repeat it again; a cause is that one line of code. Each cause counts its breaks
    and eager frames, joins their modules, and keeps the deepest stack, shortened.
    Most frequent first.
    """
    causes: dict[tuple[str, str], dict[str, Any]] = {}
    deepest: dict[tuple[str, str], list[Frame]] = {}
    for kind, events, offset in (("graph_breaks", breaks, 0), ("skipped_frames", skipped, len(breaks))):
        for i, event in enumerate(events):
            key = (event["location"], event["reason"])
            cause = causes.setdefault(key, {
                "location": event["location"], "reason": event["reason"], "function": event["function"],
                "module": [], "in_leaf": True, "breaks": 0, "eager_frames": 0, "eager_functions": [],
                "graph_breaks": [], "skipped_frames": [],
            })
            cause["breaks" if kind == "graph_breaks" else "eager_frames"] += 1
            cause[kind].append(i)
            cause["in_leaf"] = cause["in_leaf"] and event["in_leaf"]
            cause["module"] = sorted(set(cause["module"]) | set(event["module"]), key=index.order.__getitem__)
            if kind == "skipped_frames" and event["function"] not in cause["eager_functions"]:
                cause["eager_functions"].append(event["function"])
            frames = stacks[offset + i]
            if len(frames) > len(deepest.get(key, ())):
                deepest[key] = frames
    for key, cause in causes.items():
        frames = deepest.get(key, [])
        if cause["breaks"] == 0 and frames:  # name the code the frame stopped in, not the frame
            cause["function"] = index.forward_owner(frames[-1]) or cause["function"]
        cause["stack"], cause["folded_frames"] = short_stack(index, frames)
    return sorted(causes.values(), key=lambda c: -(c["breaks"] + c["eager_frames"]))


# --------------------------------------------------------------------------- suggestions


@functools.lru_cache(maxsize=1)
def deepspeed_default_leaf_classes() -> tuple[str, ...]:
    """The classes DeepSpeed flags when ``zero_optimization.leaf_module.classes`` is not
    given, as the installed DeepSpeed lists them (``DEFAULT_LEAF_MODULE_CLASSES`` of
    ``deepspeed/runtime/zero/leaf_module_config.py``); without DeepSpeed, leafpass's copy."""
    try:
        from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES
    except Exception:  # not installed, or it fails to import here: the copy is the same list
        return tuple(leafpass.DEFAULT_LEAF_MODULE_CLASSES)
    return tuple(DEFAULT_LEAF_MODULE_CLASSES)


def is_default_leaf_class(cls: type, defaults: Iterable[str]) -> bool:
    """``cls`` is one of ``defaults`` by qualified name, or by class name (a copy of the
    class, as remote-code models ship, still matches)."""
    defaults = tuple(defaults)
    return _qualname(cls) in defaults or cls.__name__ in {d.rsplit(".", 1)[-1] for d in defaults}


def suggest_leaves(index: ModuleIndex, breaks, skipped, recompiles, flagged: list[str],
                   default_classes: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Modules to flag so that the observed breaks go, as groups of one class; best first.

    For each graph break and skipped frame, the module that holds it is the innermost
    module of the model (with a ``forward`` of its own, not the root, not a flagged leaf
    or inside one) whose code it is in. The recommended module is its nearest enclosing
    module (itself included) of one of DeepSpeed's default leaf classes (``default_classes``,
    e.g. ``Qwen3MoeSparseMoeBlock`` around ``Qwen3MoeExperts``), else the holder itself:
    the smallest opaque piece that swallows the break, so the least is gathered at once
    and the most stays compiled. A recommended module inside another one is dropped (the
    outer one is opaque already).

    Besides the recommended groups (``recommended``), the list holds the alternatives a
    user may weigh: the holders when a default class was preferred, and the module
    enclosing each recommended one (a decoder layer around its MoE block), which gathers
    more at once and keeps more out of the compiled graph. ``breaks`` counts the graph
    breaks and skipped frames in a group's modules, ``recompiles`` the recompiled frames;
    ``params``, ``numel`` and ``bytes`` are those of its largest module: what one opaque
    call gathers at once.
    """
    defaults = tuple(default_classes)
    events = breaks + skipped

    def eligible(name: str) -> bool:
        return (name != "" and index.callable_module(name)
                and not any(index.is_under(name, f) for f in flagged))

    def parent(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    def ancestors(name: str):  # name itself first, the root excluded
        while name:
            yield name
            name = parent(name)

    def holder(name: str) -> str | None:
        return next((a for a in ancestors(name) if eligible(a)), None)

    def is_default(name: str) -> bool:
        return is_default_leaf_class(type(index.by_name[name]), defaults)

    holders, picks = set(), set()
    for event in events:
        if event["in_leaf"]:
            continue
        for module in event["module"]:
            inner = holder(module)
            if inner is None:
                continue
            holders.add(inner)
            picks.add(next((a for a in ancestors(inner) if eligible(a) and is_default(a)), inner))
    picks = {n for n in picks if not any(o != n and index.is_under(n, o) for o in picks)}
    enclosing = {holder(parent(n)) for n in picks} - {None}

    def events_in(names: list[str], items: list[dict[str, Any]]) -> int:
        return sum(1 for e in items if not e.get("in_leaf")
                   and any(index.is_under(m, n) for m in e["module"] for n in names))

    def by_class(names: Iterable[str]) -> list[list[str]]:
        groups: dict[type, list[str]] = {}
        for name in sorted(names, key=index.order.__getitem__):
            groups.setdefault(type(index.by_name[name]), []).append(name)
        return list(groups.values())

    def entry(names: list[str], why: str, recommended: bool) -> dict[str, Any]:
        cls = type(index.by_name[names[0]])
        tensors, elements, nbytes = max((_param_stats(index.by_name[n]) for n in names), key=lambda t: (t[2], t[0]))
        return {
            "class": cls.__name__,
            "qualified_class": _qualname(cls),
            "names": names,
            "deepspeed_default": is_default(names[0]),
            "why": why,
            "breaks": events_in(names, events),
            "recompiles": events_in(names, recompiles),
            "params": tensors,
            "numel": elements,
            "bytes": nbytes,
            "recommended": recommended,
            "after": None,
        }

    chosen = [entry(g, "DeepSpeed default leaf class" if is_default(g[0]) else "innermost module holding the breaks",
                    True) for g in by_class(picks)]
    chosen.sort(key=lambda e: (not e["deepspeed_default"], -e["breaks"], -min(index.depth(n) for n in e["names"])))
    others = [entry(g, "innermost module holding the breaks", False) for g in by_class(holders - picks)]
    others += [entry(g, "encloses a recommended module", False) for g in by_class(enclosing - picks - holders)]
    others.sort(key=lambda e: (-e["breaks"], e["bytes"]))
    return chosen + others


def apply_hint(model: nn.Module, names: list[str]) -> str | None:
    """The leafpass call that flags ``names``: by class when they are every unflagged module of their classes."""
    if not names:
        return None
    by_name = dict(model.named_modules())
    classes = sorted({type(by_name[n]).__name__ for n in names})
    instances = sorted(n for n, m in by_name.items()
                       if type(m).__name__ in classes and not leafpass.z3_leaf_module(m))
    if instances == sorted(names):
        return f"leafpass.set_z3_leaf_modules(model, {classes!r})"
    return f"leafpass.set_z3_leaf_modules_by_name(model, {names!r})"


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
    breaks, skipped, recompiles, stacks = _events(index, run, flagged)
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
        "break_causes": group_causes(index, breaks, skipped, stacks),
        "recompiles": recompiles,
        "prefetches": [p for g in details for p in g["prefetches"]],
    }
    if suggest:
        suggestions = suggest_leaves(index, breaks, skipped, recompiles, flagged, deepspeed_default_leaf_classes())
        for item in suggestions:
            item["apply"] = apply_hint(model, item["names"])
        report["suggested_leaves"] = suggestions
        report["suggestion_check"] = _check(pristine, inputs, inner, no_grad, suggestions, report)
        report["suggestion_check"]["apply"] = apply_hint(model, report["suggestion_check"]["flagged"])
    return report


def first_line_of_error(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line`` of the error that says what went wrong, one line.

    Dynamo wraps what a backend or a leaf raised (``TorchRuntimeError``,
    ``BackendCompilerFailed``, ``InternalTorchDynamoError``) in messages that carry the
    whole user stack. Of the chain of causes, a leafpass error is taken (its message
    names the leaf and the fix), else the innermost cause.
    """
    chain = [exc]
    while len(chain) < 50:
        last = chain[-1]
        nxt = last.__cause__ if last.__cause__ is not None else last.__context__  # Dynamo raises `from None`
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    ours = [e for e in chain if type(e).__module__.split(".")[0] == "leafpass"]
    exc = ours[0] if ours else chain[-1]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check(pristine, inputs, inner, no_grad, suggestions, report) -> dict[str, Any]:
    """Flag the recommended groups on a copy of the model one after the other, compile and
    run after each, and count what is left: each group's ``after`` is what flagging it (and
    the groups before it) bought."""
    groups = [s for s in suggestions if s["recommended"]]
    names = [n for g in groups for n in g["names"]]
    check: dict[str, Any] = {"flagged": names}
    if not names:
        check["status"] = "nothing to check"
        return check
    if pristine is None:
        check["status"] = "skipped (--no-verify)"
        return check
    if isinstance(pristine, BaseException):
        check["status"] = f"skipped: the model cannot be deep-copied ({first_line_of_error(pristine, 200)})"
        return check
    check.update({
        "graphs_before": report["graphs"],
        "breaks_before": len(report["graph_breaks"]) + len(report["skipped_frames"]),
        "recompiles_before": len(report["recompiles"]),
    })
    for group in groups:
        leafpass.set_z3_leaf_modules_by_name(pristine, group["names"])
        run = compile_and_run(pristine, inputs, inner, no_grad)
        torch._dynamo.reset()
        if run.error is not None:
            check.update({"status": "failed", "failed_class": group["class"], "error": first_line_of_error(run.error)})
            return check
        group["after"] = {"graphs": len(run.graphs), "breaks": len(run.breaks) + len(run.skipped),
                          "recompiles": len(run.recompiles)}
        check.update({"graphs_after": group["after"]["graphs"], "breaks_after": group["after"]["breaks"],
                      "recompiles_after": group["after"]["recompiles"]})
    check["status"] = "checked"
    return check
