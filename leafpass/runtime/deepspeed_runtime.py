"""The DeepSpeed ZeRO-3 runtime: gather a leaf's partitioned parameters in one collective.

The compiled program calls ``prefetch_all(leaf, params)`` right before each leaf module's
call; the leaf then runs eagerly through ``leaf(*args)``, so DeepSpeed's own hooks on it
still run. :meth:`DeepSpeedRuntime.prefetch_all` issues the gather the way DeepSpeed's
parameter coordinator would issue it at the leaf's entry: through the coordinator that
owns the leaf, as ONE coalesced all-gather of every partitioned parameter of the leaf's
subtree, counted in the coordinator's live-parameter total and registered as in flight;
it then waits for it, so the parameters are AVAILABLE when the leaf is called.
DeepSpeed's pre-forward hook on the leaf then finds nothing to fetch (no second
all-gather), marks the parameters as used by the leaf and keeps its trace bookkeeping as
usual, and its post-forward hook releases them exactly as in eager ZeRO-3. Backward is
untouched: DeepSpeed's pre-backward hook re-gathers the leaf if it was released.

The DeepSpeed internals it uses live in :mod:`leafpass.runtime.deepspeed`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..flags import z3_leaf_module  # DeepSpeed reads the same flag: module._z3_leaf
from .deepspeed import (
    _offload_for,
    _with_external,
    check_deepspeed_version,
    dedupe_params,
    in_flight,
    not_available,
    partitioned,
    start_gather,
    wait_gathered,
)

__all__ = ["DeepSpeedRuntime", "deepspeed_runtime"]


class DeepSpeedRuntime:
    """Gathers a ZeRO-3 leaf's parameters in one coalesced all-gather before its call.

    The leaf should be flagged (``_z3_leaf``) before ``deepspeed.initialize``, as DeepSpeed
    itself requires: DeepSpeed reads the flag when it installs its hooks. A module
    DeepSpeed does not treat as a leaf still works (its submodules' hooks find their
    parameters gathered and release them after their own calls), but DeepSpeed will then
    fetch per submodule in backward.
    """

    name = "deepspeed"

    def __init__(self) -> None:
        self.version = check_deepspeed_version()
        # parameters whose gather prefetch_start issued and no prefetch_all has waited for
        self._started = WeakIdKeyDictionary()

    def logical_shape(self, param: torch.Tensor) -> torch.Size:
        # deepspeed/runtime/zero/partition_parameters.py: a ZeRO-3 parameter keeps its full
        # shape in ds_shape while its data is an empty placeholder.
        ds_shape = getattr(param, "ds_shape", None)
        return torch.Size(ds_shape) if ds_shape is not None else param.shape

    def qualname(self, module: nn.Module) -> str | None:
        """``module``'s name in the model DeepSpeed wraps (its ``named_modules()`` spelling).

        Relies on deepspeed/runtime/zero/parameter_offload.py (0.19.x): the offload object
        found through the module's forward pre-hook keeps the wrapped model as ``.module``.
        """
        owner = _offload_for(module)
        root = getattr(owner, "module", None)
        if root is None:
            return None
        names = _names_by_root.get(root)
        if names is None:
            names = _names_by_root[root] = {id(m): n for n, m in root.named_modules()}
        return names.get(id(module))

    @torch.no_grad()
    def prefetch_all(self, leaf: nn.Module, params: list[nn.Parameter]) -> None:
        """Gather every partitioned ZeRO-3 parameter of ``leaf`` in one coalesced all-gather.

        ``params`` is every parameter of the leaf's subtree; the parameters DeepSpeed
        attaches to the leaf as external ones are added, so that DeepSpeed's pre-forward
        hook has nothing left to fetch. Parameters already AVAILABLE or in flight (DeepSpeed's
        trace-based prefetch may have started them) are not gathered again; DeepSpeed's hook
        waits for those in flight. Returns once the gathered parameters are AVAILABLE.

        "One" is DeepSpeed's own unit: ``all_gather_coalesced`` issues one flat all-gather
        per communication dtype and partition group (and per hpZ secondary-tensor group),
        so one for a leaf whose parameters share a dtype, as in eager ZeRO-3.
        """
        ours = _partitioned_with_external(leaf, params)
        missing = not_available(ours)
        started = [p for p in in_flight(ours) if p in self._started]
        if not missing and not started:
            return
        owner = self._owner(leaf)
        start_gather(owner, missing)
        for p in started:
            del self._started[p]
        wait_gathered(owner, missing + started, fast_fetch=z3_leaf_module(leaf), what=type(leaf).__name__)

    @torch.no_grad()
    def prefetch_start(self, leaf: nn.Module, params: list[nn.Parameter]) -> None:
        """Issue (not wait for) the gather ``prefetch_all`` would issue for ``leaf``; the
        leaf's ``prefetch_all`` waits for it (``gather="module"``'s prefetch distance)."""
        missing = not_available(_partitioned_with_external(leaf, params))
        if missing:
            start_gather(self._owner(leaf), missing)
            self._started.update(dict.fromkeys(missing))

    def _owner(self, leaf: nn.Module):
        owner = _offload_for(leaf)
        if owner is None:
            raise RuntimeError(
                f"leafpass: {type(leaf).__name__} holds partitioned ZeRO-3 parameters but carries no "
                "DeepSpeed forward hook, so nothing would release them after the call. Pass the "
                "model that contains it to deepspeed.initialize before compiling, and flag the leaf "
                "with deepspeed.utils.set_z3_leaf_modules before deepspeed.initialize."
            )
        return owner

    def __repr__(self) -> str:
        return f"DeepSpeedRuntime(deepspeed {self.version})"


def _partitioned_with_external(leaf: nn.Module, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The ZeRO-3 parameters among ``params`` and those DeepSpeed attached to ``leaf``, each once."""
    return dedupe_params(p for p in _with_external(leaf, params) if partitioned(p))


_names_by_root: "weakref.WeakKeyDictionary[nn.Module, dict[int, str]]" = weakref.WeakKeyDictionary()

_runtime: DeepSpeedRuntime | None = None
_runtime_lock = threading.Lock()


def deepspeed_runtime() -> DeepSpeedRuntime:
    """The process-wide :class:`DeepSpeedRuntime` (checks the DeepSpeed version on first use)."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = DeepSpeedRuntime()
    return _runtime
