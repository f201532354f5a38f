"""One compile: compile a model with z3leaf (not fullgraph), run it once, and collect what
Dynamo recorded about it.

* graph breaks: ``torch._dynamo.utils.graph_break_reasons``, the list Dynamo fills with
  one ``GraphCompileReason(reason, user_stack)`` per graph break and that
  ``torch._dynamo.explain`` reads too (``torch._dynamo.reset()`` clears it);
* frames Dynamo gave up on (the frame falls back to eager, e.g. "graph break in loop")
  and recompiles: ``torch._dynamo.utils.get_compilation_metrics()``, one record per
  frame compile with ``fail_type``/``fail_reason``/``fail_user_frame_*`` and
  ``recompile_reason``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.utils
from torch import nn

import leafpass

from .explain_frames import Frame, user_frames

__all__ = ["Run", "call_model", "compile_and_run"]


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
