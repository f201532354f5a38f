"""The demo's closing lines: what a newcomer wants first, at most five short lines.

::

    graphs / breaks: z3leaf 1/0, inductor_strict 9/12, z3leaf_strict 1/0
    step vs eager ZeRO-3 (wall, CPU): z3leaf 0.85x 0.90x, inductor_strict 1.50x 1.20x, z3leaf_strict 0.80x 0.70x
    losses equal eager's: yes, every compiled way (tolerance 1e-05)
    peak gathered elements: z3leaf 9,000 vs eager 9,000; z3leaf_strict 2,000 vs eager_strict 2,000
    FAILED: inductor (AssertionError: ...)

Each compiled way is read against eager ZeRO-3 under the same limits (``eager`` for
DeepSpeed's default limits, ``eager_strict`` for strict ones). The long reading (bucket
settings, goals, all-gathers, compile time) is ``zero3_compare.reading``: the demo prints
it with ``--explain`` and writes it to its JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["summary"]

_ERROR_CHARS = 80


def _reference(row: dict[str, Any], by_way: dict[str, dict]) -> dict | None:
    """Eager ZeRO-3 under the limits ``row`` ran with."""
    return by_way.get("eager_strict" if row.get("zero_limits") == "strict" else "eager")


def _elements(value) -> str:
    return "-" if value is None else f"{int(value):,}"


def summary(rows: Sequence[dict[str, Any]], tolerance: float) -> list[str]:
    """At most five lines: graphs and breaks, step time against eager ZeRO-3 (wall and CPU),
    losses equal or not, peak gathered elements, and the ways that failed (if any)."""
    ok = [r for r in rows if not r.get("error")]
    by_way = {r["way"]: r for r in ok}
    compiled = [r for r in ok if r.get("backend") is not None]
    lines = []
    if compiled:
        lines.append("graphs / breaks: " + ", ".join(f"{r['way']} {r['graphs']}/{r['graph_breaks']}" for r in compiled))
        ratios = []
        for r in compiled:
            ref = _reference(r, by_way)
            if ref and ref.get("median_step_ms") and ref.get("median_step_cpu_ms"):
                ratios.append(f"{r['way']} {r['median_step_ms'] / ref['median_step_ms']:.2f}x "
                              f"{r['median_step_cpu_ms'] / ref['median_step_cpu_ms']:.2f}x")
        if ratios:
            lines.append("step vs eager ZeRO-3 (wall, CPU): " + ", ".join(ratios))
        if "eager" in by_way:
            differ = [f"{r['way']} (max diff {r['loss_max_abs_diff']:.1e})"
                      for r in compiled if r.get("losses_match_eager") is False]
            lines.append(f"losses equal eager's: NO for {', '.join(differ)}" if differ else
                         f"losses equal eager's: yes, every compiled way (tolerance {tolerance:g})")
        else:
            lines.append("losses: not compared (eager ZeRO-3 did not run)")
        peaks = []
        for r in compiled:
            ref = _reference(r, by_way)
            if r.get("peak_gathered_elements") is not None and ref:
                peaks.append(f"{r['way']} {_elements(r['peak_gathered_elements'])} vs {ref['way']} "
                             f"{_elements(ref.get('peak_gathered_elements'))}")
        if peaks:
            lines.append("peak gathered elements: " + "; ".join(peaks))
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines.append("FAILED: " + ", ".join(
            f"{r['way']} ({str(r['error']).splitlines()[0][:_ERROR_CHARS]})" for r in failed))
    return lines[:5]
