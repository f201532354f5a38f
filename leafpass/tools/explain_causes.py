"""Graph breaks and skipped frames grouped by cause (the report's ``break_causes``), each
with one short stack."""

from __future__ import annotations

import os
from typing import Any

from .explain_frames import Frame, display_path, is_library_file
from .explain_modules import ModuleIndex

__all__ = ["group_causes", "short_stack"]


def short_stack(index: ModuleIndex, frames: list[Frame]) -> tuple[list[str], int]:
    """The frames worth reading, outermost first, and how many were folded away.

    Kept: the user's own code, the ``forward`` of a module of the model (named
    ``Class.forward``) and the innermost frame, where the break is. Folded: every
    other frame of a library (decorators, wrappers, helpers of transformers or torch).
    """
    kept, folded = [], 0  # file:line in Class.forward (the full paths are in each break's user_stack)
    for i, frame in enumerate(frames):
        built = index.constructed_class(frame)
        owner = index.forward_owner(frame) or (f"{built}.{frame.name}" if built else None)
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
                "module": [], "in_leaf": True, "constructing": None, "breaks": 0, "eager_frames": 0, "eager_functions": [],
                "graph_breaks": [], "skipped_frames": [],
            })
            cause["breaks" if kind == "graph_breaks" else "eager_frames"] += 1
            cause[kind].append(i)
            cause["in_leaf"] = cause["in_leaf"] and event["in_leaf"]
            cause["constructing"] = cause["constructing"] or event["constructing"]
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
