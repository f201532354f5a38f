"""Run a function right after a given module is first imported; imports nothing itself.

This file has no imports from leafpass, so ``leafpass-startup.pth`` (installed into
site-packages by ``pip install leafpass``) can run it at interpreter start by its path,
without importing leafpass and torch in every Python process. There it arranges for
``import leafpass`` to run right after ``accelerate.utils.dataclasses`` is imported, so
that ``TrainingArguments(torch_compile_backend="z3leaf")`` works with no import in the
user's script (see :mod:`leafpass.integrations.accelerate`). Set ``LEAFPASS_STARTUP_HOOK=0``
to turn that off.

A finder on ``sys.meta_path`` finds nothing itself: for the one module name it watches, it
asks the finders after it for the module's spec and wraps the spec's loader, so that the
function runs with the module once the module's code has run. It then leaves
``sys.meta_path``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["call_after_import", "watching", "install_startup_hook"]

ACCELERATE_DATACLASSES = "accelerate.utils.dataclasses"


def _is_after_import(finder) -> bool:
    # by a mark, not by class: the start-up hook runs a second copy of this file (by path),
    # whose class is another object; each copy's finders must skip the other's, or they
    # would ask each other for the spec without end
    return getattr(finder, "_leafpass_after_import", False)


class _AfterImport:  # importlib.abc.MetaPathFinder's protocol
    _leafpass_after_import = True

    def __init__(self, name: str, fn) -> None:
        self.name = name
        self.fn = fn

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if _is_after_import(finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenCall(spec.loader, self)
        return spec


class _ThenCall:  # importlib.abc.Loader's protocol, the rest delegated
    def __init__(self, loader, finder: _AfterImport) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        waiting = [f for f in sys.meta_path if _is_after_import(f) and f.name == self._finder.name]
        for finder in waiting:  # every function waiting for this module, in the order they came
            sys.meta_path.remove(finder)
        for finder in reversed(waiting):
            finder.fn(module)

    def __getattr__(self, name):  # get_source, get_code, ...: the real loader's
        return getattr(self._loader, name)


def watching(name: str, fn=None) -> bool:
    """True when a :func:`call_after_import` for ``name`` (and ``fn``, if given) is waiting."""
    return any(_is_after_import(f) and f.name == name and (fn is None or f.fn is fn) for f in sys.meta_path)


def call_after_import(name: str, fn) -> None:
    """``fn(module)`` now if ``name`` is imported, else right after it is (once; asking
    again for the same ``fn`` while it waits changes nothing)."""
    module = sys.modules.get(name)
    if module is not None:
        fn(module)
    elif not watching(name, fn):
        sys.meta_path.insert(0, _AfterImport(name, fn))


def _import_leafpass(_module) -> None:
    import leafpass  # noqa: F401  (its import teaches accelerate leafpass's backend names)


def install_startup_hook() -> None:
    """What ``leafpass-startup.pth`` runs: ``import leafpass`` right after accelerate's
    dataclasses module is imported, unless ``LEAFPASS_STARTUP_HOOK=0``."""
    if os.environ.get("LEAFPASS_STARTUP_HOOK", "1") == "0" or "leafpass" in sys.modules:
        return
    call_after_import(ACCELERATE_DATACLASSES, _import_leafpass)


if __name__ == "leafpass_startup":  # executed by path from leafpass-startup.pth
    install_startup_hook()
