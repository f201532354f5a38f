"""What leafpass keeps between calls goes when the model, program or callback does, and the
hook dicts it changes for a call are put back as they are after the call.

* ``leafpass.gather``: the gatherer of a partitioned root never keeps the root alive;
* ``leafpass.gather_ops``: buckets live as long as the program that gathers them, and no
  bucket keeps an entry of handles in flight once waited for;
* ``leafpass.capture``: the options cached per Dynamo callback go with the callback;
* ``_HooksTakenOut`` (``gather="step"``/``"module"``): hooks added or removed during the
  call stay so, only DeepSpeed's hooks and the root's swapped hooks are put back, in
  place; the Dynamo-disabled twins of the root's hooks are kept for its current hooks only.

The gatherer test builds the object graph DeepSpeed makes (a ZeRO-3 offload object that
holds the root and is held by the closure of the root's forward pre-hook) without
DeepSpeed; the distributed tests run the gatherer under real DeepSpeed.
"""

from __future__ import annotations

import copy
import gc
import weakref

import torch
from torch import nn

import leafpass
from leafpass import capture, gather_ops
from leafpass.runtime.deepspeed_gatherer import _HooksTakenOut
from leafpass.testing.models import MoEBlock
from tests.test_module_gather import Chain, compile_with_plan, make_plan, partition

# ------------------------------------------------------------------------ gatherers


class _Coordinator:
    def reset_step(self) -> None:
        pass


