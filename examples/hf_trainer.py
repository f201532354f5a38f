"""Hugging Face ``Trainer`` + DeepSpeed ZeRO-3 with ``torch_compile_backend="z3leaf"``.

    python examples/hf_trainer.py                                   # 1 process
    torchrun --nproc_per_node 2 examples/hf_trainer.py              # 2 ranks
    torchrun --nproc_per_node 2 examples/hf_trainer.py --regional   # accelerate's regional compilation
    python -m leafpass.integrations.accelerate_cli launch --config_file cfg.yaml examples/hf_trainer.py

What a training script needs, and all it needs::

    import leafpass   # before the Trainer is built: accelerate then accepts "z3leaf"
    args = TrainingArguments(..., deepspeed=ds_config, torch_compile_backend="z3leaf")
    Trainer(model=model, args=args, train_dataset=data).train()

Each process trains a tiny Mixtral (random weights from a config, no download,
``experts_implementation="eager"``; DeepSpeed's default leaf classes flag its
``MixtralSparseMoeBlock``s) twice from the same weights and data: with a plain Trainer,
then with ``torch_compile_backend="z3leaf"`` (or ``--backend``, or the backend an
``accelerate launch`` config names). It prints both runs' losses on this rank, the engine
the Trainer trained, the graphs z3leaf compiled and Dynamo's graph breaks, and exits
with status 1 if the losses differ, the engine is not DeepSpeed's or the forward is not one
graph. ``--out DIR`` also writes what each rank saw to ``DIR/rank<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "LOCAL_RANK" not in os.environ:  # no launcher: one process, world size 1, on a free port
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))

import torch  # noqa: E402

import leafpass  # noqa: E402  (before the Trainer is built: accelerate accepts "z3leaf")

MIXTRAL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
DS_CONFIG = {
    "zero_optimization": {"stage": 3},  # leaf_module left out: Mixtral's MoE blocks are leaves by default
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,  # the Trainer's torch SGD
}
TOL = 1e-6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--backend", default=None,
                        help="torch_compile_backend of the compiled run (default: the one `accelerate launch` "
                             "was given, else z3leaf)")
    parser.add_argument("--regional", action="store_true",
                        help="accelerate's regional compilation (compile each decoder layer, not the model)")
    parser.add_argument("--out", default=None, help="write what this rank saw to OUT/rank<N>.json")
    return parser.parse_args(argv)


def dataset(n: int, seq: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, MIXTRAL["vocab_size"], (seq,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def cpu_process_group() -> dict:
    """On a machine with no GPU, accelerate 1.16 starts DeepSpeed's process group but counts
    one process (it finds no backend for the CPU), so every rank would train on the same
    batches. Set its state up with gloo first; the Trainer then uses it."""
    from accelerate.state import PartialState

    saved = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if saved is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = saved
    return {"accelerator_config": {"use_configured_state": True}}


def train(backend: str | None, steps: int, output_dir: str, extra_args: dict) -> dict:
    """One Trainer run; ``backend=None`` is the plain Trainer."""
    import torch._dynamo
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, MixtralConfig, Trainer, TrainingArguments

    class LossTrainer(Trainer):  # records this rank's own loss (the logged one is averaged over ranks)
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            self.batches.append(inputs["input_ids"].tolist())
            return loss

    AcceleratorState._reset_state()  # a second Trainer in this process builds its Accelerator anew
    compile_args = {} if backend is None else {"torch_compile_backend": backend}
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=2, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
        report_to=[], seed=0, disable_tqdm=True, dataloader_num_workers=0, deepspeed=DS_CONFIG, **compile_args,
        **extra_args,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**MIXTRAL), experts_implementation="eager")
    world = int(os.environ["WORLD_SIZE"])
    trainer = LossTrainer(model=model, args=args, train_dataset=dataset(2 * world * steps))
    trainer.losses, trainer.batches = [], []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with leafpass.record_graphs() as rec:
        trainer.train()
    engine = trainer.model_wrapped
    stats = leafpass.gather_stats(engine)  # None unless a z3leaf-compiled call of the whole model ran
    return {
        "losses": trainer.losses,
        "batches": trainer.batches,
        "logged": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "engine": f"{type(engine).__module__}.{type(engine).__name__}",
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        # engine.compile, or accelerate's regional compilation (module.compile of each block)
        "compiled": bool(getattr(engine, "is_compiled", False))
                    or any(m.__dict__.get("_compiled_call_impl") is not None for m in engine.module.modules()),
        "gather": None if stats is None else {"policy": stats.policy, "calls": stats.calls},
        "graphs": len(rec.graphs),  # compiled by z3leaf
        "dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],  # by any backend
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "break_reasons": {reason.splitlines()[0]: count  # first line of each, most frequent first
                          for reason, count in torch._dynamo.utils.counters["graph_break"].most_common(3)},
        "leaves": sorted({line.split()[1] for g in rec.graphs for line in leafpass.format_graph(g).splitlines()
                          if line.startswith("prefetch_all")}),
    }


def check(plain: dict, compiled: dict, regional: bool) -> list[str]:
    problems = []
    for name, run in (("plain", plain), ("z3leaf", compiled)):
        if run["engine"] != "deepspeed.runtime.engine.DeepSpeedEngine":
            problems.append(f"{name} Trainer trained {run['engine']} ({run['distributed_type']}), not DeepSpeed's engine")
    if len(plain["losses"]) != len(compiled["losses"]) or not plain["losses"]:
        problems.append(f"loss counts differ: {len(plain['losses'])} vs {len(compiled['losses'])}")
    for step, (a, b) in enumerate(zip(plain["losses"], compiled["losses"])):
        if abs(a - b) > TOL:
            problems.append(f"step {step}: compiled loss {b!r} differs from the plain Trainer's {a!r}")
    if not compiled["compiled"]:
        problems.append("the engine was not compiled")
    if not regional and (compiled["graphs"], compiled["graph_breaks"]) != (1, 0):
        problems.append(f"expected 1 graph and no graph break, got {compiled['graphs']} graphs and "
                        f"{compiled['graph_breaks']} breaks")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    # `accelerate launch` passes its dynamo config on in the environment, where every Trainer
    # of this process would read it: take it, so that the plain run is plain.
    launched = os.environ.pop("ACCELERATE_DYNAMO_BACKEND", "NO")
    args.backend = args.backend or (launched.lower() if launched != "NO" else "z3leaf")
    if os.environ.get("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "").lower() in ("1", "true"):
        args.regional = True
    if args.regional:
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "true"  # the Trainer has no field for it
    extra_args = {}
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # CPU only: keep DeepSpeed from JIT-building a shared-memory op it does not need (75-112 s)
        from leafpass.testing.deepspeed_cpu import skip_cpu_shm_comm_build

        skip_cpu_shm_comm_build()
        extra_args = cpu_process_group()
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with tempfile.TemporaryDirectory() as tmp:
        plain = train(None, args.steps, os.path.join(tmp, "plain"), extra_args)
        compiled = train(args.backend, args.steps, os.path.join(tmp, "z3leaf"), extra_args)
    problems = check(plain, compiled, args.regional)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump({"plain": plain, "z3leaf": compiled, "problems": problems, "world_size": world}, f)
    way = "regional compilation" if args.regional else "whole model"
    print(f"rank {rank}/{world}: engine {compiled['engine'].rsplit('.', 1)[1]}, "
          f"torch_compile_backend={args.backend!r} ({way}): {compiled['graphs']} graph(s), "
          f"{compiled['graph_breaks']} graph break(s), leaves {compiled['leaves']}", flush=True)
    for step, (a, b) in enumerate(zip(plain["losses"], compiled["losses"])):
        print(f"rank {rank} step {step}: loss plain {a:.7f}  compiled {b:.7f}", flush=True)
    if problems:
        print(f"rank {rank} FAILED:\n  " + "\n  ".join(problems), file=sys.stderr, flush=True)
        return 1
    print(f"rank {rank} OK: losses match the plain Trainer over {args.steps} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
