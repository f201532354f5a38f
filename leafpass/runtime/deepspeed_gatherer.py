"""Run the compiled call of a DeepSpeed ZeRO-3 model under a gather policy.

DeepSpeed gathers each module's parameters in hooks on that module. The hooks are
``torch.compiler.disable``d, so under ``torch.compile`` every hooked module is a graph
break. With ``gather="step"`` leafpass takes that job for every module outside the
leaves, at the root, around the compiled call::

    model(x)                             capture wrapper, eager, before Dynamo's frame
      reset_step()                       what DeepSpeed's start-of-forward hook does
      gather every parameter             ONE coalesced all-gather (per dtype/group),
                                         the leaves' parameters included
      DeepSpeed hooks of non-leaf        taken out of their modules' hook dicts
        modules off                      for the duration of the call
      compiled frame                     Dynamo sees plain modules with whole params:
        [non-leaf ops]                   one graph, zero breaks, and guards that see
        prefetch_all moe, moe(...)       the same full shapes every step; leaves still
        [non-leaf ops]                   run with their DeepSpeed hooks; prefetch_all
                                         finds their parameters gathered
      hooks back on
    loss.backward()                      DeepSpeed's per-parameter gradient hooks reduce
      end of backward: release           the gradients the compiled backward produces;
                                         then leafpass partitions the params again

Leaves stay DeepSpeed's in every other respect: under strict limits DeepSpeed's hooks
release a leaf after its forward and gather it again for its backward, as in eager
ZeRO-3. Parameters are gathered fresh at every call: DeepSpeed's optimizer step
partitions every parameter (``partition_all_parameters``) before it updates them, so
nothing gathered can go stale. A forward with no backward (no grad, or outputs that need
none) releases at once.

With ``gather="module"`` the call is prepared differently; the graph gathers for itself::

    model(x)
      reset_step(); release whatever      every step enters the frame in the same state
        DeepSpeed kept gathered
      stand-ins into non-leaf params      full shape, zero strides, one element each:
                                          guards see the same shapes every step
      torch's linear for compiled code    DeepSpeed's replacement gathers in its backward;
                                          leaves (run eagerly) keep DeepSpeed's
      DeepSpeed hooks of non-leaf
        modules off
      compiled frame                      gather_start/gather_wait per bucket, each weight
                                          freed after its last use (leafpass.gather_ops)
      hooks back on
    loss.backward()                       the partitioner gathers again what backward
                                          needs; full gradients reach each parameter's
                                          AccumulateGrad, DeepSpeed's hook reduces them
      end of backward                     the parameters' own (empty) data back in place

``auto`` picks ``step`` when the whole model fits under ``stage3_max_live_parameters``,
the cap DeepSpeed itself would keep; otherwise ``module``, with buckets of
``stage3_prefetch_bucket_size`` elements. ``hooks`` leaves the call to DeepSpeed's hooks.

Only public DeepSpeed attributes are read here; the private ones are reached through
:mod:`leafpass.runtime.deepspeed`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .. import dynamo_internals as internals
from ..gather import check_gather
from ..gather_ops import live_gathered
from ..schedule_check import check_same_gather
from . import deepspeed as ds
from . import leaf_environment
from .deepspeed_module import ModulePlan, StandIns, set_plan

__all__ = ["DeepSpeedGatherer", "StepStats"]

log = logging.getLogger("leafpass.gather")


class StepStats:
    """What the step gatherer did: per call, and the largest amount gathered at once."""

    def __init__(self) -> None:
        self.policy: str | None = None  # the policy the last call resolved to
        self.calls = 0
        self.gathered_elements = 0  # by the last call
        self.peak_gathered_elements = 0
        self.releases = 0

    def __repr__(self) -> str:
        return (f"StepStats(policy={self.policy!r}, calls={self.calls}, gathered_elements="
                f"{self.gathered_elements}, peak_gathered_elements={self.peak_gathered_elements}, "
                f"releases={self.releases})")


def _leaf(module: nn.Module) -> bool:
    return bool(getattr(module, "_z3_leaf", False))


def _outside_leaves(root: nn.Module) -> list[nn.Module]:
    """``root`` and every module not inside a flagged leaf's subtree (leaves excluded)."""
    found, stack = [], [root]
    while stack:
        module = stack.pop()
        if module is not root and _leaf(module):
            continue
        found.append(module)
        stack.extend(reversed(list(module.children())))
    return found


