"""accelerate accepts leafpass's backend names, and nothing else; named backends with options.

Single process, no DeepSpeed: the Trainer + DeepSpeed ZeRO-3 runs on 2 ranks are in
tests/distributed/test_hf_trainer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import leafpass
from leafpass.capture import backend_options
from leafpass.integrations import accelerate as integration
from leafpass.integrations.backend_names import is_leafpass_backend_name, register_from_environment
from leafpass.testing.models import MoEBlock, TwoMoE
from leafpass.versions import in_range

accelerate = pytest.importorskip("accelerate")
from accelerate.utils import DynamoBackend, TorchDynamoPlugin  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_accelerate_is_supported():
    assert integration.installed()
    assert in_range(accelerate.__version__, *integration.SUPPORTED), accelerate.__version__


def test_z3leaf_is_accepted_and_handed_to_compile_by_its_name():
    plugin = TorchDynamoPlugin(backend="z3leaf")
    assert isinstance(plugin.backend, DynamoBackend)
    assert plugin.backend.value == "Z3LEAF"
    assert plugin.backend != DynamoBackend.NO
    assert plugin.to_kwargs() == {"backend": "z3leaf"}  # what accelerate passes to engine.compile / torch.compile
    assert DynamoBackend("Z3LEAF") is plugin.backend
    assert "Z3LEAF" in DynamoBackend


def test_built_in_names_unchanged():
    assert TorchDynamoPlugin(backend="inductor").backend is DynamoBackend.INDUCTOR
    assert TorchDynamoPlugin(backend="no").backend is DynamoBackend.NO
    assert "Z3LEAF" not in DynamoBackend.list()  # accelerate's own list is not extended


def test_other_names_are_still_refused_with_accelerates_message():
    with pytest.raises(ValueError, match=r"^'NOT_A_BACKEND' is not a valid DynamoBackend$"):
        TorchDynamoPlugin(backend="not_a_backend")
    assert "NOT_A_BACKEND" not in DynamoBackend


def test_a_torch_backend_that_is_not_leafpasss_is_still_refused():
    name = "leafpass_test_plain_backend"
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(compiler_fn=lambda gm, example_inputs: gm.forward, name=name)
    assert not is_leafpass_backend_name(name)
    with pytest.raises(ValueError, match=r"^'LEAFPASS_TEST_PLAIN_BACKEND' is not a valid DynamoBackend$"):
        TorchDynamoPlugin(backend=name)


def test_unregistered_z3leaf_name_says_how_to_register_it():
    with pytest.raises(ValueError, match=r"no z3leaf backend is registered as 'z3leaf_nowhere'.*"
                                         r"leafpass.register_backend\('z3leaf_nowhere', gather=...\)"):
        TorchDynamoPlugin(backend="z3leaf_nowhere")


def test_registered_name_is_accepted():
    leafpass.register_backend("z3leaf_test_step", gather="step", inner="aot_eager")
    plugin = TorchDynamoPlugin(backend="z3leaf_test_step")
    assert plugin.to_kwargs() == {"backend": "z3leaf_test_step"}


def test_unsupported_accelerate_version_names_version_and_fix(monkeypatch):
    leafpass.register_backend("z3leaf_test_version", inner="aot_eager")  # a name not looked up before
    monkeypatch.setattr(accelerate, "__version__", "1.15.2")
    with pytest.raises(ValueError, match=r"accepted by accelerate >=1.16,<1.17 \(tested with 1.16.0\); found "
                                         r"accelerate 1.15.2. Install a supported version \(pip install "
                                         r"'accelerate>=1.16,<1.17'"):
        TorchDynamoPlugin(backend="z3leaf_test_version")
    monkeypatch.setattr(accelerate, "__version__", "1.17.0")
    with pytest.raises(ValueError, match="found accelerate 1.17.0"):
        TorchDynamoPlugin(backend="z3leaf_test_version")
    assert TorchDynamoPlugin(backend="inductor").backend is DynamoBackend.INDUCTOR  # others unaffected


# ------------------------------------------------------------------ register_backend


def test_register_backend_compiles_with_its_options():
    backend = leafpass.register_backend("z3leaf_test_eager", inner="eager")
    assert leafpass.register_backend("z3leaf_test_eager", inner="eager") is backend  # same options: same backend
    torch._dynamo.reset()
    model = TwoMoE(8)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    x = torch.randn(4, 8)
    with leafpass.record_graphs() as rec:
        out = torch.compile(model, backend="z3leaf_test_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, model(x))
    assert len(rec.graphs) == 1
    assert [n.target for n in rec.graphs[0].graph.nodes if n.op == "call_module"] == ["moe1", "moe2"]
    assert backend_options(torch._dynamo.lookup_backend("z3leaf_test_eager")) == {"inner": "eager"}


def test_register_backend_refuses_bad_names_and_clashes():
    with pytest.raises(ValueError, match=r"backend name 'Z3leaf_Module' must be lowercase"):
        leafpass.register_backend("Z3leaf_Module", gather="module")
    with pytest.raises(ValueError, match=r"torch already has a backend named 'inductor' \(another backend\)"):
        leafpass.register_backend("inductor", gather="module")
    leafpass.register_backend("z3leaf_test_clash", gather="step")
    with pytest.raises(ValueError, match=r"already has a backend named 'z3leaf_test_clash' \(a z3leaf backend with "
                                         r"options \{'gather': 'step'\}\); choose another name"):
        leafpass.register_backend("z3leaf_test_clash", gather="module")
    with pytest.raises(ValueError, match="unknown z3leaf option"):
        leafpass.register_backend("z3leaf_test_typo", gathr="module")
    assert "z3leaf_test_typo" not in torch._dynamo.list_backends(exclude_tags=())


def test_environment_variable_registers_names():
    names = register_from_environment({"LEAFPASS_BACKENDS": '{"z3leaf_test_env": {"gather": "module"}}'})
    assert names == ["z3leaf_test_env"]
    assert backend_options(torch._dynamo.lookup_backend("z3leaf_test_env")) == {"gather": "module"}
    assert register_from_environment({}) == []
    with pytest.raises(ValueError, match=r"LEAFPASS_BACKENDS must be JSON mapping backend names to z3leaf options.*"
                                         r"could not parse"):
        register_from_environment({"LEAFPASS_BACKENDS": "z3leaf_module:gather=module"})
    with pytest.raises(ValueError, match=r"LEAFPASS_BACKENDS must be JSON mapping .*; got '\[1\]'"):
        register_from_environment({"LEAFPASS_BACKENDS": "[1]"})


# ------------------------------------------------------------------ when the patch is installed


def _run(code: str, env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=180, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_leafpass_imports_no_accelerate_and_patches_it_when_imported():
    seen = _run("""
        import inspect, json, sys
        import leafpass
        before = sorted(m for m in sys.modules if m.split(".")[0] in ("accelerate", "transformers"))
        from accelerate.utils import TorchDynamoPlugin
        import accelerate.utils.dataclasses as dataclasses
        print(json.dumps({"before": before, "backend": TorchDynamoPlugin(backend="z3leaf_env").to_kwargs(),
                          "source": "class DynamoBackend" in inspect.getsource(dataclasses),
                          "hooks_left": [type(f).__name__ for f in sys.meta_path if "AfterImport" in type(f).__name__]}))
    """, env={"LEAFPASS_BACKENDS": '{"z3leaf_env": {"gather": "step"}}'})
    assert seen == {"before": [], "backend": {"backend": "z3leaf_env"}, "source": True, "hooks_left": []}


def test_accelerate_imported_before_leafpass_is_patched_at_import():
    seen = _run("""
        import json
        from accelerate.utils import TorchDynamoPlugin
        try:
            TorchDynamoPlugin(backend="z3leaf")
            before = "accepted"
        except ValueError as error:
            before = str(error)
        import leafpass
        print(json.dumps({"before": before, "after": TorchDynamoPlugin(backend="z3leaf").to_kwargs()}))
    """)
    assert seen == {"before": "'Z3LEAF' is not a valid DynamoBackend", "after": {"backend": "z3leaf"}}


STARTUP_PTH = os.path.join(ROOT, "leafpass", "integrations", "leafpass-startup.pth")

_STARTUP = """
    import json, os, site, sys
    site.addpackage(os.path.dirname({pth!r}), os.path.basename({pth!r}), set())  # what site does at start
    loaded = "leafpass" in sys.modules or "torch" in sys.modules
    from accelerate.utils import TorchDynamoPlugin
    try:
        backend = TorchDynamoPlugin(backend="z3leaf").to_kwargs()
    except ValueError as error:
        backend = str(error)
    print(json.dumps({{"loaded_at_start": loaded, "backend": backend, "leafpass": "leafpass" in sys.modules}}))
