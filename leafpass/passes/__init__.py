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

from .insert_prefetch import insert_prefetch_pass
from .leaf_call_module import leaf_call_module_pass


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[torch.fx.GraphModule], torch.fx.GraphModule]
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()


PASSES: dict[str, Pass] = {
    "leaf_call_module": Pass(
        "leaf_call_module", leaf_call_module_pass, provides=frozenset({"leaf_call_modules"})
    ),
    "insert_prefetch": Pass(
        "insert_prefetch",
        insert_prefetch_pass,
        requires=frozenset({"leaf_call_modules"}),
        provides=frozenset({"prefetch_at_leaf_entry"}),
    ),
}

DEFAULT_PIPELINE: tuple[str, ...] = ("leaf_call_module", "insert_prefetch")


class PassOrderError(RuntimeError):
    pass


def run_passes(gm: torch.fx.GraphModule, names: Sequence[str] = DEFAULT_PIPELINE):
    """Run the named passes in order; raise if one runs before what it requires."""
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
        gm = p.fn(gm)
        done |= p.provides
    return gm


__all__ = [
    "DEFAULT_PIPELINE",
    "PASSES",
    "Pass",
    "PassOrderError",
    "insert_prefetch_pass",
    "leaf_call_module_pass",
    "run_passes",
]
