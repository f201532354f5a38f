"""The runtime for parameters that are already whole: prefetching is a no-op."""

from __future__ import annotations

import torch
from torch import nn


class NullRuntime:
    """Does nothing: used when a leaf's parameters are not partitioned by any engine."""

    name = "null"

    def prefetch_all(self, leaf: nn.Module, params: list[nn.Parameter]) -> None:
        return None

    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        return param.shape
