"""Who gathers the parameters of non-leaf modules: the ``gather`` option of ``z3leaf``.

Leaves are always gathered whole at their entry (their ``prefetch_all``). The
parameters of every other module of a partitioned model (embeddings, attention, norms,
routers) are gathered according to ``options={"gather": ...}``:

``"step"``
    leafpass gathers the whole model in ONE coalesced all-gather just before the
    compiled forward is entered (the leaves' parameters too, so their ``prefetch_all``
    finds them gathered), and releases it once backward has finished. The engine's
    per-module hooks are kept out of the compiled call, so Dynamo sees plain modules
    with whole parameters: one graph per forward, no graph breaks, and guards that see
    the same full shapes every step. Costs the memory of the whole model between forward
    and backward.
``"module"``
    the compiled graph gathers the parameters itself: leafpass's passes put a gather op
    before each module's first use in every stretch between leaves, merge adjacent ones
    into buckets of up to ``bucket_elements`` and start each bucket ``prefetch_distance``
    buckets early (``leafpass.passes.bucket_gathers`` draws the schedule). Each gathered
    weight is freed after its last use and gathered again for backward, so at most a few
    buckets and a leaf are whole at once. One graph, no graph breaks, like ``"step"``.
``"hooks"``
    the engine's own module hooks gather each module at its entry, as in eager ZeRO-3.
    They cannot be compiled, so every hooked module is a graph break (the behaviour of
    ``engine.compile()``), but the engine's live-parameter limits hold.
``"auto"`` (default)
    ``"step"`` when the whole model fits under the engine's live-parameter cap
    (DeepSpeed: ``stage3_max_live_parameters``), else ``"module"`` with buckets of the
    engine's prefetch bucket size (``stage3_prefetch_bucket_size``) and a prefetch
    distance of 1 (0 when that bucket size is 0).

The decision is taken where the compiled model is called, before Dynamo's frame is
entered: the capture wrapper asks :func:`root_gatherer` whether the module is the root
of an engine that leafpass can gather for (only DeepSpeed ZeRO-3 today), and the
gatherer wraps the call::

    engine(x) -> model(x)                                    # eager: capture wrapper
                   gather every param (1 all-gather)         # "step"
                   | or: stand-ins in non-leaf params        # "module"
                   engine hooks of non-leaf modules off
                   compiled frame: ONE graph                 # "module": gathers in it
                   hooks back on; release (or restore the params) after backward
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from .runtime import engine_of
from .options import GATHER_POLICIES, check_gather  # noqa: F401  (their home is options.py)

__all__ = ["GATHER_POLICIES", "check_gather", "gather_stats", "root_gatherer"]

_NOT_A_ROOT = object()
# module -> weakref to its gatherer, or _NOT_A_ROOT. A gatherer holds its root (through the
# engine's objects it works with), so it cannot be this dict's value: the entry would keep
# its own key alive. It lives on the engine object that owns the root's hooks instead (see
# _find_gatherer), in the reference cycle the engine already makes with the root, and goes
# with them.
_gatherers: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def root_gatherer(module: nn.Module):
    """The gatherer for ``module`` if it is the root of a partitioned model, else None.

    Cached per module: the answer depends on the engine's hooks, installed once.
    """
    found = _cached(module)
    if found is None:
        found = _find_gatherer(module)
        _gatherers[module] = found if found is _NOT_A_ROOT else weakref.ref(found)
    return None if found is _NOT_A_ROOT else found


def _cached(module: nn.Module):
    found = _gatherers.get(module, None)
    return found() if isinstance(found, weakref.ref) else found


def _find_gatherer(module: nn.Module):
    # Only modules an engine has registered carry its mark (DeepSpeed: ds_id); the engine's
    # gatherer (and the engine) is imported only for models that have it.
    engine = engine_of(module)
    if engine is not None and engine.gatherer is not None:
        gatherer = engine.load("gatherer")(module)
        if gatherer is not None:
            return gatherer
    return _NOT_A_ROOT


def gather_stats(model: nn.Module):
    """What leafpass's gatherer did for ``model`` (a partitioned root module, or an engine
    or compiled wrapper holding one as ``.module`` / ``._orig_mod``): the policy the last
    call resolved to, calls, elements gathered by the last call and at peak. None if
    leafpass has not run a compiled call of it."""
    for attr in (None, "_orig_mod", "module"):
        module = model if attr is None else getattr(model, attr, None)
        if isinstance(module, nn.Module):
            found = _cached(module)
            if found is not None and found is not _NOT_A_ROOT:
                return found.stats
    return None
