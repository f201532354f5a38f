"""The ``torch.ops.leafpass.prefetch_all`` operator and the registry it resolves leaves in.

``prefetch_all(params, leaf, leaf_id) -> ()`` gathers every parameter of one leaf
before the leaf runs. ``leaf`` is the leaf's qualified name (for people and
snapshots); ``leaf_id`` finds the module object in a weak registry, so the runtime
receives the module itself.

The op returns nothing, so compilers would delete it as dead code. It is
registered as an ORDERED effect: functionalization and aot_autograd thread an
effect token through it (``with_effects``), inductor keeps it, and no pass
reorders it across another effectful op.

Every leafpass op (these two and ``gather_ops``' ``gather_start`` / ``gather_wait``) acts
on host-side state: DeepSpeed's parameter status and its all-gather handles, leafpass's
registries of buckets and gathers in flight. A CUDA graph replays kernels, never Python,
so a replay would skip the gather and read stale parameters. Each op is therefore tagged
``torch.Tag.cudagraph_unsafe`` (inductor then leaves CUDA graphs off for a graph holding
one, or partitions around it with ``graph_partition``), and the backend compiles a piece
that holds one without CUDA graphs under ``mode="reduce-overhead"``
(:func:`holds_host_state_op`), because inductor does not see the tag through the
``with_effects`` wrapper of an effectful op.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from .runtime import runtime_for

__all__ = ["prefetch_all", "prefetch_start", "register_leaf", "lookup_leaf", "holds_host_state_op"]

_ids = itertools.count(1)
_id_of: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_module_of: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()


def register_leaf(module: nn.Module) -> int:
    """A stable integer id for ``module`` (the same id every time it is asked)."""
    leaf_id = _id_of.get(module)
    if leaf_id is None:
        leaf_id = next(_ids)
        _id_of[module] = leaf_id
        _module_of[leaf_id] = module
    return leaf_id


def lookup_leaf(leaf_id: int, leaf: str = "?") -> nn.Module:
    module = _module_of.get(leaf_id)
    if module is None:
        raise RuntimeError(
            f"leafpass: leaf {leaf!r} (id {leaf_id}) no longer exists; the compiled program "
            f"outlived its model. Compile the model again (torch._dynamo.reset())."
        )
    return module


@torch.library.custom_op("leafpass::prefetch_all", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def prefetch_all(params: list[torch.Tensor], leaf: str, leaf_id: int) -> None:
    """Gather every parameter of leaf ``leaf`` through the runtime that owns them."""
    module = lookup_leaf(leaf_id, leaf)
    runtime_for(params).prefetch_all(module, list(params))


@prefetch_all.register_fake
def _prefetch_all_fake(params: list[torch.Tensor], leaf: str, leaf_id: int) -> None:
    return None


torch.library._register_effectful_op(
    "leafpass::prefetch_all", torch._library.effects.EffectType.ORDERED
)


@torch.library.custom_op("leafpass::prefetch_start", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def prefetch_start(leaf: str, leaf_id: int) -> None:
    """Issue, without waiting, the gather the leaf's ``prefetch_all`` will wait for
    (``gather="module"`` with a prefetch distance). Runtimes without ``prefetch_start``
    ignore it: their ``prefetch_all`` gathers as usual.

    Unlike ``prefetch_all`` it takes no parameters as inputs: it sits in a compiled piece,
    and a partitioned parameter entering a compiled autograd node would have its gradient
    accumulator (re)made with its partitioned shape."""
    module = lookup_leaf(leaf_id, leaf)
    params = list(module.parameters())
    runtime = runtime_for(params)
    start = getattr(runtime, "prefetch_start", None)
    if start is not None:
        start(module, params)
        from .gather_ops import live_gathered

        live_gathered.changed()  # the leaf's memory is held from now on


@prefetch_start.register_fake
def _prefetch_start_fake(leaf: str, leaf_id: int) -> None:
    return None


torch.library._register_effectful_op(
    "leafpass::prefetch_start", torch._library.effects.EffectType.ORDERED
)


def holds_host_state_op(gm: torch.fx.GraphModule) -> bool:
    """True when ``gm`` calls one of leafpass's ops (all hold host-side state: see above)."""
    return any(
        node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == "leafpass"
        for node in gm.graph.nodes
    )
