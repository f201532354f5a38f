"""Graph breaks, skipped frames and recompiles of one run, each placed in the model's modules
(the raw lists of the report: ``graph_breaks``, ``skipped_frames``, ``recompiles``)."""

from __future__ import annotations

from .explain_frames import Frame
from .explain_modules import ModuleIndex
from .explain_reasons import summarize_reason
from .explain_run import Run

__all__ = ["place_events"]


def _in_leaf(modules: list[str], flagged: list[str]) -> bool:
    return bool(modules) and all(any(ModuleIndex.is_under(m, f) for f in flagged) for m in modules)


def _function_name(index: ModuleIndex, modules: list[str], frame: Frame | None) -> str:
    if frame is None:
        return "?"
    built = index.constructed_class(frame)
    if built is not None:
        return f"{built}.{frame.name}"
    classes = {type(index.by_name[m]).__name__ for m in modules}
    if len(classes) == 1 and frame.name not in ("?", "") and not frame.name.startswith("torch_dynamo_resume"):
        cls = next(iter(classes))
        if index.covers(index.class_range(type(index.by_name[modules[0]])), frame):
            return f"{cls}.{frame.name}"
    return frame.name


def place_events(index: ModuleIndex, run: Run, flagged: list[str]):
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
            "constructing": index.constructing(frames),
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
            "constructing": index.constructing(frames),
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
