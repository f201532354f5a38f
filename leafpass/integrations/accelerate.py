"""accelerate (and transformers' ``Trainer``) accepts leafpass's backend names.

accelerate checks a dynamo backend name against its own hand-written enum:
``TorchDynamoPlugin.__post_init__`` and ``accelerate launch`` do
``DynamoBackend(name.upper())``, so ``TrainingArguments(torch_compile_backend="z3leaf")``
fails with ``ValueError: 'Z3LEAF' is not a valid DynamoBackend``. Past that check
accelerate does what leafpass needs: under DeepSpeed, ``Accelerator._prepare_deepspeed``
calls ``engine.compile(backend=name, compile_kwargs=...)`` after ``deepspeed.initialize``.

What leafpass changes, and only that: ``DynamoBackend._missing_`` (the hook Python's
``Enum`` calls for a value it does not know) accepts the names that torch's backend
registry maps to a z3leaf backend, as a ``DynamoBackend`` whose ``.value.lower()`` is the
name. Every other name is refused as before (one that starts with ``z3leaf`` but that no
one registered gets a message saying how to register it)::

    DynamoBackend("INDUCTOR")   -> DynamoBackend.INDUCTOR                (unchanged)
    DynamoBackend("Z3LEAF")     -> ValueError  ->  a DynamoBackend with value "Z3LEAF"
    DynamoBackend("NOPE")       -> ValueError                            (unchanged)

``import leafpass`` installs it: at once if ``accelerate.utils.dataclasses`` is already
imported, else right after it is (an import hook that watches that one module name and
imports nothing). On an accelerate outside :data:`SUPPORTED_TEXT` a leafpass name is
refused with an error naming the version and the fix.

``accelerate launch`` checks the name in its own process, which runs no user code::

    python -m leafpass.integrations.accelerate_cli launch --config_file cfg.yaml train.py

is ``accelerate launch`` with leafpass's names accepted (see
:mod:`leafpass.integrations.accelerate_cli`).
"""

from __future__ import annotations

import sys
import warnings

from ..versions import in_range
from .after_import import call_after_import

__all__ = ["SUPPORTED", "SUPPORTED_TEXT", "TESTED", "install", "install_when_imported", "installed"]

#: accelerate versions ``[low, high)`` whose ``DynamoBackend`` check leafpass widens.
SUPPORTED = ((1, 16), (1, 17))
SUPPORTED_TEXT = ">=1.16,<1.17"
TESTED = "1.16.0"
_MODULE = "accelerate.utils.dataclasses"
_MARK = "_leafpass_accepts"


def installed() -> bool:
    """True when accelerate is imported and its ``DynamoBackend`` accepts leafpass's names."""
    module = sys.modules.get(_MODULE)
    enum_cls = getattr(module, "DynamoBackend", None)
    return enum_cls is not None and getattr(enum_cls._missing_, _MARK, False)


def install() -> bool:
    """Make accelerate's ``DynamoBackend`` accept leafpass's backend names (imports accelerate).

    Returns False when accelerate is not installed. Idempotent. ``import leafpass`` does
    this by itself when accelerate is imported; call it only if you need it earlier.
    """
    try:
        module = __import__(_MODULE, fromlist=["DynamoBackend"])
    except ImportError:
        return False
    _patch(module)
    return True


def _accelerate_version() -> str:
    accelerate = sys.modules.get("accelerate")
    return str(getattr(accelerate, "__version__", "unknown"))


def _patch(module) -> None:
    enum_cls = getattr(module, "DynamoBackend", None)
    if enum_cls is None:
        warnings.warn(
            f"leafpass: accelerate {_accelerate_version()} has no DynamoBackend in {_MODULE}, so its "
            f"TorchDynamoPlugin cannot be taught leafpass's backend names; leafpass supports accelerate "
            f"{SUPPORTED_TEXT} (pip install 'accelerate{SUPPORTED_TEXT}').",
            stacklevel=2,
        )
        return
    if getattr(enum_cls._missing_, _MARK, False):
        return
    previous = enum_cls._missing_  # bound to enum_cls

    def _missing_(cls, value):
        found = previous(value)
        if found is not None or not isinstance(value, str):
            return found
        return _leafpass_member(cls, value)

    setattr(_missing_, _MARK, True)
    enum_cls._missing_ = classmethod(_missing_)


def _leafpass_member(cls, value: str):
    """A ``DynamoBackend`` for ``value`` when it names a z3leaf backend, else None."""
    from .backend_names import is_leafpass_backend_name

    name = value.lower()
    if not is_leafpass_backend_name(name):
        if name.startswith("z3leaf"):
            raise ValueError(
                f"{value!r} is not a valid DynamoBackend: no z3leaf backend is registered as {name!r}. "
                f"Register it before accelerate reads the name (before the Trainer or "
                f"TorchDynamoPlugin is built, and in the `accelerate launch` process): "
                f"leafpass.register_backend({name!r}, gather=...) or "
                f"LEAFPASS_BACKENDS='{{\"{name}\": {{\"gather\": \"module\"}}}}'."
            )
        return None
    version = _accelerate_version()
    if not in_range(version, *SUPPORTED):
        raise ValueError(
            f"leafpass's backend {name!r} is accepted by accelerate {SUPPORTED_TEXT} (tested with {TESTED}); "
            f"found accelerate {version}. Install a supported version "
            f"(pip install 'accelerate{SUPPORTED_TEXT}', or pip install 'leafpass[accelerate]'), or compile "
            f"yourself after accelerator.prepare: engine.compile(backend={name!r})."
        )
    member = str.__new__(cls, value)
    member._name_ = value
    member._value_ = value
    cls._value2member_map_[value] = member  # the same object on every later lookup
    return member


def install_when_imported() -> None:
    """Patch accelerate now if it is imported, else right after it is (``import leafpass``
    calls this; it imports nothing)."""
    if not installed():
        call_after_import(_MODULE, _patch)