class _OffloadLike:
    """The links DeepSpeed 0.19's ``DeepSpeedZeRoOffload`` makes: it holds the root, and the
    root's forward pre-hook ``_pre_forward_module_hook`` closes over it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._max_available_parameters_in_numel = 10**9

        def _pre_forward_module_hook(module, *args):
            return self.get_param_coordinator()

        self.fwd_pre_hook = module.register_forward_pre_hook(_pre_forward_module_hook)
        self.forward_hooks, self.backward_hooks = [], []
        module.ds_id = 0

    def get_param_coordinator(self):
        return _Coordinator()


def test_a_dropped_partitioned_root_and_its_gatherer_are_collected():
    root = nn.Linear(3, 3)
    _OffloadLike(root)
    gatherer = leafpass.gather.root_gatherer(root)
    assert gatherer is not None and leafpass.gather.root_gatherer(root) is gatherer  # cached
    assert leafpass.gather_stats(root) is gatherer.stats
    root_ref, gatherer_ref = weakref.ref(root), weakref.ref(gatherer)
    del root, gatherer
    gc.collect()
    assert root_ref() is None and gatherer_ref() is None


def test_a_module_that_is_not_a_root_is_remembered_weakly():
    module = nn.Linear(3, 3)
    assert leafpass.gather.root_gatherer(module) is None
    ref = weakref.ref(module)
    del module
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------- gather ops


def _module_gather_program():
    torch.manual_seed(0)
    reference = Chain()
    leafpass.set_z3_leaf_modules(reference, [MoEBlock])
    model = copy.deepcopy(reference)
    store = partition(model)
    return reference, model, make_plan(model, store, bucket_elements=1000, prefetch_distance=1)


def test_gather_buckets_live_as_long_as_the_compiled_program():
    torch._dynamo.reset()
    gc.collect()
    before = len(gather_ops._buckets)
    sizes = []
    for _ in range(3):  # compile, run, backward, drop: the registry does not grow
        reference, model, plan = _module_gather_program()
        x = torch.randn(6, 8)
        out = compile_with_plan(model, plan)(x)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-6)
        out.sum().backward()
        assert len(gather_ops._buckets) > before  # the live program's buckets
        assert gather_ops._in_flight == {}  # every start was waited for
        program_buckets = list(gather_ops._buckets.values())
        del out, model, plan, reference, program_buckets
        torch._dynamo.reset()
        gc.collect()
        sizes.append(len(gather_ops._buckets))
    # what is left is what Dynamo itself keeps of the programs it compiled (it installs each
    # compiled function as a global of the model's module): not growing with each program
    assert sizes[0] == sizes[1] == sizes[2], sizes


# ------------------------------------------------------------------ capture callbacks


def test_options_cached_per_callback_go_with_the_callback():
    before = len(capture._options_by_callback)
    refs = []
    for _ in range(5):
        backend = leafpass.make_backend(inner="eager")
        assert capture._callback_options(backend) == {"inner": "eager"}
        assert capture._callback_options(backend) == {"inner": "eager"}  # cached
        refs.append(weakref.ref(backend))
        del backend
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(capture._options_by_callback) == before


def test_options_of_dynamo_callbacks_of_dropped_compiled_models_are_dropped():
    gc.collect()
    before = len(capture._options_by_callback)
    for _ in range(3):
        model = nn.Linear(4, 4)
        model.compile(backend="z3leaf")  # what engine.compile does: a new Dynamo callback each
        model(torch.randn(2, 4))
        assert len(capture._options_by_callback) == before + 1  # asked at the root's call
        del model
        gc.collect()
        assert len(capture._options_by_callback) == before
    torch._dynamo.reset()


# --------------------------------------------------------------------- hook dicts


def _hook(tag: str, log: list):
    def fn(module, args):
        log.append(tag)

    fn.__name__ = tag
    return fn


def test_put_back_restores_only_what_was_taken_out():
    log: list = []
    root = nn.Sequential(nn.Linear(2, 2))
    child = root[0]
    ds_child = child.register_forward_pre_hook(_hook("ds_child", log))
    user_child = child.register_forward_pre_hook(_hook("user_child", log))
    user_a = root.register_forward_pre_hook(_hook("a", log))
    ds_root = root.register_forward_pre_hook(_hook("ds_root", log))
    user_b = root.register_forward_pre_hook(_hook("b", log))
    originals = dict(root._forward_pre_hooks)
    slots = [(child._forward_pre_hooks, ds_child.id), (root._forward_pre_hooks, ds_root.id)]

    off = _HooksTakenOut(slots, [root, child], root)
    off.take_out()
    assert list(child._forward_pre_hooks) == [user_child.id]
    assert list(root._forward_pre_hooks) == [user_a.id, user_b.id]
    assert root._forward_pre_hooks[user_a.id] is not originals[user_a.id]  # its Dynamo-disabled twin
    # while the call runs: b removes itself, the model adds hooks and drops one
    user_b.remove()
    added_root = root.register_forward_pre_hook(_hook("added_root", log))
    added_child = child.register_forward_pre_hook(_hook("added_child", log))
    user_child.remove()
    off.put_back()

    assert list(root._forward_pre_hooks) == [user_a.id, ds_root.id, added_root.id]
    assert root._forward_pre_hooks[user_a.id] is originals[user_a.id]
    assert root._forward_pre_hooks[ds_root.id] is originals[ds_root.id]
    assert list(child._forward_pre_hooks) == [ds_child.id, added_child.id]
    root(torch.randn(1, 2))
    assert log == ["a", "ds_root", "added_root", "ds_child", "added_child"]


def test_a_root_hook_replaced_during_the_call_is_not_swapped_back():
    root = nn.Linear(2, 2)
    handle = root.register_forward_pre_hook(_hook("a", []))
    off = _HooksTakenOut([], [root], root)
    off.take_out()
    replacement = _hook("replacement", [])
    root._forward_pre_hooks[handle.id] = replacement
    off.put_back()
    assert root._forward_pre_hooks[handle.id] is replacement


def test_disabled_twins_are_kept_for_the_roots_current_hooks_only():
    root = nn.Linear(2, 2)
    disabled: dict = {}
    hook = _hook("a", [])
    handle = root.register_forward_pre_hook(hook)
    twins = []
    for _ in range(2):
        off = _HooksTakenOut([], [root], root, disabled)
        off.take_out()
        twins.append(root._forward_pre_hooks[handle.id])
        off.put_back()
    assert twins[0] is twins[1]  # the same twin every call: what Dynamo sees does not change
    ref = weakref.ref(hook)
    handle.remove()
    del hook, twins, off
    off = _HooksTakenOut([], [root], root, disabled)
    off.take_out()
    off.put_back()
    gc.collect()
    assert disabled == {} and ref() is None
