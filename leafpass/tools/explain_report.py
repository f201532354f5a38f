"""The data behind ``python -m leafpass explain``: compile a model with z3leaf, run it
once and describe what happened, as one JSON-able dict (:func:`build_report`).

This is a thin layer over leafpass's public API (``make_backend``, ``record_graphs``,
``format_graph``, ``get_z3_leaf_modules``, ``set_z3_leaf_modules_by_name``,
``DEFAULT_LEAF_MODULE_CLASSES`` and the ``torch.ops.leafpass.prefetch_all`` op) plus
what Dynamo records about a compile. Each step has its own file:

==================== ==========================================================
``explain_run``       compile and run once, collect Dynamo's records
``explain_frames``    the user frames of a break's stack, paths to show them by
``explain_modules``   which modules of the model a stack is in
``explain_reasons``   one line for a break reason or an error
``explain_graphs``    leaves, graphs and prefetches, named as in the model
``explain_events``    breaks, skipped frames and recompiles placed in modules
``explain_causes``    the same grouped by cause, one short stack each
``explain_suggest``   ``--suggest``: modules to flag, and the call that flags them
``explain_check``     ``--suggest``'s check on a copy of the model
==================== ==========================================================
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import leafpass

from .explain_causes import group_causes
from .explain_check import check_suggestions
from .explain_events import place_events
from .explain_graphs import describe_inputs, graph_details, leaves_of, param_stats
from .explain_modules import ModuleIndex
from .explain_reasons import summarize_reason
from .explain_run import compile_and_run
from .explain_suggest import apply_hint, deepspeed_default_leaf_classes, suggest_leaves

__all__ = ["RunFailed", "build_report", "describe_inputs", "summarize_reason"]

REPORT_VERSION = 2  # 2: break_causes; suggested_leaves grouped by class


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
    breaks, skipped, recompiles, stacks = place_events(index, run, flagged)
    tensors, elements, nbytes = param_stats(model)
    details = graph_details(index, run.graphs, graphs_text)
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "target": target,
        "model": {"class": type(model).__name__, "params": tensors, "numel": elements, "bytes": nbytes},
        "inputs": describe_inputs(inputs),
        "backend": {"name": "z3leaf", "inner": inner, "fullgraph": False, "no_grad": no_grad},
        "torch": torch.__version__,
        "leafpass": leafpass.__version__,
        "leaves": leaves_of(index, run.graphs),
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
        report["suggestion_check"] = check_suggestions(pristine, inputs, inner, no_grad, suggestions, report)
        report["suggestion_check"]["apply"] = apply_hint(model, report["suggestion_check"]["flagged"])
    return report
