"""A runtime that records every ``prefetch_all`` call, for tests (yours and ours)."""

from __future__ import annotations

import torch
from torch import nn


class RecordingRuntime:
    """Records ``(leaf class name, number of params, ids of params)`` per prefetch call.

    Use it with ``leafpass.use_runtime(RecordingRuntime())`` to check that every leaf
    call is preceded by exactly one prefetch of all of its parameters.
    """

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, list[nn.Parameter]]] = []

    def prefetch_all(self, leaf: nn.Module, params: list[nn.Parameter]) -> None:
        self.calls.append((leaf, list(params)))

    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        return param.shape

    def leaves(self) -> list[nn.Module]:
        return [leaf for leaf, _ in self.calls]

    def clear(self) -> None:
        self.calls.clear()
