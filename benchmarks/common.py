"""Helpers shared by the benchmarks in this folder.

Nothing here knows about a particular model or backend choice; ``compile_backends.py``
and ``zero3_moe.py`` both use it. Import it as ``from benchmarks import common`` with the
repository root on ``sys.path`` (a script run as ``python benchmarks/<name>.py`` inserts
``Path(__file__).resolve().parent.parent`` itself; ``benchmarks`` is a namespace package).

* environment: :func:`set_threads`, :func:`environment`
* timing: :func:`timed`, :func:`summarize_times`, :func:`sync`
* memory: :func:`peak_rss_mb`, :func:`current_rss_mb`
* compile bookkeeping: :class:`CountingBackend`, :func:`graph_break_count`,
  :func:`graph_break_reasons`, :func:`reset_compile_state`, :func:`compile_time_metrics`
* correctness: :func:`compare_values`, :func:`grads_of`, :func:`compare_grads`
* output: :func:`markdown_table`, :func:`write_json`, :func:`default_out_path`
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

__all__ = [
    "BENCH_DIR",
    "REPO_ROOT",
    "RESULTS_DIR",
    "CountingBackend",
    "compare_grads",
    "compare_values",
    "compile_time_metrics",
    "current_rss_mb",
    "default_out_path",
    "environment",
    "fmt",
    "grads_of",
    "graph_break_count",
    "graph_break_reasons",
    "markdown_table",
    "peak_rss_mb",
    "reset_compile_state",
    "set_threads",
    "summarize_times",
    "sync",
    "timed",
    "write_json",
]


# --------------------------------------------------------------------------- environment


def set_threads(n: int) -> int:
    """Fix torch's intra-op thread count (call before any parallel work); returns it."""
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def _git_commit() -> str | None:
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (REPO_ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def environment(**extra: Any) -> dict[str, Any]:
    """Versions, threads and machine facts worth keeping next to any figure."""
    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import leafpass

        env["leafpass"] = getattr(leafpass, "__version__", None)
    except Exception:  # pragma: no cover - benchmarks without leafpass
        env["leafpass"] = None
    env.update(extra)
    return env


# --------------------------------------------------------------------------- timing


def sync() -> None:
    """Wait for queued device work (no-op on CPU) so wall times cover it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(into: dict[str, float], key: str) -> Iterator[None]:
    """``with timed(d, "fwd"):`` adds the block's wall seconds to ``d["fwd"]`` (synchronized)."""
    sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        sync()
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


def summarize_times(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, mean, min, max and spread (in ms) of step times given in seconds."""
    if not seconds:
        return {"n": 0, "median_ms": None, "mean_ms": None, "min_ms": None, "max_ms": None, "iqr_ms": None}
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ms[-1] - ms[0]
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "iqr_ms": iqr,
    }


# --------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """Resident set size now, in MiB (Linux only; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- compile bookkeeping


class CountingBackend:
    """Wraps a Dynamo backend and counts the graphs it receives.

    ``graphs`` is the number of backend calls (one per graph Dynamo hands over, recompiles
    included), ``ops`` the ``call_*`` node count of each and ``seconds`` the time spent
    inside the wrapped backend (forward compilation; the backward of an aot_autograd
    backend is compiled lazily, at the first backward call).

    ``__wrapped__`` points at the wrapped backend so tools that look through wrappers
    (``leafpass.capture.is_leafpass_backend`` does) still recognise it.
    """

    def __init__(self, backend: Callable | str, name: str | None = None) -> None:
        if isinstance(backend, str):
            from torch._dynamo.backends.registry import lookup_backend

            name = name or backend
            backend = lookup_backend(backend)
        self.backend = backend
        self.__wrapped__ = backend
        self.__name__ = name or getattr(backend, "__name__", type(backend).__name__)
        self.graphs = 0
        self.ops: list[int] = []
        self.seconds = 0.0

    def __call__(self, gm, example_inputs, **kwargs):
        self.graphs += 1
        self.ops.append(sum(1 for n in gm.graph.nodes if n.op.startswith("call_")))
        start = time.perf_counter()
        try:
            return self.backend(gm, example_inputs, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def snapshot(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "ops_per_graph": list(self.ops), "backend_s": self.seconds}


def graph_break_count() -> int:
    """Graph breaks Dynamo counted since the last reset (every occurrence, summed)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def graph_break_reasons(limit: int = 200) -> dict[str, int]:
    """Distinct graph-break reasons (first line of each, shortened) and their counts."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        first = str(reason).strip().splitlines()[0][:limit] if str(reason).strip() else "?"
        reasons[first] = reasons.get(first, 0) + int(count)
    return reasons


def reset_compile_state() -> None:
    """Forget compiled code, guards and Dynamo's counters and timing metrics."""
    import torch
    from torch._dynamo import utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    dynamo_utils.compilation_time_metrics.clear()


def compile_time_metrics(keys: Iterable[str] | None = None) -> dict[str, float]:
    """Seconds per Dynamo/Inductor timing key since the last :func:`reset_compile_state`.

    ``keys`` picks a few (missing ones read 0.0); without it every key is returned.
    """
    from torch._dynamo.utils import compilation_time_metrics

    totals = {k: float(sum(v)) for k, v in compilation_time_metrics.items()}
    if keys is None:
        return totals
    return {k: totals.get(k, 0.0) for k in keys}


# --------------------------------------------------------------------------- correctness


def compare_values(
    reference: Sequence[float], values: Sequence[float], *, rtol: float, atol: float
) -> dict[str, Any]:
    """Whether ``values`` match ``reference`` elementwise (``|a-b| <= atol + rtol*|a|``)."""
    if len(reference) != len(values):
        return {"match": False, "max_abs_diff": None, "max_rel_diff": None, "n": len(values)}
    max_abs = max_rel = 0.0
    ok = True
    for a, b in zip(reference, values):
        diff = abs(a - b)
        if not math.isfinite(diff):
            ok = False
            max_abs = max_rel = math.inf
            continue
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(abs(a), 1e-30))
        ok = ok and diff <= atol + rtol * abs(a)
    return {"match": ok, "max_abs_diff": max_abs, "max_rel_diff": max_rel, "n": len(values)}


def grads_of(module) -> dict[str, Any]:
    """Detached copies of every parameter's gradient (None where it has none)."""
    return {
        name: (p.grad.detach().clone() if p.grad is not None else None)
        for name, p in module.named_parameters()
    }


def compare_grads(reference: Mapping[str, Any], grads: Mapping[str, Any], *, rtol: float, atol: float) -> dict[str, Any]:
    """Compare two :func:`grads_of` results; a missing gradient counts as zeros."""
    import torch

    worst = 0.0
    ok = set(reference) == set(grads)
    for name, ref in reference.items():
        got = grads.get(name)
        if ref is None and got is None:
            continue
        if ref is None:
            ref = torch.zeros_like(got)
        if got is None:
            got = torch.zeros_like(ref)
        diff = (ref - got).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        ok = ok and bool(torch.allclose(got, ref, rtol=rtol, atol=atol))
    return {"match": ok, "max_abs_diff": worst}


# --------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 1) -> str:
    """Table cell text: ``-`` for None, fixed digits for floats, ``yes``/``no`` for bools."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows``; ``columns`` lists ``(key, header)`` pairs.

    Cells are already-formatted strings or values passed through :func:`fmt`.
    """
    headers = [h for _, h in columns]
    body = [[v if isinstance(v, str) else fmt(v) for v in (row.get(k) for k, _ in columns)] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def default_out_path(name: str) -> Path:
    """``benchmarks/results/<name>.json`` (the folder is git-ignored)."""
    return RESULTS_DIR / f"{name}.json"


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
