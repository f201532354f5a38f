"""ZeRO-3 training steps of a transformers Mixtral on CUDA GPUs: eager vs DeepSpeed + inductor vs z3leaf.

    python benchmarks/gpu_mixtral.py               # one rank per GPU (NCCL), bf16; what scripts/gpu-check.sh runs
    python benchmarks/gpu_mixtral.py --smoke       # CPU, gloo, one rank, fp32, a tiny model: checks the script only

Three ways train the same Mixtral (``MixtralForCausalLM`` from a config, eager experts, no
download) on the same token batches, each in fresh rank processes
(:func:`leafpass.testing.distributed.run_ranks`), under DeepSpeed ZeRO-3 with its default
limits, its ``leaf_module`` defaults flagging ``MixtralSparseMoeBlock`` as the leaf, bf16
and SGD:

* ``eager``: the engine not compiled (the reference);
* ``inductor``: ``engine.compile(backend="inductor")`` (DeepSpeed + inductor);
* ``z3leaf``: ``engine.compile(backend="z3leaf")`` with inductor as the inner compiler.

Columns: graphs Dynamo compiled and graph breaks (``torch._dynamo.utils.counters``),
compile seconds (first step minus a steady step), median steady step (forward, backward,
optimizer step, ``torch.cuda.synchronize`` after each), the ratio to eager, peak GPU memory
(``torch.cuda.max_memory_allocated`` on rank 0), the final loss and the largest difference
from eager's loss at the same step on any rank (bf16: compare against ``--loss-tol``).
Writes ``OUT/gpu_mixtral.md`` (the table) and ``OUT/gpu_mixtral.json`` (rows and settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WAYS = ("eager", "inductor", "z3leaf")


@dataclasses.dataclass(frozen=True)
class Spec:
    hidden: int = 256
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    intermediate: int = 512
    vocab: int = 1024
    batch: int = 4
    seq: int = 128
    steps: int = 10
    warmup: int = 3
    dtype: str = "bfloat16"
    device: str = "cuda"  # "cuda": NCCL, one rank per GPU; "cpu": gloo
    ranks: int = 1
    inner: str = "inductor"  # z3leaf's inner compiler
    lr: float = 1e-2

    @property
    def process_group(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


SMOKE = dict(hidden=32, layers=1, experts=4, intermediate=64, vocab=64, batch=2, seq=8, steps=2, warmup=1,
             dtype="float32", device="cpu", ranks=1, inner="eager")


def _config(spec: Spec) -> dict[str, Any]:
    from leafpass.testing.distributed import zero3_config

    bf16 = spec.dtype == "bfloat16"
    return zero3_config(spec.batch, param_persistence_threshold=100_000, bf16={"enabled": bf16})


def _model(spec: Spec):
    import torch
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=max(spec.hidden // 64, 2), num_key_value_heads=2,
        num_local_experts=spec.experts, num_experts_per_tok=spec.top_k, max_position_embeddings=spec.seq,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    model.train()
    return model


def _rank_body(rank: int, world_size: int, way: str, spec: Spec) -> dict[str, Any]:
    import deepspeed
    import torch

    device = torch.device(spec.device, rank) if spec.device == "cuda" else torch.device("cpu")
    model = _model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config(spec))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    if way == "inductor":
        engine.compile(backend="inductor")
    elif way == "z3leaf":
        import leafpass  # noqa: F401  (the backend is also found by its entry point)

        engine.compile(backend="z3leaf", compile_kwargs={"options": {"inner": spec.inner}})
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen) for _ in range(spec.steps)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for ids in batches:
        ids = ids.to(device)
        sync()
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach().float()))
    counters = torch._dynamo.utils.counters
    return {
        "losses": losses,
        "times": times,
        "graphs": counters["stats"]["unique_graphs"] if way != "eager" else 0,
        "graph_breaks": sum(counters["graph_break"].values()) if way != "eager" else 0,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "flagged": sorted(n for n, m in engine.module.named_modules() if getattr(m, "_z3_leaf", False)),
    }


def run_way(way: str, spec: Spec, timeout: float) -> dict[str, Any]:
    from leafpass.testing.distributed import run_ranks

    env = {"TORCHINDUCTOR_COMPILE_THREADS": "4"} if spec.device == "cuda" else None
    start = time.monotonic()
    try:
        ranks = run_ranks(_rank_body, way, spec, world_size=spec.ranks, timeout=timeout, pg_timeout=min(timeout, 300),
                          process_group=spec.process_group, env=env)
    except Exception as exc:  # noqa: BLE001 - one failed way is a row, not the end of the run
        return {"way": way, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}",
                "wall_s": time.monotonic() - start}
    r0 = ranks[0]
    steady = r0["times"][spec.warmup:] or r0["times"][-1:]
    median = statistics.median(steady)
    return {
        "way": way,
        "graphs": r0["graphs"],
        "graph_breaks": r0["graph_breaks"],
        "compile_s": max(r0["times"][0] - median, 0.0),
        "step_ms": 1000 * median,
        "peak_mib": r0["peak_mib"],
        "final_loss": r0["losses"][-1],
        "losses": [r["losses"] for r in ranks],
        "leaves": len(r0["flagged"]),
        "wall_s": time.monotonic() - start,
    }


def attach_parity(rows: list[dict[str, Any]], tol: float) -> None:
    eager = next((r for r in rows if r["way"] == "eager" and "error" not in r), None)
    for row in rows:
        if eager is None or "error" in row:
            continue
        row["vs_eager"] = row["step_ms"] / eager["step_ms"]
        row["max_loss_diff"] = max(abs(a - b) for mine, ref in zip(row["losses"], eager["losses"])
                                   for a, b in zip(mine, ref))
        row["parity"] = row["max_loss_diff"] <= tol


COLUMNS = [("way", "way"), ("graphs", "graphs"), ("graph_breaks", "breaks"), ("compile_s", "compile s"),
           ("step_ms", "step ms"), ("vs_eager", "vs eager"), ("peak_mib", "peak GPU MiB"),
           ("final_loss", "final loss"), ("max_loss_diff", "max loss diff vs eager"), ("parity", "parity")]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['way']} | failed: {row['error']} |" + " |" * (len(COLUMNS) - 2))
        else:
            lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def environment(spec: Spec) -> dict[str, Any]:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("deepspeed", "transformers", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            env[name] = None
    if spec.device == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, 1 rank, fp32, tiny model (no GPU needed)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    parser.add_argument("--ranks", type=int, default=None, help="ranks (default: every GPU; 1 with --smoke)")
    for field in ("hidden", "layers", "experts", "steps", "warmup", "batch", "seq"):
        parser.add_argument(f"--{field}", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per way before its ranks are killed")
    parser.add_argument("--loss-tol", type=float, default=None,
                        help="largest |loss - eager loss| counted as parity (default 5e-2 in bf16, 1e-4 in fp32)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for gpu_mixtral.md and gpu_mixtral.json")
    parser.add_argument("--parse-only", action="store_true", help="print the settings and exit (for dry runs)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.ways.split(",")) - set(WAYS))
    if unknown:
        parser.error(f"--ways: unknown way(s) {unknown}; choose from {list(WAYS)}")
    return args


def spec_from(args: argparse.Namespace) -> Spec:
    values = dict(SMOKE) if args.smoke else {}
    for field in ("hidden", "layers", "experts", "steps", "warmup", "batch", "seq", "ranks"):
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    if "ranks" not in values:
        import torch

        values["ranks"] = max(torch.cuda.device_count(), 1)
    return Spec(**values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = spec_from(args)
    tol = args.loss_tol if args.loss_tol is not None else (5e-2 if spec.dtype == "bfloat16" else 1e-4)
    ways = args.ways.split(",")
    if args.parse_only:
        print(json.dumps({"spec": dataclasses.asdict(spec), "ways": ways, "loss_tol": tol}))
        return 0
    if spec.device == "cuda":
        import torch

        if torch.cuda.device_count() < spec.ranks:
            print(f"gpu_mixtral: {spec.ranks} rank(s) need as many CUDA GPUs; torch sees "
                  f"{torch.cuda.device_count()} (use --smoke on a machine without one)", file=sys.stderr)
            return 2
    rows = [run_way(way, spec, args.timeout) for way in ways]
    attach_parity(rows, tol)
    table = markdown_table(rows)
    env = environment(spec)
    heading = (f"Mixtral hidden {spec.hidden}, {spec.layers} layers, {spec.experts} experts top-{spec.top_k}, "
               f"{spec.batch}x{spec.seq} tokens a rank, {spec.dtype}, {spec.ranks} rank(s) on {spec.device} "
               f"({spec.process_group}), {spec.steps} steps ({spec.warmup} warm-up), SGD; "
               + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(heading)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_mixtral.md").write_text(heading + "\n\n" + table + "\n")
    (out / "gpu_mixtral.json").write_text(json.dumps(
        {"spec": dataclasses.asdict(spec), "loss_tol": tol, "environment": env, "rows": rows}, indent=1))
    failed = [r["way"] for r in rows if "error" in r or r.get("parity") is False]
    if failed:
        print(f"gpu_mixtral: failed or off parity: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
