"""Where a graph break is: the frames of a Dynamo user stack, and paths to show them by.

Dynamo records each break's user stack (``GraphCompileReason.user_stack``, one
``FrameSummary`` per frame, outermost first). Every module call goes through
``nn.Module.__call__`` (wrapped by leafpass), ``_wrapped_call_impl`` and ``_call_impl``;
:func:`user_frames` drops those frames and marks the next one ``via_call``, so the
rest of explain sees the user's code only and knows which frames were entered as a
module call.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

import leafpass

__all__ = ["Frame", "display_path", "is_library_file", "norm_path", "user_frames"]


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
    return tuple(norm_path(r) + os.sep for r in roots if r)


def is_library_file(filename: str) -> bool:
    """Whether a frame of ``filename`` is library code rather than the user's own."""
    path = norm_path(filename)
    if os.sep + "site-packages" + os.sep in path or os.sep + "dist-packages" + os.sep in path:
        return True
    if path.startswith(norm_path(os.path.dirname(leafpass.__file__)) + os.sep + "testing" + os.sep):
        return False
    return path.startswith(_library_roots())


def norm_path(filename: str) -> str:
    """``filename`` resolved and case-normalised, to compare paths (empty stays empty)."""
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
            codes.add((norm_path(code.co_filename), code.co_name))
    return codes


def user_frames(stack: Iterable[Any]) -> list[Frame]:
    """The frames of a Dynamo user stack without the module-call plumbing, outermost first."""
    plumbing = _plumbing_codes()
    frames = []
    via_call = False
    for f in stack:
        filename, lineno, name = getattr(f, "filename", ""), getattr(f, "lineno", 0) or 0, getattr(f, "name", "?")
        if (norm_path(filename), name) in plumbing:
            via_call = True
            continue
        frames.append(Frame(filename, int(lineno), name, via_call))
        via_call = False
    return frames
