"""``--suggest``: modules to flag so that the observed breaks go, and the leafpass call that
flags them."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from torch import nn

import leafpass

from .explain_graphs import param_stats, qualname
from .explain_modules import ModuleIndex

__all__ = ["apply_hint", "deepspeed_default_leaf_classes", "is_default_leaf_class", "suggest_leaves"]


@functools.lru_cache(maxsize=1)
def deepspeed_default_leaf_classes() -> tuple[str, ...]:
    """The classes DeepSpeed flags when ``zero_optimization.leaf_module.classes`` is not
    given, as the installed DeepSpeed lists them (``DEFAULT_LEAF_MODULE_CLASSES`` of
    ``deepspeed/runtime/zero/leaf_module_config.py``); without DeepSpeed, leafpass's copy."""
    try:
        from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES
    except Exception:  # not installed, or it fails to import here: the copy is the same list
        return tuple(leafpass.DEFAULT_LEAF_MODULE_CLASSES)
    return tuple(DEFAULT_LEAF_MODULE_CLASSES)


def is_default_leaf_class(cls: type, defaults: Iterable[str]) -> bool:
    """``cls`` is one of ``defaults`` by qualified name, or by class name (a copy of the
    class, as remote-code models ship, still matches)."""
    defaults = tuple(defaults)
    return qualname(cls) in defaults or cls.__name__ in {d.rsplit(".", 1)[-1] for d in defaults}


def suggest_leaves(index: ModuleIndex, breaks, skipped, recompiles, flagged: list[str],
                   default_classes: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Modules to flag so that the observed breaks go, as groups of one class; best first.

    For each graph break and skipped frame, the module that holds it is the innermost
    module of the model (with a ``forward`` of its own, not the root, not a flagged leaf
    or inside one) whose code it is in. The recommended module is its nearest enclosing
    module (itself included) of one of DeepSpeed's default leaf classes (``default_classes``,
    e.g. ``Qwen3MoeSparseMoeBlock`` around ``Qwen3MoeExperts``), else the holder itself:
    the smallest opaque piece that swallows the break, so the least is gathered at once
    and the most stays compiled. A recommended module inside another one is dropped (the
    outer one is opaque already).

    Besides the recommended groups (``recommended``), the list holds the alternatives a
    user may weigh: the holders when a default class was preferred, and the module
    enclosing each recommended one (a decoder layer around its MoE block), which gathers
    more at once and keeps more out of the compiled graph. ``breaks`` counts the graph
    breaks and skipped frames in a group's modules, ``recompiles`` the recompiled frames;
    ``params``, ``numel`` and ``bytes`` are those of its largest module: what one opaque
    call gathers at once.
    """
    defaults = tuple(default_classes)
    events = breaks + skipped

    def eligible(name: str) -> bool:
        return (name != "" and index.callable_module(name)
                and not any(index.is_under(name, f) for f in flagged))

    def parent(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    def ancestors(name: str):  # name itself first, the root excluded
        while name:
            yield name
            name = parent(name)

    def holder(name: str) -> str | None:
        return next((a for a in ancestors(name) if eligible(a)), None)

    def is_default(name: str) -> bool:
        return is_default_leaf_class(type(index.by_name[name]), defaults)

    holders, picks = set(), set()
    for event in events:
        if event["in_leaf"]:
            continue
        for module in event["module"]:
            inner = holder(module)
            if inner is None:
                continue
            holders.add(inner)
            picks.add(next((a for a in ancestors(inner) if eligible(a) and is_default(a)), inner))
    picks = {n for n in picks if not any(o != n and index.is_under(n, o) for o in picks)}
    enclosing = {holder(parent(n)) for n in picks} - {None}

    def events_in(names: list[str], items: list[dict[str, Any]]) -> int:
        return sum(1 for e in items if not e.get("in_leaf")
                   and any(index.is_under(m, n) for m in e["module"] for n in names))

    def by_class(names: Iterable[str]) -> list[list[str]]:
        groups: dict[type, list[str]] = {}
        for name in sorted(names, key=index.order.__getitem__):
            groups.setdefault(type(index.by_name[name]), []).append(name)
        return list(groups.values())

    def entry(names: list[str], why: str, recommended: bool) -> dict[str, Any]:
        cls = type(index.by_name[names[0]])
        tensors, elements, nbytes = max((param_stats(index.by_name[n]) for n in names), key=lambda t: (t[2], t[0]))
        return {
            "class": cls.__name__,
            "qualified_class": qualname(cls),
            "names": names,
            "deepspeed_default": is_default(names[0]),
            "why": why,
            "breaks": events_in(names, events),
            "recompiles": events_in(names, recompiles),
            "params": tensors,
            "numel": elements,
            "bytes": nbytes,
            "recommended": recommended,
            "after": None,
        }

    chosen = [entry(g, "DeepSpeed default leaf class" if is_default(g[0]) else "innermost module holding the breaks",
                    True) for g in by_class(picks)]
    chosen.sort(key=lambda e: (not e["deepspeed_default"], -e["breaks"], -min(index.depth(n) for n in e["names"])))
    others = [entry(g, "innermost module holding the breaks", False) for g in by_class(holders - picks)]
    others += [entry(g, "encloses a recommended module", False) for g in by_class(enclosing - picks - holders)]
    others.sort(key=lambda e: (-e["breaks"], e["bytes"]))
    return chosen + others


def apply_hint(model: nn.Module, names: list[str]) -> str | None:
    """The leafpass call that flags ``names``: by class when they are every unflagged module of their classes."""
    if not names:
        return None
    by_name = dict(model.named_modules())
    classes = sorted({type(by_name[n]).__name__ for n in names})
    instances = sorted(n for n, m in by_name.items()
                       if type(m).__name__ in classes and not leafpass.z3_leaf_module(m))
    if instances == sorted(names):
        return f"leafpass.set_z3_leaf_modules(model, {classes!r})"
    return f"leafpass.set_z3_leaf_modules_by_name(model, {names!r})"
