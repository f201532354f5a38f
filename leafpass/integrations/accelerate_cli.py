"""``accelerate launch`` with leafpass's backend names::

    python -m leafpass.integrations.accelerate_cli launch --config_file cfg.yaml train.py

is ``accelerate launch --config_file cfg.yaml train.py`` (any ``accelerate`` subcommand
works) in a process where accelerate accepts leafpass's names: the launcher checks the
config's ``dynamo_backend`` in its own process, which runs none of your code. The ranks it
starts check the name again, in ``train.py``, which must ``import leafpass`` before the
Trainer or ``Accelerator`` is built. Names given to ``leafpass.register_backend`` must be
registered in the launcher too: use ``LEAFPASS_BACKENDS``.

accelerate 1.16's DeepSpeed launcher drops the config's ``dynamo_config`` (the ranks get no
``ACCELERATE_DYNAMO_*`` variable, so nothing is compiled, silently); for a leafpass name
this command passes it on as accelerate's other launchers do.
"""

from __future__ import annotations

import sys

from .accelerate import install
from .backend_names import is_leafpass_backend_name

__all__ = ["main"]


def _passing_dynamo_config(prepare):
    """accelerate's DeepSpeed launcher (``prepare_deepspeed_cmd_env``, 1.16) hands the ranks no
    dynamo setting: a config naming a backend is ignored and nothing is compiled. For a
    leafpass backend name, hand them the same ``ACCELERATE_DYNAMO_*`` variables accelerate's
    other launchers set (a variable already in the environment is kept)."""

    def prepare_deepspeed_cmd_env(args):
        cmd, env = prepare(args)
        backend = str(getattr(args, "dynamo_backend", None) or "no")
        if is_leafpass_backend_name(backend.lower()):
            given = {
                "ACCELERATE_DYNAMO_BACKEND": backend.upper(),
                "ACCELERATE_DYNAMO_MODE": str(getattr(args, "dynamo_mode", None) or "default"),
                "ACCELERATE_DYNAMO_USE_FULLGRAPH": str(bool(getattr(args, "dynamo_use_fullgraph", False))),
                "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION":
                    str(bool(getattr(args, "dynamo_use_regional_compilation", False))),
            }
            if getattr(args, "dynamo_use_dynamic", None) is not None:
                given["ACCELERATE_DYNAMO_USE_DYNAMIC"] = str(args.dynamo_use_dynamic)
            for key, value in given.items():
                env.setdefault(key, value)
        return cmd, env

    return prepare_deepspeed_cmd_env


def main(argv: list[str] | None = None) -> None:
    """accelerate's command line (``accelerate launch ...``, ``accelerate env``, ...) with
    leafpass's backend names accepted, and passed on to the ranks by DeepSpeed launches."""
    if not install():
        raise SystemExit("leafpass: accelerate is not installed (pip install 'leafpass[accelerate]')")
    import accelerate.commands.launch as launch_command
    from accelerate.commands.accelerate_cli import main as accelerate_main

    launch_command.prepare_deepspeed_cmd_env = _passing_dynamo_config(launch_command.prepare_deepspeed_cmd_env)

    sys.argv = ["accelerate", *(sys.argv[1:] if argv is None else argv)]
    accelerate_main()


if __name__ == "__main__":
    main()
