"""transformers' Trainer + DeepSpeed ZeRO-3 + ``torch_compile_backend`` naming a z3leaf backend.

Two launches of ``examples/hf_trainer.py`` on 2 CPU ranks (gloo), each a fixture shared by
the tests that read it. In each, every rank trains a tiny Mixtral (eager experts, DeepSpeed's
default leaf classes) twice from the same weights and batches: a plain Trainer, then the
same Trainer compiled, and writes what it saw (losses, batches, engine, graphs, breaks).

* ``torchrun``: ``torchrun --nproc_per_node 2``, ``torch_compile_backend="z3leaf"`` (inductor
  for the non-leaf pieces), the whole model compiled (``engine.compile`` by accelerate's
  ``_prepare_deepspeed``);
* ``accelerate_launch``: ``python -m leafpass.integrations.accelerate_cli launch`` with a
  config file naming ``Z3LEAF_AOT_EAGER`` (registered in every process from
  ``LEAFPASS_BACKENDS`` with ``inner="aot_eager"``: a named backend with options), DeepSpeed,
  regional compilation.

And accelerate in a custom loop (``accelerator_loop``, ranks started by ``run_ranks``):
``Accelerator(deepspeed_plugin=..., dynamo_plugin=TorchDynamoPlugin(backend="z3leaf",
options=...))`` against the same loop with no dynamo plugin, on a two-block MoE whose
batches route tokens differently on the two ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leafpass.testing.distributed import free_port, run_ranks, zero3_config
from tests.distributed.shared import extension_builds

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "hf_trainer.py"
STEPS = 4
TOL = 1e-6
BACKEND = "z3leaf_aot_eager"
LEAVES = ["model.layers.0.mlp", "model.layers.1.mlp"]
TIMEOUT_S = 300  # each launch takes 25-75 s on 2 busy cores

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.transformers,
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("transformers", "accelerate", "deepspeed")),
                       reason="needs the transformers, accelerate and deepspeed extras"),
]


def _launch(command: list[str], out: Path) -> list[dict]:
    """Run ``command`` in its own process group with a hard timeout; return each rank's report."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "LEAFPASS_BACKENDS": json.dumps({BACKEND: {"inner": "aot_eager"}}), "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith("ACCELERATE_")]:
        del env[key]
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} still running after {TIMEOUT_S}s; killed. Output:\n{output[-6000:]}")
    print(f"{command[2] if command[1] == '-m' else Path(command[0]).name}: {time.monotonic() - start:.1f}s")
    assert proc.returncode == 0, f"{' '.join(command)} exited with {proc.returncode}:\n{output[-6000:]}"
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    return reports


@pytest.fixture(scope="module")
def builds_before() -> set[str]:
    return extension_builds()


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory, builds_before) -> list[dict]:
    out = tmp_path_factory.mktemp("torchrun")
    torchrun_main = [sys.executable, "-m", "torch.distributed.run"]
    return _launch([*torchrun_main, "--nproc_per_node", "2", "--master_port", str(free_port()), str(EXAMPLE),
                    "--steps", str(STEPS), "--backend", "z3leaf", "--out", str(out)], out)


