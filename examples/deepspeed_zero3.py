"""Train a two-block MoE under DeepSpeed ZeRO-3 on 2 CPU ranks, compiled with z3leaf.

    .venv/bin/python examples/deepspeed_zero3.py             # 3 steps, inner compiler aot_eager
    .venv/bin/python examples/deepspeed_zero3.py --inner inductor --steps 5

Each rank builds the same ``TwoMoE``, flags its ``MoEBlock``s as ZeRO-3 leaves with
DeepSpeed's own API *before* ``deepspeed.initialize``, and trains two engines from the same
weights on its own batch: one eager, one compiled with ``engine.compile(backend="z3leaf")``.
The batches are chosen so that the two ranks route tokens to different experts. The
script prints what both engines did and exits non-zero if the compiled one diverges or does
not compile the forward into one graph (DeepSpeed's default limits: ``gather="auto"`` picks
``"step"``).

The ranks are started by ``leafpass.testing.distributed.run_ranks`` (gloo, one thread
each, DeepSpeed's communication attached without its CPU JIT builds). In your own
training script, launched by ``torchrun`` or ``deepspeed``, the body of ``train`` is all
you need.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from leafpass.testing.distributed import run_ranks, zero3_config


def train(rank: int, world_size: int, steps: int, inner: str) -> dict:
    import logging

    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger
    from deepspeed.utils import set_z3_leaf_modules

    import leafpass
    from leafpass.tools.deepspeed_probe import count_collectives
    from leafpass.testing.models import MoEBlock, TwoMoE, divergent_routing_batches

    deepspeed_logger.setLevel(logging.ERROR)  # it logs to stdout; keep stdout for the summary
    torch.manual_seed(0)
    base = TwoMoE(d=16, n_experts=4, top_k=2)
    batches, _routing = divergent_routing_batches(base, world_size, n_tokens=8)
    x, y = batches[rank]
    set_z3_leaf_modules(base, [MoEBlock])  # before deepspeed.initialize

    result: dict = {}
    for mode in ("eager", "z3leaf"):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # a config "Adam" would JIT-build FusedAdam
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_config())
        if mode == "z3leaf":
            engine.compile(backend="z3leaf", compile_kwargs={"options": {"inner": inner}})
        losses, gathers, reduces = [], [], []
        with leafpass.record_graphs() as rec:
            for _ in range(steps):
                with count_collectives() as counter:
                    loss = F.mse_loss(engine(x), y)
                gathers.append(counter.all_gather)
                reduces.append(counter.all_reduce)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
        result[mode] = {
            "losses": losses,
            "forward_all_gathers": gathers,
            "forward_all_reduces": reduces,
            "graphs": len(rec.graphs),
            "prefetches": sum(len(leafpass.leaf_schedule(gm)) for gm in rec.graphs),
            "gather": getattr(leafpass.gather_stats(engine.module), "policy", None),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--inner", default="aot_eager", choices=("aot_eager", "inductor", "eager"))
    args = parser.parse_args(argv)

    per_rank = run_ranks(train, args.steps, args.inner, world_size=2, timeout=300)

    ok = True
    print(f"DeepSpeed ZeRO-3, 2 CPU ranks, {args.steps} steps, engine.compile(backend=\"z3leaf\")")
    for rank, res in enumerate(per_rank):
        eager, compiled = res["eager"], res["z3leaf"]
        diff = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"]))
        ok &= diff <= 1e-5 and compiled["graphs"] == 1
        print(f"rank {rank}: losses match eager ZeRO-3: {'yes' if diff <= 1e-5 else f'NO (max diff {diff:.2e})'}; "
              f"all-gathers / all-reduces per forward: eager {eager['forward_all_gathers']} / "
              f"{eager['forward_all_reduces']}, z3leaf {compiled['forward_all_gathers']} / "
              f"{compiled['forward_all_reduces']}")
    compiled = per_rank[0]["z3leaf"]
    print(f"graphs z3leaf compiled (rank 0): {compiled['graphs']} (gather={compiled['gather']!r}); "
          f"prefetch_all calls in it: {compiled['prefetches']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
