"""The rows of :mod:`.zero3_compare` for people: a markdown table (:func:`markdown_table`),
one paragraph that reads it (:func:`reading`), and ``gather="module"``'s goal against
eager ZeRO-3 under strict limits (:func:`module_goal`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .zero3_ways import LOSS_TOLERANCE, MODULE_GOAL_VS_EAGER_STRICT

__all__ = ["TABLE_COLUMNS", "WAY_LABELS", "gather_cell", "markdown_table", "module_goal", "reading"]

TABLE_COLUMNS = [
    ("way", "way"),
    ("gather", "gather"),
    ("graphs", "graphs"),
    ("graph_breaks", "graph breaks"),
    ("frames_skipped", "frames run eagerly"),
    ("all_gathers_per_step", "all-gathers/step"),
    ("peak_gathered_elements", "peak gathered elems"),
    ("compile_s", "compile s"),
    ("median_step_ms", "median step ms"),
    ("median_step_cpu_ms", "step CPU ms"),
    ("final_loss", "final loss"),
    ("losses_match_eager", "losses = eager"),
    ("peak_rss_mb", "peak RSS MiB (max rank)"),
]


WAY_LABELS = {
    "eager": "eager ZeRO-3",
    "eager_strict": "eager ZeRO-3, strict limits",
    "inductor": "engine.compile(inductor)",
    "inductor_strict": "engine.compile(inductor), strict",
    "z3leaf": "z3leaf (gather auto)",
    "z3leaf_step": "z3leaf gather=step",
    "z3leaf_strict": "z3leaf, strict (auto: module)",
    "z3leaf_module": "z3leaf gather=module, strict",
    "z3leaf_hooks": "z3leaf gather=hooks",
}


def gather_cell(row: dict[str, Any]) -> str:
    """The gather policy a z3leaf way ran with (``auto`` resolved), and for ``module`` its
    bucket size (elements; 0: one gather per module) and prefetch distance; ``-`` otherwise."""
    policy = row.get("gather")
    if not policy:
        return "-"
    settings = row.get("gather_settings")
    if settings:
        return f"{policy} (bucket {settings['bucket_elements']:,}, prefetch {settings['prefetch_distance']})"
    return str(policy)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "way":
        return WAY_LABELS.get(value, str(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "peak_rss_mb":
        return f"{max(value):.0f}"
    if key == "compile_s":
        return f"{value:.1f}"
    if key in ("median_step_ms", "median_step_cpu_ms"):
        return f"{value:.1f}"
    if key == "final_loss":
        return f"{value:.6f}"
    if key in ("all_gathers_per_step", "peak_gathered_elements"):
        return f"{value:g}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = TABLE_COLUMNS) -> str:
    """The rows side by side, one line per way, as a markdown table."""
    headers = [h for _, h in columns]
    body = []
    for row in rows:
        cells = [
            gather_cell(row) if k == "gather"
            else _cell(k, None if (k == "compile_s" and row.get("backend") is None) else row.get(k))
            for k, _ in columns
        ]
        if row.get("error") and columns and columns[0][0] == "way":
            cells[0] += " (FAILED)"
        body.append(cells)
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in body])


def module_goal(row: dict[str, Any], eager_strict: dict[str, Any]) -> dict[str, Any]:
    """``row`` (a way that ran ``gather="module"`` under strict limits) against eager ZeRO-3
    under strict limits: step time ratio (wall and CPU) and peak gathered elements, and
    whether it meets the goal (<= :data:`MODULE_GOAL_VS_EAGER_STRICT` x the step time at no
    higher peak gathered elements)."""
    ratio = row["median_step_ms"] / eager_strict["median_step_ms"]
    peak, ref_peak = row.get("peak_gathered_elements"), eager_strict.get("peak_gathered_elements")
    met_memory = peak is not None and ref_peak is not None and peak <= ref_peak
    met_time = ratio <= MODULE_GOAL_VS_EAGER_STRICT
    return {
        "way": row["way"], "gather_settings": row.get("gather_settings"),
        "ms": row["median_step_ms"], "eager_strict_ms": eager_strict["median_step_ms"], "ratio": ratio,
        "cpu_ratio": row["median_step_cpu_ms"] / eager_strict["median_step_cpu_ms"],
        "goal": MODULE_GOAL_VS_EAGER_STRICT, "met_time": met_time,
        "peak_gathered": peak, "eager_strict_peak_gathered": ref_peak, "met_memory": met_memory,
        "met": met_time and met_memory,
    }


def _strict_module_row(row: dict[str, Any]) -> bool:
    return row.get("gather") == "module" and row.get("zero_limits") == "strict"


def reading(rows: Sequence[dict[str, Any]]) -> str:
    """One paragraph that reads the table: graphs/breaks, step times against eager ZeRO-3 (with
    the spec's limits and with strict ones), all-gathers, peak gathered elements, losses; and,
    for the ways that ran ``gather="module"`` under strict limits, the goal against eager ZeRO-3
    with strict limits (step time and peak gathered elements)."""
    ok = [r for r in rows if not r.get("error")]
    by = {r["way"]: r for r in ok}
    eager, strict = by.get("eager"), by.get("eager_strict")
    parts = []
    for r in ok:
        if r["backend"] is None:
            continue
        text = f"{r['way']}: {r['graphs']} graphs / {r['graph_breaks']} breaks"
        if r.get("gather"):
            settings = r.get("gather_settings")
            text += f" (gather={r['gather']}" + (
                f", buckets of {settings['bucket_elements']:,} elements, prefetch distance "
                f"{settings['prefetch_distance']}" if settings else "") + ")"
        text += f", median step {r['median_step_ms']:.1f} ms"
        for ref in (eager, strict):
            if ref:
                text += (f", {r['median_step_ms'] / ref['median_step_ms']:.2f}x {ref['way']} "
                         f"(CPU {r['median_step_cpu_ms'] / ref['median_step_cpu_ms']:.2f}x)")
        if strict and r.get("zero_limits") == "strict" and r.get("peak_gathered_elements") is not None:
            text += (f", peak gathered {_cell('peak_gathered_elements', r['peak_gathered_elements'])} vs "
                     f"eager_strict's {_cell('peak_gathered_elements', strict.get('peak_gathered_elements'))}")
        parts.append(text + f", compile {r['compile_s']:.1f} s")
    if strict:
        for r in ok:
            if _strict_module_row(r):
                g = module_goal(r, strict)
                parts.append(
                    f"goal of gather=module, {r['way']} <= {g['goal']:g}x eager_strict at no higher peak gathered "
                    f"elements: step {g['ratio']:.2f}x ({'met' if g['met_time'] else 'NOT met'}; CPU "
                    f"{g['cpu_ratio']:.2f}x), peak {_cell('peak_gathered_elements', g['peak_gathered'])} vs "
                    f"{_cell('peak_gathered_elements', g['eager_strict_peak_gathered'])} "
                    f"({'met' if g['met_memory'] else 'NOT met'})"
                )
    for r in ok:
        if r["backend"] is None:
            parts.append(f"{r['way']}: median step {r['median_step_ms']:.1f} ms")
    if ok:
        gathers = ", ".join(f"{r['way']} {_cell('all_gathers_per_step', r['all_gathers_per_step'])}" for r in ok)
        parts.append(f"all-gathers per step: {gathers}")
        peaks = ", ".join(f"{r['way']} {_cell('peak_gathered_elements', r.get('peak_gathered_elements'))}" for r in ok)
        parts.append(f"peak gathered elements: {peaks}")
    if eager:
        match = [
            f"{r['way']} {'yes' if r['losses_match_eager'] else 'NO'} (max diff {r['loss_max_abs_diff']:.1e})"
            for r in ok
            if r["way"] != "eager"
        ]
        if match:
            parts.append(f"losses match eager (every step of every rank, tolerance {LOSS_TOLERANCE:g}): "
                         + ", ".join(match))
    elif ok:
        parts.append("losses not compared (eager ZeRO-3 did not run)")
    for r in rows:
        if r.get("error"):
            parts.append(f"{r['way']} FAILED: {r['error']}")
    return "; ".join(parts) + "."
