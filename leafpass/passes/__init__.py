"""leafpass's FX passes and the pipeline that runs them in order.

Each pass is ``name_pass(gm, ...) -> gm`` in a file of its own, and declares a small
contract: what must be true of the graph before it runs (``requires``) and what it
makes true (``provides``). :func:`run_passes` checks the contracts, so a pipeline
in the wrong order fails loudly instead of producing a wrong graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch.fx

from .bucket_gathers import bucket_gathers_pass
from .inline_checkpoint import inline_checkpoint_pass
from .insert_gathers import insert_gathers_pass
from .insert_prefetch import insert_prefetch_pass
from .leaf_call_module import leaf_call_module_pass


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[torch.fx.GraphModule], torch.fx.GraphModule]
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    context: tuple[str, ...] = ()  # keyword arguments it takes from run_passes' context


PASSES: dict[str, Pass] = {
    "inline_checkpoint": Pass(
        "inline_checkpoint", inline_checkpoint_pass, provides=frozenset({"checkpoint_regions_inlined"})
    ),
    "leaf_call_module": Pass(
        "leaf_call_module",
        leaf_call_module_pass,
        requires=frozenset({"checkpoint_regions_inlined"}),
        provides=frozenset({"leaf_call_modules"}),
    ),
    "insert_prefetch": Pass(
        "insert_prefetch",
        insert_prefetch_pass,
        requires=frozenset({"leaf_call_modules"}),
        provides=frozenset({"prefetch_at_leaf_entry"}),
    ),
    "insert_gathers": Pass(
        "insert_gathers",
        insert_gathers_pass,
        requires=frozenset({"prefetch_at_leaf_entry"}),
        provides=frozenset({"gathers_at_first_use"}),
        context=("example_inputs", "plan"),
    ),
    "bucket_gathers": Pass(
        "bucket_gathers",
        bucket_gathers_pass,
        requires=frozenset({"gathers_at_first_use"}),
        provides=frozenset({"gathers_bucketed"}),
        context=("plan",),
    ),
}

DEFAULT_PIPELINE: tuple[str, ...] = ("inline_checkpoint", "leaf_call_module", "insert_prefetch")
# gather="module": the graph gathers the non-leaf parameters itself
MODULE_GATHER_PIPELINE: tuple[str, ...] = (*DEFAULT_PIPELINE, "insert_gathers", "bucket_gathers")


class PassOrderError(RuntimeError):
    pass


def run_passes(gm: torch.fx.GraphModule, names: Sequence[str] = DEFAULT_PIPELINE, **context):
    """Run the named passes in order; raise if one runs before what it requires.

    ``context`` holds what passes take besides the graph (``example_inputs``, the gather
    ``plan``); each pass gets the entries it names."""
    done: set[str] = set()
    for name in names:
        if name not in PASSES:
            raise ValueError(f"unknown leafpass pass {name!r}; known passes: {sorted(PASSES)}")
        p = PASSES[name]
        missing = p.requires - done
        if missing:
            raise PassOrderError(
                f"pass {name!r} requires {sorted(missing)}, which no earlier pass provides; "
                f"run it after the pass that provides them (pipeline: {list(names)})"
            )
        missing_context = [k for k in p.context if k not in context]
        if missing_context:
            raise TypeError(f"pass {name!r} needs {missing_context} passed to run_passes")
        gm = p.fn(gm, **{k: context[k] for k in p.context})
        done |= p.provides
    return gm


__all__ = [
    "DEFAULT_PIPELINE",
    "MODULE_GATHER_PIPELINE",
    "bucket_gathers_pass",
    "inline_checkpoint_pass",
    "insert_gathers_pass",
    "PASSES",
    "Pass",
    "PassOrderError",
    "insert_prefetch_pass",
    "leaf_call_module_pass",
    "run_passes",
]
