"""The ``gather="module"`` plan: what compiling a frame needs from the call that runs it.

An engine's gatherer makes a :class:`ModulePlan` per call (which parameters the graph
gathers, bucket size, prefetch distance, how to make a bucket) and sets it for the thread
while the compiled frame is entered; the backend reads it with :func:`current_plan` and
runs the in-graph gather passes when there is one. Neither imports the other: both import
this module::

    gatherer.call(...)  -> set_plan(plan) -> compiled frame -> backend: current_plan() -> passes
"""

from __future__ import annotations

import dataclasses
import threading

from torch import nn

__all__ = ["ModulePlan", "current_plan", "set_plan"]


@dataclasses.dataclass
class ModulePlan:
    """What compiling a frame under ``gather="module"`` needs from the call that runs it."""

    root: nn.Module | None  # the model (plans made by hand); None from the gatherer, which must not hold it
    gather_ids: set[int]  # id() of the parameters the ops gather (stand-ins during the call)
    bucket_elements: int
    prefetch_distance: int
    counter: object  # callable(numel): counts elements gathered
    # callable(param) -> bool: does it hold a stand-in now (checked after the passes:
    # leafpass.passes.check_stand_ins); None: judged by its strides
    is_stand_in: object = None
    param_names: dict | None = None  # id(parameter) -> qualified name, for messages

    def make_bucket(self, params: list[nn.Parameter], names: list[str]):
        """One bucket gathering ``params`` (named ``names``) in one collective: an object with
        ``numel``, ``names``, ``params()``, ``start() -> (buffer, handle)``,
        ``finish(buffer, handle) -> [whole tensors]`` and ``counted(numel)``."""
        raise NotImplementedError(f"{type(self).__name__} must define make_bucket(params, names)")


_local = threading.local()


def set_plan(plan: ModulePlan | None) -> ModulePlan | None:
    """Make ``plan`` the one compiles in this thread see; returns the one it replaces."""
    previous = getattr(_local, "plan", None)
    _local.plan = plan
    return previous


def current_plan() -> ModulePlan | None:
    return getattr(_local, "plan", None)
