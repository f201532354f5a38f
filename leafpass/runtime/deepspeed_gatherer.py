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

Before either, every call checks that DeepSpeed's hooks treat each flagged leaf as one
(:meth:`DeepSpeedGatherer._check_leaves`): a root flagged by
``stage3_module_granularity_threshold`` and a leaf with submodules flagged after
``deepspeed.initialize`` are refused with a clear error, before any collective.

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
from ..options import check_gather
from ..flags import z3_leaf_module
from ..gather_ops import live_gathered
from ..schedule_check import check_same_gather, check_same_leaves
from . import deepspeed as ds
from . import deepspeed_grad_path as grad_path
from . import deepspeed_step_gather as step_gather
from . import leaf_environment
from ..module_plan import ModulePlan, set_plan
from .deepspeed_module import ShardPlan, StandIns
from .deepspeed_shards import persistent

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
        # gather="module": (bucket_elements, prefetch_distance) of the last such call
        self.module_settings: tuple[int, int] | None = None
        # who reduces the gradients: "leafpass", "deepspeed", or "deepspeed: <why leafpass's
        # path does not apply>" (leafpass.runtime.deepspeed_grad_path); None before the first call
        self.grad_path: str | None = None
        # gather="step": who gathered the whole model last time: "in place" (one all-reduce,
        # leafpass.runtime.deepspeed_step_gather) or "deepspeed" (its coalesced all-gather)
        self.step_gather: str | None = None

    def __repr__(self) -> str:
        return (f"StepStats(policy={self.policy!r}, calls={self.calls}, gathered_elements="
                f"{self.gathered_elements}, peak_gathered_elements={self.peak_gathered_elements}, "
                f"releases={self.releases}, grad_path={self.grad_path!r})")


