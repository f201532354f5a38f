"""What a rank of :mod:`.zero3_compare` measures besides its step times: DeepSpeed's
per-module hook times and leafpass's ``prefetch_all`` (:class:`HookTimer`), the compiled
graphs run (:class:`CountingBackend`), recompile-limit hits (:func:`quiet_logs`) and peak
RSS. Collectives and gathered elements are counted by :mod:`.deepspeed_probe`."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["CountingBackend", "HookTimer", "RecompileLimitCounter", "peak_rss_mb", "quiet_logs"]


class HookTimer:
    """Times DeepSpeed ZeRO-3's per-module fetch/release functions and leafpass's prefetch_all.

    DeepSpeed's module hooks call ``pre/post_sub_module_forward_function`` and
    ``pre/post_sub_module_backward_function`` of the ``DeepSpeedZeRoOffload`` object
    (looked up on ``self`` at each call), so instance attributes replace them. The timers
    are wrapped in ``torch.compiler.disable`` so Dynamo runs them eagerly, as it does
    DeepSpeed's own pre-forward hook.
    """

    KINDS = {
        "pre_sub_module_forward_function": "fwd_fetch",
        "post_sub_module_forward_function": "fwd_release",
        "pre_sub_module_backward_function": "bwd_fetch",
        "post_sub_module_backward_function": "bwd_release",
    }

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1

    def install(self, engine) -> None:
        import torch

        from leafpass.runtime import runtime_for

        # DeepSpeed's own handle on the object whose methods its module hooks call
        offload = getattr(engine.optimizer, "parameter_offload", None)
        if offload is None:
            raise RuntimeError("hook timing: no DeepSpeed ZeRO-3 hooks found on the engine's module")
        for method, kind in self.KINDS.items():
            original = getattr(offload, method)

            def timed(sub_module, _original=original, _kind=kind):
                where = "leaf" if getattr(sub_module, "_z3_leaf", False) else "nonleaf"
                start = time.perf_counter()
                try:
                    return _original(sub_module)
                finally:
                    self._add(f"{_kind}.{where}", time.perf_counter() - start)

            setattr(offload, method, torch.compiler.disable(timed))

        runtime = runtime_for(list(engine.module.parameters()))  # DeepSpeed's, process-wide
        original_prefetch = runtime.prefetch_all

        def timed_prefetch(leaf, params):
            start = time.perf_counter()
            try:
                return original_prefetch(leaf, params)
            finally:
                self._add("prefetch_all.leaf", time.perf_counter() - start)

        runtime.prefetch_all = timed_prefetch

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        return dict(self.seconds), dict(self.calls)


class CountingBackend:
    """Wraps a Dynamo backend; counts the compiled forward graphs run and their wall time."""

    def __init__(self, backend, options: dict[str, Any] | None = None) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.backend = lookup_backend(backend) if isinstance(backend, str) else backend
        self.__wrapped__ = self.backend  # leafpass recognises its backend through wrappers
        self.__name__ = getattr(self.backend, "__name__", str(backend))
        self.options = options
        self._leafpass_options = options or {}  # what leafpass reads before the frame is entered
        self.runs = 0
        self.seconds = 0.0

    def __call__(self, gm, example_inputs, **kwargs):
        if self.options:
            kwargs.setdefault("options", self.options)
        compiled = self.backend(gm, example_inputs, **kwargs)

        def run(*args):
            start = time.perf_counter()
            try:
                return compiled(*args)
            finally:
                self.runs += 1
                self.seconds += time.perf_counter() - start

        return run


def peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class RecompileLimitCounter:
    """A filter on Dynamo's convert_frame logger: counts "hit config.recompile_limit" warnings
    (a frame Dynamo gives up on and runs eagerly from then on) and drops them if ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.hits = 0

    def filter(self, record) -> bool:
        if "recompile_limit" in record.getMessage():
            self.hits += 1
            return not self.quiet
        return True


def quiet_logs(quiet: bool) -> RecompileLimitCounter:
    import logging
    import warnings

    counter = RecompileLimitCounter(quiet)
    logging.getLogger("torch._dynamo.convert_frame").addFilter(counter)
    if quiet:
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)  # DeepSpeed's info lines and its "untested optimizer" warning
        warnings.filterwarnings("ignore", category=UserWarning, module=r"deepspeed(\.|$)")
        warnings.filterwarnings("ignore", message=r".*functools\.lru_cache.*")  # Dynamo, on DeepSpeed's nvtx
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    return counter
