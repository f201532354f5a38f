"""DeepSpeed ZeRO-3's private parts, reached from one place behind a version check.

DeepSpeed exposes none of what leafpass needs publicly: the offload object behind a
module's hooks, the parameter coordinator's gather and release, the shard status of a
parameter, the hook handles, the live-parameter cap. Every private DeepSpeed name leafpass
uses is reached through this module (and :mod:`leafpass.runtime.deepspeed_shards` for the
shard layout), behind :func:`check_deepspeed_version`, and each use names the DeepSpeed
source it relies on. Importing this module does not import DeepSpeed, and nothing here
builds a DeepSpeed op. The runtime that gathers a leaf at its entry is
:mod:`leafpass.runtime.deepspeed_runtime`; the gatherers of ``gather="step"`` and
``"module"`` are :mod:`leafpass.runtime.deepspeed_gatherer`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..versions import in_range
from ..wrapped import wrapped_functions

__all__ = [
    "SUPPORTED_DEEPSPEED",
    "check_deepspeed_version",
    "dedupe_params",
]

# The private DeepSpeed APIs below were read and tested in 0.19.8.
SUPPORTED_DEEPSPEED = ((0, 19, 0), (0, 20, 0))  # [min, max)
_SUPPORTED_TEXT = ">=0.19.0,<0.20.0"


def check_deepspeed_version() -> str:
    """Import DeepSpeed and return its version; raise if leafpass does not support it."""
    import deepspeed

    version = getattr(deepspeed, "__version__", "unknown")
    if not in_range(version, *SUPPORTED_DEEPSPEED):
        raise RuntimeError(
            f"leafpass's DeepSpeed runtime relies on private parts of DeepSpeed ZeRO-3 that it "
            f"supports for deepspeed {_SUPPORTED_TEXT} (tested with 0.19.8); found deepspeed "
            f"{version}. Install a supported version (pip install 'deepspeed{_SUPPORTED_TEXT}')."
        )
    return str(version)


def _zero_param_status():
    # deepspeed/runtime/zero/partition_parameters.py: ZeroParamStatus
    # (AVAILABLE / NOT_AVAILABLE / INFLIGHT), carried by each ZeRO-3 parameter as ds_status.
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return ZeroParamStatus


def _offload_for(leaf: nn.Module):
    """The ``DeepSpeedZeRoOffload`` whose hooks manage ``leaf``, or None.

    Relies on deepspeed/runtime/zero/parameter_offload.py (0.19.x):
    ``DeepSpeedZeRoOffload._register_deepspeed_module`` registers on every module, down to
    and including leaf modules, a forward pre-hook ``_pre_forward_module_hook`` (wrapped by
    ``torch.compiler.disable``) that closes over ``self``, the offload object whose
    ``get_param_coordinator()`` returns the coordinator fetching for that module. No public
    API links a module to it, and the hook is what DeepSpeed itself will call next.
    """
    for hook in leaf._forward_pre_hooks.values():
        owner = _closure_self(hook, "_pre_forward_module_hook")
        if callable(getattr(owner, "get_param_coordinator", None)):
            return owner
    return None


def _closure_self(hook, name: str):
    """The ``self`` that the function named ``name`` inside ``hook`` closes over, or None:
    DeepSpeed's hooks are closures defined in methods of the object that owns them."""
    fn = _find_function(hook, name)
    if fn is None:
        return None
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        if var == "self":
            return cell.cell_contents
    return None


def _find_function(obj, name: str, depth: int = 3):
    """``obj`` or a function it wraps (``__wrapped__`` or a closure cell) whose code is ``name``."""
    return next((f for f in wrapped_functions(obj, depth)
                 if getattr(getattr(f, "__code__", None), "co_name", None) == name), None)


def _coordinator_private(coordinator, name: str):
    # deepspeed/runtime/zero/partitioned_param_coordinator.py (0.19.x):
    # PartitionedParameterCoordinator keeps these as double-underscore (name-mangled) members.
    mangled = f"_PartitionedParameterCoordinator__{name}"
    try:
        return getattr(coordinator, mangled)
    except AttributeError:
        raise RuntimeError(
            f"DeepSpeed's PartitionedParameterCoordinator has no {name!r} here; leafpass relies on "
            f"deepspeed {_SUPPORTED_TEXT}. Found deepspeed {check_deepspeed_version()}."
        ) from None



