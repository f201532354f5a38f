"""Walking from a function to the functions it wraps.

Decorators and hook wrappers hide the function that does the work: ``functools.wraps``
keeps it as ``__wrapped__``, a bound method as ``__func__``, a closure in a cell. leafpass
looks through them twice: to find DeepSpeed's hook function behind a module's hooks
(``runtime/deepspeed.py``), and to tell whether a replaced ``nn.Module.__call__`` still
calls leafpass's wrapper (``capture.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

__all__ = ["wrapped_functions"]


def wrapped_functions(fn: Callable, depth: int = 3) -> Iterator[Callable]:
    """``fn`` and every callable it wraps, breadth first, at most ``depth`` levels down."""
    seen: set[int] = set()
    frontier = [fn]
    for _ in range(depth + 1):
        found = []
        for f in frontier:
            if id(f) in seen:
                continue
            seen.add(id(f))
            yield f
            found.extend(x for x in (getattr(f, "__wrapped__", None), getattr(f, "__func__", None)) if x is not None)
            for cell in getattr(f, "__closure__", None) or ():
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if callable(content):
                    found.append(content)
        frontier = found
