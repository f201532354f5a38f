"""What ``import leafpass`` costs every eager module call.

leafpass wraps ``nn.Module.__call__`` once, at import (``leafpass.capture``), so the flag
is read wherever Dynamo traces a module call. Outside Dynamo the wrapper runs on every
module call of the process, compiled or not. This benchmark times an eager forward of a
chain of ``--modules`` tiny modules (``nn.Linear(--width, --width)`` in ``nn.Sequential``:
one ``__call__`` per module plus the container's) with ``nn.Module.__call__`` as PyTorch
defines it and with leafpass's wrapper installed, in one process, in alternating rounds
(so both see the same machine), and reports the median per forward, the difference per
module call, and the relative cost.

Prints a table and writes ``benchmarks/results/module_call_overhead.json``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import common  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", type=int, default=1000, help="tiny modules in the chain (default 1000)")
    p.add_argument("--width", type=int, default=4, help="features of each nn.Linear (default 4)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds of each way (default 15)")
    p.add_argument("--forwards", type=int, default=20, help="forwards timed per round (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(common.default_out_path("module_call_overhead")))
    return p.parse_args(argv)


def _forward_seconds(model: nn.Module, x: torch.Tensor, forwards: int) -> float:
    """Seconds per forward, averaged over ``forwards`` calls (after one untimed call)."""
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(forwards):
            model(x)
        return (time.perf_counter() - start) / forwards


def measure(args: argparse.Namespace) -> dict[str, Any]:
    plain_call = nn.Module.__call__  # PyTorch's own, before leafpass is imported
    import leafpass  # noqa: F401  (installs the wrapper)

    wrapped_call = nn.Module.__call__
    if wrapped_call is plain_call:
        raise RuntimeError("importing leafpass did not replace nn.Module.__call__; nothing to measure")
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.modules)])
    x = torch.randn(2, args.width)
    calls = args.modules + 1  # each Linear and the Sequential
    times: dict[str, list[float]] = {"plain": [], "leafpass": []}
    gc.disable()
    try:
        for _ in range(args.rounds):
            for way, call in (("plain", plain_call), ("leafpass", wrapped_call)):
                nn.Module.__call__ = call
                times[way].append(_forward_seconds(model, x, args.forwards))
    finally:
        nn.Module.__call__ = wrapped_call
        gc.enable()
    plain = statistics.median(times["plain"])
    wrapped = statistics.median(times["leafpass"])
    rows = [
        {"way": "torch (no leafpass)", "forward_us": plain * 1e6, "per_call_us": plain * 1e6 / calls},
        {"way": "import leafpass", "forward_us": wrapped * 1e6, "per_call_us": wrapped * 1e6 / calls},
    ]
    return {
        "rows": rows,
        "module_calls_per_forward": calls,
        "overhead_per_call_us": (wrapped - plain) * 1e6 / calls,
        "overhead_ratio": wrapped / plain,
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    result = measure(args)
    print(common.markdown_table(
        result["rows"], [("way", "way"), ("forward_us", "eager forward (us, median)"), ("per_call_us", "per module call (us)")]
    ))
    print(f"\nleafpass's __call__ wrapper: {result['overhead_per_call_us']:+.2f} us per module call, "
          f"{(result['overhead_ratio'] - 1) * 100:+.1f}% on this forward "
          f"({result['module_calls_per_forward']} module calls, {args.rounds} rounds x {args.forwards} forwards)")
    payload = {"benchmark": "module_call_overhead", "args": vars(args),
               "environment": common.environment(threads=threads), **result}
    path = common.write_json(args.out, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