def _with_external(leaf: nn.Module, params: Iterable[nn.Parameter]) -> Iterable[nn.Parameter]:
    yield from params
    # deepspeed/runtime/zero/partition_parameters.py: ds_external_parameters() lists the
    # parameters registered on a module as used by it though owned elsewhere; DeepSpeed's
    # fetch for a leaf gathers them too (partitioned_param_coordinator.iter_params).
    external = getattr(leaf, "ds_external_parameters", None)
    if callable(external):
        for _name, p in external():
            yield p


def dedupe_params(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ----------------------------------------------------- what the step gatherer needs


def gather_and_wait(owner, params: list[nn.Parameter], *, fast_fetch: bool = False, what: str = "") -> None:
    """Gather the NOT_AVAILABLE ZeRO-3 ``params`` through ``owner``'s coordinator in one
    coalesced all-gather per group, and wait until they are AVAILABLE."""
    if not params:
        return
    start_gather(owner, params)
    wait_gathered(owner, params, fast_fetch=fast_fetch, what=what)


def start_gather(owner, params: list[nn.Parameter]) -> None:
    """Issue the all-gather of the NOT_AVAILABLE ``params`` (they become INFLIGHT)."""
    if not params:
        return
    # partitioned_param_coordinator.py, PartitionedParameterCoordinator.__all_gather_params:
    # what fetch_sub_module calls for a module's NOT_AVAILABLE parameters. It adds their
    # numel to the live-parameter count that release later subtracts, issues one
    # param.all_gather_coalesced(...) per group (parameters with / without an hpZ
    # secondary tensor) and records each handle in the in-flight registry.
    gather = _coordinator_private(owner.get_param_coordinator(), "all_gather_params")
    gather(set(params), True)


def wait_gathered(owner, params: list[nn.Parameter], *, fast_fetch: bool = False, what: str = "") -> None:
    """Wait for every in-flight parameter of ``params`` that ``owner``'s coordinator issued."""
    coordinator = owner.get_param_coordinator()
    registry = _coordinator_private(coordinator, "inflight_param_registry")
    stream = _coordinator_private(coordinator, "allgather_stream")
    # Wait as fetch_sub_module does for in-flight parameters: pop the handle from the
    # registry and wait in the all-gather stream (a no-op context on CPU), then order
    # the compute stream after it. handle.wait() sets ds_status AVAILABLE; a coalesced
    # handle shared by several parameters completes once.
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    fast = bool(getattr(coordinator, "fast_sharding_for_leaf_module", False)) and fast_fetch
    with accelerator.stream(stream):
        for p in params:
            handle = registry.pop(p, None)
            if handle is not None:
                handle.wait(handle_dependency=not fast)
    if not accelerator.resolves_data_dependency():
        accelerator.current_stream().wait_stream(stream)
    status = _zero_param_status()
    not_ready = [p for p in params if p.ds_status != status.AVAILABLE]
    if not_ready:
        raise RuntimeError(f"leafpass: after the all-gather {len(not_ready)} parameter(s) of "
                           f"{what or 'the model'} are not AVAILABLE: {not_ready[0].ds_summary()}")


def in_flight(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    status = _zero_param_status()
    return [p for p in params if p.ds_status == status.INFLIGHT]


@torch.no_grad()
def release(owner, params: Iterable[nn.Parameter]) -> int:
    """Partition again every AVAILABLE, non-persistent ``param`` no module is using; returns
    the number of elements released.

    Relies on partitioned_param_coordinator.py (0.19.x): ``__release_param`` partitions an
    AVAILABLE parameter with no active submodules and subtracts it from the coordinator's
    live-parameter count (which ``gather_and_wait`` added it to).
    """
    coordinator = owner.get_param_coordinator()
    release_param = _coordinator_private(coordinator, "release_param")
    status = _zero_param_status()
    released = 0
    for p in params:
        if p.ds_status == status.AVAILABLE and not p.ds_persist and not p.ds_active_sub_modules:
            release_param(p)
            released += p.ds_numel
    return released


@torch.no_grad()
def empty_released_data(params: Iterable[nn.Parameter]) -> int:
    """Give each released (NOT_AVAILABLE) parameter among ``params`` that still holds data an
    empty one, as every other released ZeRO-3 parameter has; returns how many changed.

    partitioned_param_coordinator.py (0.19.x), ``release_sub_module``: with
    ``fast_sharding_for_leaf_module`` (set whenever ``stage3_module_granularity_threshold``
    is > 0) a leaf's parameters are partitioned with ``free_data=False`` and their data set
    to a one-element ``empty_buffer`` (it keeps the device's pending work alive), so a
    released leaf parameter is ``[1]``, not ``[0]``, once the leaf has run. A compiled frame
    entered with those parameters would see ``[0]`` at its first call and ``[1]`` after it (a
    recompile on the parameter's size guard). The buffer holds nothing the parameter needs:
    its shard is ``ds_tensor``.
    """
    status = _zero_param_status()
    changed = 0
    for p in params:
        if p.ds_status == status.NOT_AVAILABLE and p.data.numel() != 0 and not p.ds_active_sub_modules:
            p.data = torch.empty(0, dtype=p.dtype, device=p.data.device)
            changed += 1
    return changed


def root_flagged_by_threshold(owner, root: nn.Module) -> int | None:
    """The root's granularity when ``stage3_module_granularity_threshold`` made DeepSpeed flag
    the root module itself as a leaf, else None.

    parameter_offload.py (0.19.x), ``_set_leaf_by_threshold_preorder``: the modules the
    threshold flags are kept in ``owner.z3_leaf_layers``, and each module's
    "parameters per layer" in ``ds_model_granularity``; the walk starts at the root, so a
    threshold at or above the root's granularity flags the whole model as one leaf.
    """
    flagged = getattr(owner, "z3_leaf_layers", None) or ()
    if not any(m is root for m in flagged):
        return None
    return int(getattr(root, "ds_model_granularity", -1))


def leaf_when_hooked(leaf: nn.Module) -> bool:
    """False when ``leaf`` has submodules that DeepSpeed hooked one by one because ``leaf``
    was not a leaf when ``deepspeed.initialize`` installed its hooks (it was flagged later).

    parameter_offload.py (0.19.x), ``_register_deepspeed_module``: a module flagged at that
    time marks every parameter of its subtree with ``ds_z3_leaf_module`` and gets no hooks
    below it; otherwise each submodule gets DeepSpeed's gather/release hooks and its
    parameters carry no such mark. A module with no submodule holding parameters is
    hooked the same way either way.
    """
    return all(getattr(p, "ds_z3_leaf_module", None) is not None
               for child in leaf.children() for p in child.parameters() if partitioned(p))


def root_offload(module: nn.Module):
    """The ``DeepSpeedZeRoOffload`` for which ``module`` is the wrapped model, or None."""
    owner = _offload_for(module)
    return owner if owner is not None and getattr(owner, "module", None) is module else None


def start_of_forward(owner) -> None:
    """What DeepSpeed's ``_start_of_forward_hook`` on the root does: ``reset_step()`` of the
    coordinator (parameter_offload.py, ``setup_zero_stage3_hooks``)."""
    owner.get_param_coordinator().reset_step()


def max_live_parameters(owner) -> int:
    """``stage3_max_live_parameters`` as the offload object was built with it
    (parameter_offload.py: ``self._max_available_parameters_in_numel``).

    DeepSpeed's public ``engine.zero_max_live_parameters()`` needs the engine, which
    leafpass never holds: it is entered from the model's call, where only the offload
    object (through the module hooks) is reachable."""
    return int(getattr(owner, "_max_available_parameters_in_numel"))


def hook_slots(owner) -> list[tuple[dict, int]]:
    """``(hooks dict, key)`` of every module hook DeepSpeed registered for ``owner``.

    parameter_offload.py (0.19.x) keeps the handles it registers: ``fwd_pre_hook`` (the
    root's ``_start_of_forward_hook``), ``forward_hooks`` (pre/post forward of every
    module) and ``backward_hooks`` (the forward hooks that set up pre/post backward).
    A ``torch.utils.hooks.RemovableHandle`` names its dict by ``hooks_dict_ref()`` and
    its key by ``id``.
    """
    handles = [getattr(owner, "fwd_pre_hook", None), *getattr(owner, "forward_hooks", ()),
               *getattr(owner, "backward_hooks", ())]
    slots = []
    for handle in handles:
        if handle is None:
            continue
        hooks = handle.hooks_dict_ref()
        if hooks is not None and handle.id in hooks:
            slots.append((hooks, handle.id))
    return slots


def partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries ``ds_id``)."""
    return hasattr(param, "ds_id")


def not_available(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    status = _zero_param_status()
    return [p for p in params if p.ds_status == status.NOT_AVAILABLE]


def external_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters DeepSpeed registered on ``module`` as used by it though owned elsewhere."""
    return [p for _name, p in _with_external(module, ())]


# ----------------------------------------------------- what gather="module" needs


def prefetch_bucket_size(owner) -> int:
    """``stage3_prefetch_bucket_size`` as the coordinator was built with it
    (partitioned_param_coordinator.py: ``self.__prefetch_bucket_sz``). Not
    ``engine.zero_prefetch_bucket_size()``: leafpass holds no engine (see
    :func:`max_live_parameters`)."""
    return int(_coordinator_private(owner.get_param_coordinator(), "prefetch_bucket_sz"))


def plain_linear_swap():
    """``(DeepSpeed's linear, torch's linear)`` when DeepSpeed has replaced
    ``torch.nn.functional.linear``, else None.

    partition_parameters.py (0.19.x), ``Init._enable_mem_efficient_linear``: ZeRO-3's
    ``Init`` (which ``deepspeed.initialize`` runs for stage 3) replaces
    ``torch.nn.functional.linear`` with ``zero3_linear_wrap`` for good, keeping torch's in
    ``InsertPostInitMethodToModuleSubClasses.linear_bk``. Its autograd function gathers a
    partitioned weight in backward, which Dynamo cannot trace (``requires_grad`` set on a
    tensor): a graph break at every ``nn.Linear`` whose weight leafpass gathers in the graph.
    """
    import torch.nn.functional as F
    from deepspeed.runtime.zero import linear as zero_linear
    from deepspeed.runtime.zero import partition_parameters as pp

    if F.linear is not zero_linear.zero3_linear_wrap:
        return None
    original = getattr(pp.InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    return None if original is None else (F.linear, original)


# ----------------------------------------------------- what the gradient path needs


def stage3_optimizer_of(root: nn.Module):
    """The ``DeepSpeedZeroOptimizer_Stage3`` reducing ``root``'s gradients, or None.

    stage3.py (0.19.x), ``create_reduce_and_remove_grad_hooks``: every trainable parameter
    outside leaf modules gets a post-accumulate-grad hook ``reduce_partition_and_remove_grads``
    and every leaf module a full backward hook ``reduce_leaf_module_grads``, both closures
    over ``self``, the optimizer. As for the offload object (:func:`_offload_for`), no public
    API leads from the model to it without the engine, which leafpass does not hold.
    """
    candidates = [(hook, "reduce_partition_and_remove_grads")
                  for p in root.parameters() for hook in (getattr(p, "_post_accumulate_grad_hooks", None) or {}).values()]
    candidates += [(hook, "reduce_leaf_module_grads") for m in root.modules() for hook in m._backward_hooks.values()]
    for hook, name in candidates:
        optimizer = _closure_self(hook, name)
        if optimizer is not None:
            return optimizer
    return None


def count_gathered(owner, numel: int) -> None:
    """Add ``numel`` to ``owner``'s coordinator's live-parameter count, as its own all-gather
    does (partitioned_param_coordinator.py, ``__all_gather_params_``: ``__n_available_params
    += all_gather_numel``); releasing the parameters subtracts it again."""
    coordinator = owner.get_param_coordinator()
    name = "_PartitionedParameterCoordinator__n_available_params"
    _coordinator_private(coordinator, "n_available_params")  # raises by name if it is gone
    setattr(coordinator, name, getattr(coordinator, name) + numel)


def quantized_weights(owner) -> bool:
    """``zero_quantized_weights`` as the coordinator was built with it."""
    return bool(getattr(owner.get_param_coordinator(), "zero_quantized_weights", False))
