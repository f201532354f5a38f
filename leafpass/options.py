"""The ``z3leaf`` backend's options, and the gather policies, in one place.

The backend validates ``options`` here; the runtime reads the same names (a gatherer
resolves ``gather`` per call) without importing the backend. ``GATHER_POLICIES`` says what
each ``gather`` value does; ``leafpass.gather`` has the long story.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["GATHER_POLICIES", "GRAD_PATHS", "INNER_COMPILERS", "LEAF_COMPILE_MODES", "OPTIONS", "check_gather",
           "check_grad_path", "check_leaf_compile", "check_options"]

GATHER_POLICIES: Mapping[str, str] = {
    "auto": "'step' when the whole model fits under the engine's live-parameter cap, else 'module'",
    "step": "gather the whole model in one collective before the compiled forward, release it after backward",
    "module": "gather inside the graph, in buckets, each freed after its last use and gathered again for backward",
    "hooks": "let the engine's module hooks gather each module (a graph break per hooked module)",
}


def _one_of(option: str, value: Any, choices: Mapping[str, str]) -> str:
    """``value`` if it is a key of ``choices``, else a ValueError naming ``option`` and what
    each valid value does."""
    if not isinstance(value, str) or value not in choices:
        valid = "; ".join(f"{name!r}: {what}" for name, what in choices.items())
        raise ValueError(f"z3leaf option {option!r} must be one of {list(choices)}; got {value!r}. {valid}")
    return value


def check_gather(value: Any) -> str:
    """``value`` if it names a gather policy, else a ValueError listing the valid ones."""
    return _one_of("gather", value, GATHER_POLICIES)


LEAF_COMPILE_MODES: Mapping[str, str] = {
    "off": "run each leaf's forward eagerly (DeepSpeed ZeRO-3's own behaviour)",
    "inner": "run each leaf's forward through torch.compile with the inner compiler (dynamic shapes, graph "
             "breaks allowed inside); the leaf stays one opaque call with its prefetch_all in the outer graph",
}


def check_leaf_compile(value: Any) -> str:
    """``value`` if it names a leaf-compile mode, else a ValueError listing the valid ones."""
    return _one_of("leaf_compile", value, LEAF_COMPILE_MODES)


GRAD_PATHS: Mapping[str, str] = {
    "leafpass": "reduce the engine's gradient buckets with fewer copies (DeepSpeed ZeRO-3: no torch.cat, no "
                "collective on one rank, all_reduce in place on gloo) and flatten the optimizer's partitions in "
                "one copy; the same buckets, partitions and sums",
    "deepspeed": "leave the engine's gradient reduction as it is",
}


def check_grad_path(value: Any) -> str:
    """``value`` if it names a gradient path, else a ValueError listing the valid ones."""
    return _one_of("grad_path", value, GRAD_PATHS)


INNER_COMPILERS = ("inductor", "aot_eager", "eager")
OPTIONS: Mapping[str, str] = {
    "inner": f"compiler for the non-leaf pieces: one of {INNER_COMPILERS} or a backend callable",
    "gather": f"who gathers non-leaf parameters of a partitioned model: one of {list(GATHER_POLICIES)}",
    "bucket_elements": "gather='module': merge adjacent gathers up to this many elements "
                       "(default: the engine's prefetch bucket, DeepSpeed stage3_prefetch_bucket_size)",
    "prefetch_distance": "gather='module': start each gather this many buckets early "
                         "(default: 1, or 0 when the engine's prefetch bucket is 0)",
    "leaf_compile": f"how each leaf's own forward runs: one of {list(LEAF_COMPILE_MODES)} (default 'off')",
    "grad_path": f"who reduces the gradients of a partitioned model: one of {list(GRAD_PATHS)} (default 'leafpass')",
}


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with every default filled in, or an error naming the option and the fix."""
    if not isinstance(options, Mapping):
        raise TypeError(
            f"z3leaf options must be a dict such as {{'inner': 'inductor'}}, got {type(options).__name__}"
        )
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        valid = ", ".join(f"{k!r} ({v})" for k, v in OPTIONS.items())
        raise ValueError(f"unknown z3leaf option(s) {unknown}; valid options: {valid}")
    checked = {"inner": "inductor", "gather": "auto", "bucket_elements": None, "prefetch_distance": None,
               "leaf_compile": "off", "grad_path": "leafpass", **options}
    check_gather(checked["gather"])
    check_leaf_compile(checked["leaf_compile"])
    check_grad_path(checked["grad_path"])
    for key in ("bucket_elements", "prefetch_distance"):
        value = checked[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"z3leaf option {key!r} must be an int >= 0 (or None for the engine's default); "
                             f"got {value!r}")
    inner = checked["inner"]
    if not callable(inner) and inner not in INNER_COMPILERS:
        raise ValueError(
            f"z3leaf option 'inner' must be one of {list(INNER_COMPILERS)} or a backend callable "
            f"(gm, example_inputs) -> callable; got {inner!r}"
        )
    return checked