"""


def test_startup_pth_makes_the_name_work_with_no_import_and_loads_nothing_at_start():
    """``pip install leafpass`` puts leafpass-startup.pth into site-packages: the Trainer's
    ``torch_compile_backend="z3leaf"`` then needs no ``import leafpass``; the interpreter's
    start imports neither leafpass nor torch."""
    seen = _run(_STARTUP.format(pth=STARTUP_PTH))
    assert seen == {"loaded_at_start": False, "backend": {"backend": "z3leaf"}, "leafpass": True}


def test_startup_pth_then_import_leafpass_before_accelerate():
    """Both the start-up hook (a copy of after_import.py run by path) and ``import leafpass``
    wait for accelerate's module: each copy's finder skips the other's (they once asked each
    other for the spec until RecursionError, found by gpu-check's dry run)."""
    code = _STARTUP.replace("    from accelerate.utils import TorchDynamoPlugin\n",
                            "    import leafpass\n    from accelerate.utils import TorchDynamoPlugin\n")
    assert "import leafpass" in code
    seen = _run(code.format(pth=STARTUP_PTH))
    assert seen == {"loaded_at_start": False, "backend": {"backend": "z3leaf"}, "leafpass": True}


def test_startup_hook_can_be_turned_off():
    seen = _run(_STARTUP.format(pth=STARTUP_PTH), env={"LEAFPASS_STARTUP_HOOK": "0"})
    assert seen == {"loaded_at_start": False, "backend": "'Z3LEAF' is not a valid DynamoBackend", "leafpass": False}