def _outside_leaves(root: nn.Module) -> list[nn.Module]:
    """``root`` and every module not inside a flagged leaf's subtree (leaves excluded)."""
    found, stack = [], [root]
    while stack:
        module = stack.pop()
        if module is not root and z3_leaf_module(module):
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
        self._grad_path_choice: str | None = None
        self._gather_buffer = step_gather.GatherBuffer()  # gather="step"'s memory, kept between steps
        # what the last call left to undo after backward: ("step", params) or ("module", None)
        self._pending: tuple[str, list[nn.Parameter] | None] | None = None
        # the model's size does not change after deepspeed.initialize: what "auto" compares
        self._total_elements = sum(int(getattr(p, "ds_numel", p.numel())) for p in root.parameters())
        self._stand_ins = StandIns()
        # id() of the leaves found hooked as leaves by DeepSpeed (see _check_leaves)
        self._leaves_ok: set[int] = set()
        # DeepSpeed's threshold flags are set once, in deepspeed.initialize
        self._root_granularity = ds.root_flagged_by_threshold(owner, root)
        # the root's hooks and their Dynamo-disabled twins (see _HooksTakenOut)
        self._disabled_hooks: dict[int, tuple[Callable, Callable]] = {}
        self._plans: dict[tuple[frozenset[int], int, int], ModulePlan] = {}
        # what a "module" call runs inside, undone when it returns (see _module_call_environment)
        self._call_environment: contextlib.ExitStack | None = None
        self.stats = StepStats()

    @classmethod
    def for_root(cls, module: nn.Module) -> "DeepSpeedGatherer | None":
        """The gatherer of ``module`` if it is the root of a ZeRO-3 engine, else None.

        The gatherer lives on the engine's offload object (which the root's hooks hold, and
        which holds the root): in that cycle it goes when the model does. Callers keep it
        weakly (:func:`leafpass.gather.root_gatherer`)."""
        owner = ds.root_offload(module)
        if owner is None:
            return None
        gatherer = getattr(owner, "_leafpass_gatherer", None)
        if gatherer is None or gatherer._root() is not module:
            gatherer = cls(module, owner)
            owner._leafpass_gatherer = gatherer
        return gatherer

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
        self._choose_grad_path(root, options.get("grad_path", "leafpass"))
        if chosen == "hooks":
            if not self._checked:  # every rank calls the model here: name leaves that differ
                self._checked = True
                check_same_leaves([name for name, m in root.named_modules() if m is not root and z3_leaf_module(m)])
            return None
        modules = _outside_leaves(root)
        self._check_leaves(root, modules)
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
        hooks_off = _HooksTakenOut(self._slots, modules, root, self._disabled_hooks)
        hooks_off.take_out()
        return hooks_off

    def _choose_grad_path(self, root: nn.Module, choice: str) -> None:
        """Install or remove leafpass's gradient path on the engine's ZeRO-3 optimizer
        (:mod:`leafpass.runtime.deepspeed_grad_path`) when the ``grad_path`` option changes."""
        if self._grad_path_choice == choice:
            return
        self._grad_path_choice = choice
        optimizer = ds.stage3_optimizer_of(root)
        if optimizer is None:
            self.stats.grad_path = "deepspeed: no ZeRO-3 optimizer reduces this model's gradients"
        elif choice == "leafpass":
            reason = grad_path.install(optimizer)
            self.stats.grad_path = "leafpass" if reason is None else f"deepspeed: {reason}"
            if reason is not None:
                log.info("leafpass: grad_path='leafpass' does not apply to %s (%s); DeepSpeed reduces "
                         "its gradients", type(root).__name__, reason)
        else:
            grad_path.uninstall(optimizer)
            self.stats.grad_path = "deepspeed"

    def _check_leaves(self, root: nn.Module, modules: list[nn.Module]) -> None:
        """Refuse, before any collective, leaves DeepSpeed's hooks do not treat as leaves:
        the root flagged by ``stage3_module_granularity_threshold``, and a leaf with
        submodules flagged after ``deepspeed.initialize`` (DeepSpeed hooked its submodules
        one by one and does not reinstall its hooks). With the same flags on every rank,
        every rank raises here, before any collective."""
        granularity = self._root_granularity
        if granularity is not None:
            raise ValueError(
                f"leafpass: zero_optimization.stage3_module_granularity_threshold made DeepSpeed flag the "
                f"root module {type(root).__name__} itself as a leaf (its granularity, parameters per layer, "
                f"is {granularity}); z3leaf keeps the leaves inside the root opaque and DeepSpeed then hooks "
                f"none of them (eager ZeRO-3 fails in its first backward with this setting too, in DeepSpeed "
                f"0.19.8). Set stage3_module_granularity_threshold below {granularity} so that DeepSpeed "
                f"flags blocks inside the model, or leave it out and flag the blocks with "
                f"deepspeed.utils.set_z3_leaf_modules before deepspeed.initialize."
            )
        for module in modules:
            for child in module.children():
                if id(child) in self._leaves_ok or not z3_leaf_module(child):
                    continue
                if not ds.leaf_when_hooked(child):
                    name = next((n for n, m in root.named_modules() if m is child), type(child).__name__)
                    raise RuntimeError(
                        f"leafpass: {name} ({type(child).__name__}) is flagged as a ZeRO-3 leaf but was not one "
                        f"when deepspeed.initialize installed DeepSpeed's hooks, and DeepSpeed does not "
                        f"reinstall them: its submodules keep hooks that gather and release them one by one, "
                        f"and its gradients are not reduced as a leaf's. Flag it before deepspeed.initialize "
                        f"(deepspeed.utils.set_z3_leaf_modules or zero_optimization.leaf_module), or unset "
                        f"the flag."
                    )
                self._leaves_ok.add(id(child))

    def _gather_step(self, root: nn.Module, params: list[nn.Parameter]) -> None:
        # Every parameter, the leaves' too: one collective for the whole step, as eager ZeRO-3
        # with a complete trace prefetches a model that fits its limits; each leaf's
        # prefetch_all then finds its parameters gathered.
        missing = ds.not_available(params)
        why_not = (step_gather.gather_in_place(self._owner, missing, self._gather_buffer, params)
                   if missing else "nothing to gather")
        if why_not is not None:
            ds.gather_and_wait(self._owner, missing, what=f"{type(root).__name__} (the whole model)")
        self.stats.step_gather = "deepspeed" if why_not is not None else "in place"
        gathered = sum(int(p.ds_numel) for p in params)
        self.stats.gathered_elements = gathered
        self.stats.peak_gathered_elements = max(self.stats.peak_gathered_elements, gathered)
        self._pending = ("step", params)

    def _prepare_module(self, params: list[nn.Parameter], outside: set[int], options: dict) -> None:
        # The same state at every frame entry, whatever DeepSpeed kept from the last step:
        # everything partitioned (persistent parameters excepted), with empty data (leaves
        # DeepSpeed released with fast sharding keep a one-element buffer) ...
        ds.release(self._owner, params)
        ds.empty_released_data(params)
        # ... but persistent parameters whole, the leaves' too, as DeepSpeed keeps them once
        # it has gathered them (before their first use they are partitioned: the first call
        # would see other shapes than the next ones, and the graph uses them as they are)
        kept_whole = ds.not_available([p for p in params if persistent(p)])
        ds.gather_and_wait(self._owner, kept_whole, what="the persistent parameters")
        # ... and the parameters the graph gathers itself hold stand-ins
        gathered = [p for p in params if id(p) in outside and not persistent(p)]
        self._stand_ins.put_in(gathered)
        self.stats.gathered_elements = 0
        self._pending = ("module", None)
        self._call_environment = _module_call_environment(self._plan(gathered, options))

    def _plan(self, gathered: list[nn.Parameter], options: dict) -> ModulePlan:
        """The plan for gathering ``gathered`` (the parameters holding stand-ins in this call):
        one per set of parameters and settings. Leaf flags changed after a call change the
        set (Dynamo's guards on the flags then recompile, and the new compile reads the new
        plan; a program compiled for the old flags keeps its own buckets)."""
        bucket, distance = self.module_settings(options)
        self.stats.module_settings = (bucket, distance)
        ids = frozenset(id(p) for p in gathered)
        plan = self._plans.get((ids, bucket, distance))
        if plan is None:
            plan = self._plans[(ids, bucket, distance)] = ShardPlan(
                root=None, gather_ids=set(ids), bucket_elements=bucket, prefetch_distance=distance,
                counter=_weak_counter(self), is_stand_in=self._stand_ins.is_stand_in,
                param_names={id(p): name for name, p in self._root().named_parameters()},
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


def _weak_counter(gatherer: DeepSpeedGatherer) -> Callable[[int], None]:
    """``gatherer._count_gathered`` without holding the gatherer: the buckets a compiled
    program keeps call it, and the program may outlive the model."""
    method = weakref.WeakMethod(gatherer._count_gathered)

    def count(numel: int) -> None:
        found = method()
        if found is not None:
            found(numel)

    return count


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

    Only what was changed is undone: DeepSpeed's hooks go back to where they were (before
    the hook that followed them then, if it is still there), and each root hook swapped for
    its Dynamo-disabled twin is swapped back if the twin is still in place. Hooks added or
    removed while the call ran (by a hook, or by the model) stay added or removed.

    ``disabled`` (the gatherer's, one per root) keeps each root hook's twin between calls
    (the same twin every call: the hook dicts Dynamo sees do not change); it holds the root's
    current hooks only.
    """

    def __init__(self, slots: list[tuple[dict, int]], modules: list[nn.Module], root: nn.Module,
                 disabled: "dict[int, tuple[Callable, Callable]] | None" = None) -> None:
        dicts = {id(d) for m in modules for d in (m._forward_pre_hooks, m._forward_hooks)}
        self._by_dict: dict[int, tuple[dict, list[int]]] = {}
        for hooks, key in slots:
            if id(hooks) in dicts:
                self._by_dict.setdefault(id(hooks), (hooks, []))[1].append(key)
        for hooks in (root._forward_pre_hooks, root._forward_hooks):
            self._by_dict.setdefault(id(hooks), (hooks, []))
        self._root_dicts = {id(root._forward_pre_hooks), id(root._forward_hooks)}
        self._disabled = {} if disabled is None else disabled
        # per dict: its keys in order before take_out, the hooks taken out, (original, twin) put in
        self._saved: list[tuple[dict, list, dict, dict]] = []

    def take_out(self) -> None:
        twins_now: dict[int, tuple[Callable, Callable]] = {}
        for hooks, keys in self._by_dict.values():
            order = list(hooks)
            taken = {key: hooks.pop(key) for key in keys if key in hooks}
            swapped = {}
            if id(hooks) in self._root_dicts:
                for key, fn in list(hooks.items()):
                    cached = self._disabled.get(id(fn))
                    if cached is None or cached[0] is not fn:
                        cached = (fn, torch._dynamo.disable(fn))
                    twins_now[id(fn)] = cached
                    hooks[key] = cached[1]
                    swapped[key] = cached
            self._saved.append((hooks, order, taken, swapped))
        self._disabled.clear()  # only the root's current hooks: removed ones are not kept
        self._disabled.update(twins_now)

    def put_back(self) -> None:
        for hooks, order, taken, swapped in self._saved:
            for key, (fn, twin) in swapped.items():
                if hooks.get(key) is twin:  # still in place: swap the original back
                    hooks[key] = fn
            if taken:
                _reinsert(hooks, order, taken)
        self._saved.clear()


def _reinsert(hooks: dict, order: list, taken: dict) -> None:
    """Put the ``taken`` hooks back into ``hooks`` where they stood in ``order`` (the keys
    before they were taken out): each before the first key that followed it then and is
    still there, else after the last one that is; hooks added meanwhile stay after them."""
    items = list(hooks.items())
    position = {key: i for i, (key, _) in enumerate(items)}
    placed: dict[int, list] = {}  # index in items -> taken hooks to put before it
    pending: list = []
    for key in order:
        if key in taken:
            pending.append((key, taken[key]))
        elif key in position and pending:
            placed.setdefault(position[key], []).extend(pending)
            pending = []
    if pending:  # nothing that followed them is left: right after the last hook from before
        was_there = set(order)
        last = max((i for i, (key, _) in enumerate(items) if key in was_there), default=-1)
        placed.setdefault(last + 1, []).extend(pending)
    merged = []
    for i, item in enumerate(items):
        merged.extend(placed.get(i, ()))
        merged.append(item)
    merged.extend(placed.get(len(items), ()))
    hooks.clear()
    hooks.update(merged)


def _release_after_backward(tensors: list[torch.Tensor], release: Callable[[], None]) -> None:
    """Call ``release()`` when the first backward through any of ``tensors`` has finished:
    torch's multi-grad hook ("any": once per backward, at the first of their gradients)
    queues it to run once that backward is over."""
    torch.autograd.graph.register_multi_grad_hook(
        tensors, lambda grad: internals.queue_end_of_backward_callback(release), mode="any"
    )


# The gatherer's call runs where Dynamo's callback may be active; Dynamo must not try to
# compile it as a frame of its own (it calls the compiled frame).
internals.never_compile_as_frame(DeepSpeedGatherer.call.__code__)


def gatherer_for_root(module: nn.Module) -> DeepSpeedGatherer | None:
    """The engine table's entry point (``leafpass.runtime.ENGINES``)."""
    return DeepSpeedGatherer.for_root(module)
