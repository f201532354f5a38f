"""Check, after the ``gather="module"`` passes, that no stand-in reaches an ordinary op.

While a compiled call runs under ``gather="module"``, every parameter the graph gathers
itself holds a *stand-in*: its full shape over one element of memory. Only the gather
ops may read such a graph input (they read the real shards, not the stand-in); any
other op would compute with the stand-in's single value and give wrong numbers without
a word. So a graph whose stand-in inputs are used by anything else is refused::

    ok                                             refused
    --                                             -------
    s0 = gather_start([a.weight], 1)               y = linear(x, a.weight)   # a stand-in
    g0 = gather_wait(s0, [a.weight], 1)
    y = linear(x, g0[0])

That happens when the plan the passes followed does not name every parameter that holds
a stand-in (the plan and the stand-ins come from different calls, say). The graph is not
changed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from ..leaf_call import qualname_from_source

__all__ = ["StandInReadError", "check_stand_ins", "looks_like_stand_in"]


class StandInReadError(RuntimeError):
    """A graph input holding a stand-in is read by an op other than a gather."""


def looks_like_stand_in(t: torch.Tensor) -> bool:
    """A parameter of several elements over one element of memory (every stride 0): what
    a stand-in looks like when the plan cannot tell (a plan made by hand, in tests)."""
    return isinstance(t, torch.nn.Parameter) and t.numel() > 1 and all(s == 0 for s in t.stride())


def _gather_ops() -> set:
    return {torch.ops.leafpass.gather_start.default, torch.ops.leafpass.gather_wait.default}


def check_stand_ins(gm: torch.fx.GraphModule, example_inputs: list,
                    is_stand_in: Callable[[torch.Tensor], bool] | None = None,
                    names: dict[int, str] | None = None) -> None:
    """Raise :class:`StandInReadError`, naming the parameter and its module, if a graph input
    holding a stand-in (``is_stand_in``, default :func:`looks_like_stand_in`) is used by
    anything but a gather op (or returned as it is). ``names``: ``id(parameter) ->`` its
    qualified name (else it is read from the input's Dynamo source)."""
    is_stand_in = is_stand_in or looks_like_stand_in
    gathers = _gather_ops()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor) or not is_stand_in(value):
            continue
        readers = [u for u in node.users if u.op != "output" and u.target not in gathers]
        if not readers:
            continue
        source = node.meta.get("leafpass_source")
        name = (names or {}).get(id(value)) or (qualname_from_source(source) if source else node.name)
        module = name.rsplit(".", 1)[0] if "." in name else "<root>"
        raise StandInReadError(
            f"leafpass: parameter {name!r} of module {module!r} holds a gather='module' stand-in "
            f"(its full shape over one element) but the compiled graph reads it in "
            f"{readers[0].format_node()!r} instead of gathering it first: the results would be wrong. "
            f"The gather plan does not name it (were leaf flags changed between calls?). Please "
            f"report this; options={{'gather': 'step'}} avoids it."
        )
