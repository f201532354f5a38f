"""z3leaf backends under names of your choice, for tools that take only a backend name.

transformers' ``TrainingArguments(torch_compile_backend=...)`` and ``accelerate launch``
pass a backend *name* and no backend options. ``register_backend`` puts a z3leaf backend
with options bound (:func:`leafpass.make_backend`) in torch's backend registry::

    leafpass.register_backend("z3leaf_module", gather="module")
    torch.compile(model, backend="z3leaf_module")     # == backend=make_backend(gather="module")

The environment variable ``LEAFPASS_BACKENDS`` does the same in every process that
imports leafpass (a launcher and the ranks it starts alike), from JSON::

    LEAFPASS_BACKENDS='{"z3leaf_module": {"gather": "module"}}'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import torch

from ..backend import make_backend
from ..capture import backend_options

__all__ = ["register_backend", "is_leafpass_backend_name", "register_from_environment", "ENV_VAR"]

ENV_VAR = "LEAFPASS_BACKENDS"
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _registered(name: str) -> Callable | None:
    """The backend torch knows as ``name`` (entry points included), or None."""
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        return None
    return torch._dynamo.lookup_backend(name)


def is_leafpass_backend_name(name: str) -> bool:
    """True when torch's backend registry maps ``name`` to a z3leaf backend
    (``"z3leaf"`` itself, or a name given to :func:`register_backend`)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return False
    backend = _registered(name)
    return backend is not None and backend_options(backend) is not None


def register_backend(name: str, **options: Any) -> Callable:
    """Register a z3leaf backend with ``options`` bound under ``name`` and return it.

    ``name`` must be lowercase (letters, digits, ``_``, starting with a letter): accelerate
    upper-cases backend names and lower-cases them again. Registering the same name with
    the same options again returns the backend already registered; a name that torch
    already knows for anything else is refused.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"leafpass.register_backend: backend name {name!r} must be lowercase letters, digits and '_', "
            f"starting with a letter (accelerate upper-cases names and lower-cases them again), "
            f"e.g. 'z3leaf_module'"
        )
    backend = make_backend(**options)  # validates the options
    existing = _registered(name)
    if existing is not None:
        existing_options = backend_options(existing)
        if existing_options == options:
            return existing
        what = ("a z3leaf backend with options " + repr(existing_options)) if existing_options is not None \
            else "another backend"
        raise ValueError(
            f"leafpass.register_backend: torch already has a backend named {name!r} ({what}); "
            f"choose another name for options {options!r}"
        )
    torch._dynamo.register_backend(compiler_fn=backend, name=name)
    return backend


def register_from_environment(environ: dict[str, str] | None = None) -> list[str]:
    """Register the backends named in ``LEAFPASS_BACKENDS`` (JSON: ``{name: {option: value}}``);
    return their names. ``import leafpass`` calls it."""
    text = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not text:
        return []
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{ENV_VAR} must be JSON mapping backend names to z3leaf options, e.g. "
            f"'{{\"z3leaf_module\": {{\"gather\": \"module\"}}}}'; could not parse {text!r}: {e}"
        ) from None
    if not isinstance(spec, dict) or not all(isinstance(v, dict) for v in spec.values()):
        raise ValueError(
            f"{ENV_VAR} must be JSON mapping backend names to z3leaf options, e.g. "
            f"'{{\"z3leaf_module\": {{\"gather\": \"module\"}}}}'; got {text!r}"
        )
    for name, options in spec.items():
        register_backend(name, **options)
    return list(spec)