@pytest.fixture(scope="module")
def accelerate_launch(tmp_path_factory, builds_before) -> list[dict]:
    out = tmp_path_factory.mktemp("accelerate")
    ds_config = out / "ds_config.json"
    ds_config.write_text(json.dumps({
        "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}))
    config = out / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds_config}\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\n"
        f"dynamo_config:\n  dynamo_backend: {BACKEND.upper()}\n  dynamo_use_regional_compilation: true\n")
    return _launch([sys.executable, "-m", "leafpass.integrations.accelerate_cli", "launch", "--config_file",
                    str(config), "--main_process_port", str(free_port()), str(EXAMPLE), "--steps", str(STEPS),
                    "--out", str(out)], out)


def _accelerator_loop_body(rank: int, world_size: int, steps: int) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, TorchDynamoPlugin

    import leafpass
    from leafpass.testing.models import MoEBlock, TwoMoE, divergent_routing_batches

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")  # on CPU accelerate finds no backend by itself (docs/huggingface.md)
    torch.manual_seed(0)
    base = TwoMoE(d=16, n_experts=4, top_k=2)
    batches, _ = divergent_routing_batches(base, world_size, n_tokens=8)
    x, y = batches[rank]
    leafpass.set_z3_leaf_modules(base, [MoEBlock])
    result = {}
    for way in ("plain", "z3leaf"):
        AcceleratorState._reset_state()
        dynamo = TorchDynamoPlugin(backend="z3leaf", options={"inner": "aot_eager"}) if way == "z3leaf" else None
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=zero3_config(1)),
                                  dynamo_plugin=dynamo)
        model = copy.deepcopy(base)
        engine, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        losses = []
        with leafpass.record_graphs() as rec:
            for _ in range(steps):
                loss = F.mse_loss(engine(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        result[way] = {"losses": losses, "engine": type(engine).__name__, "processes": accelerator.num_processes,
                       "distributed_type": str(accelerator.distributed_type), "graphs": len(rec.graphs),
                       "breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
                       "stats": None if leafpass.gather_stats(engine) is None else leafpass.gather_stats(engine).policy}
    return result


@pytest.fixture(scope="module")
def accelerator_loop(builds_before) -> list[dict]:
    return run_ranks(_accelerator_loop_body, STEPS, world_size=2, timeout=TIMEOUT_S, pg_timeout=90)


def _assert_trainer_runs(reports: list[dict], what: str) -> None:
    batches = []
    for rank, report in enumerate(reports):
        assert report["problems"] == [], (what, rank, report["problems"])  # the example's own checks
        for way in ("plain", "z3leaf"):
            run = report[way]
            assert run["engine"] == "deepspeed.runtime.engine.DeepSpeedEngine", (what, rank, way, run["engine"])
            assert run["distributed_type"] == "DistributedType.DEEPSPEED", (what, rank, way)
            assert run["num_processes"] == 2, (what, rank, way, run["num_processes"])
        plain, compiled = report["plain"], report["z3leaf"]
        assert plain["batches"] == compiled["batches"], (what, rank)
        assert len(plain["losses"]) == len(compiled["losses"]) == STEPS, (what, rank, plain["losses"])
        diffs = [abs(a - b) for a, b in zip(plain["losses"], compiled["losses"])]
        assert max(diffs) <= TOL, (what, rank, plain["losses"], compiled["losses"])
        print(f"{what} rank {rank}: max loss difference {max(diffs):.2e}, {compiled['graphs']} graph(s), "
              f"{compiled['graph_breaks']} break(s)")
        assert len(set(plain["losses"])) > 1, (what, rank, plain["losses"])  # it trained
        assert compiled["compiled"] and not plain["compiled"], (what, rank)
        assert plain["graphs"] == 0, (what, rank, plain["graphs"])
        assert compiled["leaves"] == LEAVES, (what, rank, compiled["leaves"])
        batches.append(plain["batches"])
    assert batches[0] != batches[1], what  # each rank trained on its own data


@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_trainer_under_torchrun_matches_the_plain_trainer_every_step(torchrun):
    _assert_trainer_runs(torchrun, "torchrun")


@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_trainer_compiles_the_forward_into_one_graph(torchrun):
    for rank, report in enumerate(torchrun):
        run = report["z3leaf"]
        assert (run["graphs"], run["graph_breaks"]) == (1, 0), (rank, run["graphs"], run["break_reasons"])
        assert run["gather"] == {"policy": "step", "calls": STEPS}, (rank, run["gather"])  # auto -> step


@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_accelerate_launch_config_with_regional_compilation_matches_every_step(accelerate_launch):
    _assert_trainer_runs(accelerate_launch, "accelerate launch, regional")


@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_regional_compilation_leaves_deepspeeds_hooks_in_place(accelerate_launch):
    """Each decoder layer is compiled on its own, so no compiled call is the model's root:
    leafpass's gather policies do not apply, and DeepSpeed's hooks split every region at its
    hooked submodules (docs/huggingface.md gives the counts). The leaves stay opaque."""
    for rank, report in enumerate(accelerate_launch):
        run = report["z3leaf"]
        assert run["gather"] is None, (rank, run["gather"])
        assert run["graphs"] > 1 and run["graph_breaks"] > 0, (rank, run["graphs"], run["graph_breaks"])


@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_accelerator_custom_loop_under_deepspeed_matches_and_compiles_one_graph(accelerator_loop):
    for rank, result in enumerate(accelerator_loop):
        plain, compiled = result["plain"], result["z3leaf"]
        for run in (plain, compiled):
            assert (run["engine"], run["distributed_type"], run["processes"]) == (
                "DeepSpeedEngine", "DistributedType.DEEPSPEED", 2), (rank, run)
        diffs = [abs(a - b) for a, b in zip(plain["losses"], compiled["losses"])]
        assert len(diffs) == STEPS and max(diffs) <= TOL, (rank, plain["losses"], compiled["losses"])
        assert (plain["graphs"], compiled["graphs"], compiled["breaks"]) == (0, 1, 0), (rank, compiled)
        assert compiled["stats"] == "step", (rank, compiled["stats"])
    assert accelerator_loop[0]["plain"]["losses"] != accelerator_loop[1]["plain"]["losses"]  # own batches


@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_no_deepspeed_extension_was_built(torchrun, accelerate_launch, accelerator_loop, builds_before):
    assert extension_builds() - builds_before == set()
