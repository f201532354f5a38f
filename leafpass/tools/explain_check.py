"""``--suggest``'s check: flag the recommended leaves on a copy of the model, compile and run
again, and count what is left."""

from __future__ import annotations

from typing import Any

import torch
import torch._dynamo

import leafpass

from .explain_reasons import first_line_of_error, leaf_argument_error
from .explain_run import compile_and_run

__all__ = ["check_suggestions"]


def check_suggestions(pristine, inputs, inner, no_grad, suggestions, report) -> dict[str, Any]:
    """Flag the recommended groups on a copy of the model one after the other, compile and
    run after each, and count what is left: each group's ``after`` is what flagging it (and
    the groups before it) bought.

    The check fails (``status`` ``failed``, the group's ``failed_class`` and a one-line
    ``error``) when the model raises, or when a flagged leaf's call cannot be compiled: a
    ``LeafArgumentError`` (an argument leafpass cannot pass through the opaque call) makes
    Dynamo run the calling frame eagerly instead of raising (``ran_eagerly``)."""
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
            check.update({"status": "failed", "failed_class": group["class"], "error": first_line_of_error(run.error),
                          "ran_eagerly": False})
            return check
        reasons = [reason for reason, _ in run.breaks] + [record["reason"] for record in run.skipped]
        caught = next((e for e in map(leaf_argument_error, reasons) if e is not None), None)
        if caught is not None:
            check.update({"status": "failed", "failed_class": group["class"], "error": caught, "ran_eagerly": True})
            return check
        group["after"] = {"graphs": len(run.graphs), "breaks": len(run.breaks) + len(run.skipped),
                          "recompiles": len(run.recompiles)}
        check.update({"graphs_after": group["after"]["graphs"], "breaks_after": group["after"]["breaks"],
                      "recompiles_after": group["after"]["recompiles"]})
    check["status"] = "checked"
    return check
