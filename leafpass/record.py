"""``record_graphs``: keep every graph the z3leaf backend produces, for tests and tools."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.fx

__all__ = ["GraphRecorder", "record_graphs", "notify_graph"]

_recorders: list["GraphRecorder"] = []


class GraphRecorder:
    """Collects graphs in ``.graphs``: GraphModules after leafpass's passes, before lowering."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __len__(self) -> int:
        return len(self.graphs)


@contextlib.contextmanager
def record_graphs() -> Iterator[GraphRecorder]:
    """Inside the ``with`` block, every graph the backend produces is appended to ``.graphs``."""
    recorder = GraphRecorder()
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


def notify_graph(gm: torch.fx.GraphModule) -> None:
    for recorder in _recorders:
        recorder.graphs.append(gm)