def test_wheel_installs_the_startup_pth_at_the_top_of_site_packages(tmp_path):
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path), ROOT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("leafpass-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "leafpass-startup.pth" in names and "leafpass/integrations/after_import.py" in names, names
    with open(STARTUP_PTH) as f:
        assert zipfile.ZipFile(wheel).read("leafpass-startup.pth").decode() == f.read()


# ------------------------------------------------------------------ accelerate used directly


def test_accelerator_with_dynamo_plugin_compiles_one_graph():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoMoE(8)
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    x = torch.randn(6, 8)
    expected = model(x)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True, dynamo_plugin=TorchDynamoPlugin(backend="z3leaf",
                                                                            options={"inner": "aot_eager"}))
        prepared = accelerator.prepare(model)
        torch._dynamo.utils.counters.clear()
        with leafpass.record_graphs() as rec:
            out = prepared(x)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    torch.testing.assert_close(out, expected)
    assert (len(rec.graphs), breaks) == (1, 0)
    assert [n.target for n in rec.graphs[0].graph.nodes if n.op == "call_module"] == ["moe1", "moe2"]


# ------------------------------------------------------------------ accelerate launch


def _launch_args(backend: str, **overrides) -> argparse.Namespace:
    values = dict(dynamo_backend=backend, dynamo_mode="default", dynamo_use_fullgraph=False,
                  dynamo_use_dynamic=None, dynamo_use_regional_compilation=True)
    return argparse.Namespace(**{**values, **overrides})


def test_deepspeed_launches_pass_a_leafpass_backend_on_to_the_ranks():
    from leafpass.integrations.accelerate_cli import _passing_dynamo_config

    prepare = _passing_dynamo_config(lambda args: (["cmd"], {"KEPT": "1"}))
    cmd, env = prepare(_launch_args("Z3LEAF"))
    assert cmd == ["cmd"]
    assert env == {"KEPT": "1", "ACCELERATE_DYNAMO_BACKEND": "Z3LEAF", "ACCELERATE_DYNAMO_MODE": "default",
                   "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "True"}
    # a variable the user exported wins; other backends are left as accelerate leaves them
    _, env = _passing_dynamo_config(lambda args: ([], {"ACCELERATE_DYNAMO_BACKEND": "NO"}))(_launch_args("z3leaf"))
    assert env["ACCELERATE_DYNAMO_BACKEND"] == "NO"
    assert _passing_dynamo_config(lambda args: ([], {}))(_launch_args("INDUCTOR")) == ([], {})


def test_launcher_command_accepts_leafpass_names_in_its_own_process(tmp_path):
    """``accelerate launch`` checks the config's name before starting anything: a one-process
    launch (no DeepSpeed) of a script that prints what its rank was given."""
    script = tmp_path / "show.py"
    script.write_text("import os\nprint('BACKEND', os.environ.get('ACCELERATE_DYNAMO_BACKEND'))\n")
    config = tmp_path / "config.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                      "num_machines: 1\nmachine_rank: 0\nuse_cpu: true\nmixed_precision: 'no'\n"
                      "dynamo_config:\n  dynamo_backend: Z3LEAF\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = ["launch", "--config_file", str(config), str(script)]
    plain = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", *command],
                           capture_output=True, text=True, timeout=180, env=env)
    assert plain.returncode != 0 and "Unknown dynamo backend: Z3LEAF" in plain.stderr, plain.stderr[-2000:]
    ours = subprocess.run([sys.executable, "-m", "leafpass.integrations.accelerate_cli", *command],
                          capture_output=True, text=True, timeout=180, env=env)
    assert ours.returncode == 0, ours.stdout + ours.stderr[-2000:]
    assert "BACKEND Z3LEAF" in ours.stdout, ours.stdout
