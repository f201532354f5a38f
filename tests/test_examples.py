"""Run every script in ``examples/`` and check it succeeds and prints what it should.

Not run here: ``explain_target.py`` (a target for ``python -m leafpass explain``, tested
with the explain CLI) and scripts whose name contains ``deepspeed`` (tested with the
distributed tests). A new example is picked up automatically and must exit with 0.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SKIPPED = {"explain_target.py", "explain_qwen3_moe.py"}  # targets of `explain`, run by test_explain.py

#: Text each example must print (checked in order of appearance).
EXPECTED_STDOUT = {
    "plain_model.py": [
        "flagged 2 leaves: ['moe1', 'moe2']",
        "graphs: 1, graph breaks: 0",
        "prefetch_all moe1 (17 params)\nt1 = moe1(t0)",
        "prefetch_all moe2 (17 params)\nt3 = moe2(t2)",
        "OK: one graph, outputs and gradients match eager",
    ],
    "transformers_moe.py": [
        "flagged 2 leaves: ['model.layers.0.mlp', 'model.layers.1.mlp']",
        "step 2: loss",
        "graphs: 1, graph breaks: 0",
        "prefetch_all model.layers.0.mlp (3 params)",
        "prefetch_all model.layers.1.mlp (3 params)",
        "OK: one graph, losses match eager",
    ],
    "hf_trainer.py": [
        "rank 0/1: engine DeepSpeedEngine, torch_compile_backend='z3leaf_aot_eager' (whole model): 1 graph(s), "
        "0 graph break(s), leaves ['model.layers.0.mlp', 'model.layers.1.mlp']",
        "rank 0 step 1: loss plain",
        "rank 0 OK: losses match the plain Trainer over 2 steps",
    ],
}
#: Examples that need an optional extra.
NEEDS = {"transformers_moe.py": "transformers", "hf_trainer.py": "accelerate"}
#: Arguments and environment of examples that take them. hf_trainer.py: one process (its
#: default), aot_eager under a registered name (inductor would compile for a minute more);
#: tests/distributed/test_hf_trainer.py runs it on 2 ranks.
ARGS = {"hf_trainer.py": ["--steps", "2", "--backend", "z3leaf_aot_eager"]}
ENV = {"hf_trainer.py": {"LEAFPASS_BACKENDS": '{"z3leaf_aot_eager": {"inner": "aot_eager"}}', "DS_ACCELERATOR": "cpu"}}
TIMEOUT_S = 180  # each runs in well under 30 s on an idle CPU; room for a busy machine


def example_scripts():
    return sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in SKIPPED and "deepspeed" not in p.name)


def example_params():
    marks = {"transformers": pytest.mark.transformers, "accelerate": pytest.mark.transformers}
    return [pytest.param(name, marks=[marks[NEEDS[name]]] if name in NEEDS else [], id=name)
            for name in example_scripts()]


def test_the_known_examples_are_found():
    assert set(EXPECTED_STDOUT) <= set(example_scripts())


@pytest.mark.parametrize("name", example_params())
def test_example_runs(name):
    extra = NEEDS.get(name)
    if extra and importlib.util.find_spec(extra) is None:
        pytest.skip(f"{name} needs the optional extra {extra!r}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", 
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           **ENV.get(name, {})}
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *ARGS.get(name, [])], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    report = f"{name} exited with {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 0, report
    assert result.stdout.strip(), report
    position = 0
    for text in EXPECTED_STDOUT.get(name, []):
        found = result.stdout.find(text, position)
        assert found >= 0, f"missing (in order) {text!r}\n{report}"
        position = found + len(text)