class DeepSpeedGatherer:
    """Runs the compiled call of a DeepSpeed ZeRO-3 root module under a gather policy."""

    def __init__(self, root: nn.Module, owner) -> None:
        self._root = weakref.ref(root)
        self._owner = owner
        self._slots = ds.hook_slots(owner)
        self._checked = False
        # what the last call left to undo after backward: ("step", params) or ("module", None)
        self._pending: tuple[str, list[nn.Parameter] | None] | None = None
        # the model's size does not change after deepspeed.initialize: what "auto" compares
        self._total_elements = sum(int(getattr(p, "ds_numel", p.numel())) for p in root.parameters())
        self._stand_ins = StandIns()
        self._plans: dict[tuple[int, int], ModulePlan] = {}
        # what a "module" call runs inside, undone when it returns (see _module_call_environment)
        self._call_environment: contextlib.ExitStack | None = None
        self.stats = StepStats()

    @classmethod
    def for_root(cls, module: nn.Module) -> "DeepSpeedGatherer | None":
        owner = ds.root_offload(module)
        return cls(module, owner) if owner is not None else None

    # ---------------------------------------------------------------- policy

    def resolve(self, options: dict) -> str:
        """The policy a call with z3leaf ``options`` runs under (``auto`` decided)."""
        policy = check_gather(options.get("gather", "auto"))
        if policy != "auto":
            return policy
        root = self._root()
        total = self._total_elements
        cap = ds.max_live_parameters(self._owner)
        chosen = "step" if total <= cap else "module"
        if chosen != self.stats.policy:
            log.info("leafpass: gather='auto' chose %r for %s (%d parameter elements, "
                     "stage3_max_live_parameters=%d)", chosen, type(root).__name__, total, cap)
        return chosen

    def module_settings(self, options: dict) -> tuple[int, int]:
        """``(bucket_elements, prefetch_distance)`` for ``gather="module"``: the options if
        given, else from the engine's config (``stage3_prefetch_bucket_size``; prefetch one
        bucket ahead unless that bucket is 0, as DeepSpeed then prefetches nothing)."""
        bucket = options.get("bucket_elements")
        distance = options.get("prefetch_distance")
        config_bucket = ds.prefetch_bucket_size(self._owner)
        if bucket is None:
            bucket = config_bucket
        if distance is None:
            distance = 1 if config_bucket > 0 else 0
        return int(bucket), int(distance)

    # ---------------------------------------------------------------- the call

    def call(self, root: nn.Module, args: tuple, kwargs: dict, options: dict, original_call: Callable):
        """Run ``original_call(root, *args, **kwargs)`` (which enters the compiled frame)
        under the gather policy of z3leaf ``options``.

        This frame is never compiled by Dynamo (it may run inside a compile region, before
        the compiled frame is entered); everything it does besides that call happens in
        Dynamo-disabled methods.
        """
        hooks_off = self._before(root, options)
        if hooks_off is None:  # policy "hooks": DeepSpeed's hooks do the gathering
            return original_call(root, *args, **kwargs)
        try:
            out = original_call(root, *args, **kwargs)
        except BaseException:
            self._after(hooks_off, None, failed=True)
            raise
        self._after(hooks_off, out, failed=False)
        return out

    @torch._dynamo.disable
    def _before(self, root: nn.Module, options: dict) -> "_HooksTakenOut | None":
        chosen = self.resolve(options)
        self.stats.policy = chosen
        if chosen == "hooks":
            return None
        modules = _outside_leaves(root)
        params = ds.dedupe_params(
            p for m in root.modules() for p in (*m.parameters(recurse=False), *ds.external_parameters(m))
            if ds.partitioned(p)
        )
        if self._pending is not None:  # the previous step's forward had no backward
            self._release()
        ds.start_of_forward(self._owner)
        outside = {id(p) for m in modules for p in m.parameters(recurse=False)}
        if not self._checked:
            self._checked = True
            check_same_gather([(int(p.ds_id), int(p.ds_numel), id(p) not in outside) for p in params])
        self.stats.calls += 1
        if chosen == "step":
            self._gather_step(root, params)
        else:
            self._prepare_module(params, outside, options)
        hooks_off = _HooksTakenOut(self._slots, modules, root)
        hooks_off.take_out()
        return hooks_off

    def _gather_step(self, root: nn.Module, params: list[nn.Parameter]) -> None:
        # Every parameter, the leaves' too: one collective for the whole step, as eager ZeRO-3
        # with a complete trace prefetches a model that fits its limits; each leaf's
        # prefetch_all then finds its parameters gathered.
        missing = ds.not_available(params)
        ds.gather_and_wait(self._owner, missing, what=f"{type(root).__name__} (the whole model)")
        gathered = sum(int(p.ds_numel) for p in params)
        self.stats.gathered_elements = gathered
        self.stats.peak_gathered_elements = max(self.stats.peak_gathered_elements, gathered)
        self._pending = ("step", params)

    def _prepare_module(self, params: list[nn.Parameter], outside: set[int], options: dict) -> None:
        # The same state at every frame entry, whatever DeepSpeed kept from the last step:
        # everything partitioned (persistent parameters excepted) ...
        ds.release(self._owner, params)
        # ... but persistent parameters whole, the leaves' too, as DeepSpeed keeps them once
        # it has gathered them (before their first use they are partitioned: the first call
        # would see other shapes than the next ones, and the graph uses them as they are)
        persistent = ds.not_available([p for p in params if ds.persistent(p)])
        ds.gather_and_wait(self._owner, persistent, what="the persistent parameters")
        # ... and the parameters the graph gathers itself hold stand-ins
        gathered = [p for p in params if id(p) in outside and not ds.persistent(p)]
        self._stand_ins.put_in(gathered)
        self.stats.gathered_elements = 0
        self._pending = ("module", None)
        self._call_environment = _module_call_environment(self._plan(gathered, options))

    def _plan(self, gathered: list[nn.Parameter], options: dict) -> ModulePlan:
        bucket, distance = self.module_settings(options)
        plan = self._plans.get((bucket, distance))
        if plan is None:
            plan = self._plans[(bucket, distance)] = ModulePlan(
                root=self._root(), gather_ids={id(p) for p in gathered},
                bucket_elements=bucket, prefetch_distance=distance, counter=self._count_gathered,
            )
        return plan

    def _count_gathered(self, numel: int) -> None:
        self.stats.gathered_elements += numel
        self.stats.peak_gathered_elements = max(self.stats.peak_gathered_elements, live_gathered.live)

    @torch._dynamo.disable
    def _after(self, hooks_off: "_HooksTakenOut", out, failed: bool) -> None:
        hooks_off.put_back()
        if self._call_environment is not None:
            self._call_environment.close()
            self._call_environment = None
        if failed:
            self._release()
            return
        needs_grad = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not needs_grad:
            self._release()
        else:
            _release_after_backward(needs_grad, self._release_once_for(self._pending))

    def _release_once_for(self, pending) -> Callable[[], None]:
        """A release for what the call that left ``pending`` holds only: once it (or the
        next call) has released it, ``_pending`` is no longer ``pending``: nothing to do."""

        def release() -> None:
            if self._pending is pending:
                self._release()

        return release

    def _release(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        kind, params = pending
        if kind == "step" and params:
            ds.release(self._owner, params)
        elif kind == "module":
            self._stand_ins.take_out()
        self.stats.releases += 1


def _module_call_environment(plan: ModulePlan) -> contextlib.ExitStack:
    """Enter what the compiled call runs inside under ``gather="module"``; closing the
    returned stack undoes it:

    * ``plan``, which the compiles of this call read;
    * torch's ``linear`` for the compiled code: DeepSpeed's replacement gathers the weight
      in its backward (Dynamo breaks the graph there); leaves, run eagerly, keep DeepSpeed's.
    """
    environment = contextlib.ExitStack()
    environment.callback(set_plan, set_plan(plan))
    swap = ds.plain_linear_swap()
    if swap is not None:
        deepspeed_linear, torch_linear = swap
        torch.nn.functional.linear = torch_linear
        environment.callback(setattr, torch.nn.functional, "linear", deepspeed_linear)
        environment.enter_context(leaf_environment(lambda: _linear_set(deepspeed_linear, torch_linear)))
    return environment


@contextlib.contextmanager
def _linear_set(during: Callable, after: Callable):
    torch.nn.functional.linear = during
    try:
        yield
    finally:
        torch.nn.functional.linear = after


class _HooksTakenOut:
    """Takes DeepSpeed's module hooks off ``modules`` (not off leaves) and puts them back,
    in order.

    The root's other hooks (the engine's forward prologue and epilogue, users' hooks) stay,
    but run with Dynamo disabled: under ``torch.compile(model)`` they are called from
    ``nn.Module._call_impl`` inside the compile region, where Dynamo would try to compile
    each of them as a frame (and, with ``fullgraph=True``, fail on their timers).
    """

    def __init__(self, slots: list[tuple[dict, int]], modules: list[nn.Module], root: nn.Module) -> None:
        dicts = {id(d) for m in modules for d in (m._forward_pre_hooks, m._forward_hooks)}
        self._by_dict: dict[int, tuple[dict, list[int]]] = {}
        for hooks, key in slots:
            if id(hooks) in dicts:
                self._by_dict.setdefault(id(hooks), (hooks, []))[1].append(key)
        for hooks in (root._forward_pre_hooks, root._forward_hooks):
            self._by_dict.setdefault(id(hooks), (hooks, []))
        self._root_dicts = {id(root._forward_pre_hooks), id(root._forward_hooks)}
        self._saved: list[tuple[dict, list]] = []

    def take_out(self) -> None:
        for hooks, keys in self._by_dict.values():
            self._saved.append((hooks, list(hooks.items())))
            for key in keys:
                hooks.pop(key, None)
            if id(hooks) in self._root_dicts:
                for key, fn in list(hooks.items()):
                    hooks[key] = _dynamo_disabled(fn)

    def put_back(self) -> None:
        for hooks, items in self._saved:
            hooks.clear()
            hooks.update(items)
        self._saved.clear()


_disabled_hooks: dict[int, tuple[Callable, Callable]] = {}


def _dynamo_disabled(fn: Callable) -> Callable:
    cached = _disabled_hooks.get(id(fn))
    if cached is None or cached[0] is not fn:
        cached = _disabled_hooks[id(fn)] = (fn, torch._dynamo.disable(fn))
    return cached[1]


def _release_after_backward(tensors: list[torch.Tensor], release: Callable[[], None]) -> None:
    """Call ``release()`` when the first backward through any of ``tensors`` has finished."""

    def on_grad(grad):
        internals.queue_end_of_backward_callback(release)
        return grad

    for t in tensors:
        t.register_hook(on_grad)


# The gatherer's call runs where Dynamo's callback may be active; Dynamo must not try to
# compile it as a frame of its own (it calls the compiled frame).
internals.never_compile_as_frame(DeepSpeedGatherer.call.__code__)
