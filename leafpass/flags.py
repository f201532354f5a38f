"""Eager ZeRO-3 leaf-module flags.

A module is a ZeRO-3 *leaf* when its ``_z3_leaf`` attribute is truthy.  That
attribute is the single source of truth: everything in leafpass that needs to
know whether a module is a leaf reads it through :func:`z3_leaf_module`, and
nothing keeps a separate registry.  The attribute names are the ones DeepSpeed
0.19.8 uses (``module._z3_leaf`` on modules and ``param.ds_z3_leaf_module`` on
parameters, which DeepSpeed's ZeRO-3 sets to the owning leaf module), so a flag
set with ``deepspeed.utils.set_z3_leaf_modules`` is seen here and a flag set
here is seen by DeepSpeed.

The functions keep the names, parameter names, return values and return order
of ``deepspeed.utils.z3_leaf_module``; they differ only where DeepSpeed would
fail obscurely or silently (a bare class or string instead of a list, entries
of the wrong type) and in giving error messages that name the model class and
suggest a fix.  This module never imports DeepSpeed.

Order of returned modules: the class-based setters walk the model like
``model.apply`` does, i.e. post-order (children before their parent), and, like
``model.apply``, visit a module shared under two parents twice.
:func:`get_z3_leaf_modules` walks ``model.modules()``, i.e. pre-order without
duplicates.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from typing import Any, List, Sequence, Tuple, Type, Union

import torch

from .names import remember_names

__all__ = [
    "DEFAULT_LEAF_MODULE_CLASSES",
    "DEFAULT_LEAF_MODULE_NAMES",
    "DEFAULT_LEAF_MODULE_NAME_SUFFIXES",
    "LEAF_MODULE_CONFIG_KEYS",
    "z3_leaf_module",
    "z3_leaf_parameter",
    "get_z3_leaf_modules",
    "set_z3_leaf_module",
    "set_z3_leaf_modules",
    "unset_z3_leaf_modules",
    "set_z3_leaf_modules_by_name",
    "set_z3_leaf_modules_by_suffix",
    "apply_leaf_module_config",
]

#: Classes DeepSpeed flags when ``zero_optimization.leaf_module.classes`` is not given.
DEFAULT_LEAF_MODULE_CLASSES: Tuple[str, ...] = (
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
)
#: Default of ``zero_optimization.leaf_module.names``.
DEFAULT_LEAF_MODULE_NAMES: Tuple[str, ...] = ()
#: Default of ``zero_optimization.leaf_module.name_suffixes``.
DEFAULT_LEAF_MODULE_NAME_SUFFIXES: Tuple[str, ...] = ()

#: The keys of DeepSpeed's ``zero_optimization.leaf_module`` mapping.
LEAF_MODULE_CONFIG_KEYS: Tuple[str, ...] = ("classes", "names", "name_suffixes")

_DEFAULTS = {
    "classes": DEFAULT_LEAF_MODULE_CLASSES,
    "names": DEFAULT_LEAF_MODULE_NAMES,
    "name_suffixes": DEFAULT_LEAF_MODULE_NAME_SUFFIXES,
}

_LEAF_ATTR = "_z3_leaf"
_PARAM_LEAF_ATTR = "ds_z3_leaf_module"

ClassSpec = Union[Type[torch.nn.Module], str]


# --------------------------------------------------------------------------- queries


def z3_leaf_module(model: torch.nn.Module) -> bool:
    """Return True if ``model`` itself is flagged as a ZeRO-3 leaf (``_z3_leaf`` is set and truthy).

    The one check of the flag outside Dynamo (capture's eager path, the runtimes). It reads
    the instance ``__dict__`` first: a plain ``getattr`` miss on an unflagged module goes
    through ``nn.Module.__getattr__`` and an exception."""
    own = model.__dict__
    if _LEAF_ATTR in own:
        return bool(own[_LEAF_ATTR])
    return hasattr(type(model), _LEAF_ATTR) and bool(getattr(model, _LEAF_ATTR))


def z3_leaf_parameter(model: torch.nn.Parameter) -> bool:
    """Return True if the parameter belongs to a leaf module (ZeRO-3 set ``ds_z3_leaf_module`` on it)."""
    return hasattr(model, _PARAM_LEAF_ATTR)


def get_z3_leaf_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """Return the flagged modules of ``model`` (itself included), in ``model.modules()`` order."""
    return [module for module in model.modules() if z3_leaf_module(module)]


# --------------------------------------------------------------------------- setters


def set_z3_leaf_module(model: torch.nn.Module, flag: bool) -> None:
    """Set (``flag=True``) or clear (``flag=False``) the leaf flag of the single module ``model``."""
    model._z3_leaf = flag


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _model_class(model: Any) -> str:
    return type(model).__name__


def _check_sequence(fn: str, argname: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        return
    shown = value.__name__ if isinstance(value, type) else repr(value)
    raise TypeError(f"{fn}: {argname} must be a list or tuple, got {shown} of type "
                    f"{type(value).__name__}; wrap a single entry in a list, e.g. [{shown}]")


def _check_classes(fn: str, leaf_module_classes: Any) -> None:
    _check_sequence(fn, "leaf_module_classes", leaf_module_classes)
    for index, entry in enumerate(leaf_module_classes):
        if not isinstance(entry, (type, str)):
            raise TypeError(f"{fn}: leaf_module_classes[{index}] is {entry!r} of type {type(entry).__name__}; "
                            f"each entry must be a module class (e.g. MyBlock) or a class name string "
                            f"(e.g. 'MyBlock' or 'my_package.my_module.MyBlock')")


def _check_strings(fn: str, argname: str, values: Any) -> None:
    _check_sequence(fn, argname, values)
    for index, entry in enumerate(values):
        if not isinstance(entry, str):
            raise TypeError(f"{fn}: {argname}[{index}] is {entry!r} of type {type(entry).__name__}; "
                            f"each entry must be a string as in model.named_modules()")


def _describe_classes(leaf_module_classes: Sequence[ClassSpec]) -> str:
    return "[" + ", ".join(_qualified_name(c) if isinstance(c, type) else repr(c) for c in leaf_module_classes) + "]"


def _class_name_hint(model: torch.nn.Module, leaf_module_classes: Sequence[ClassSpec]) -> str:
    candidates = set()
    for module in model.modules():
        candidates.add(type(module).__name__)
        candidates.add(_qualified_name(type(module)))
    close: List[str] = []
    for spec in leaf_module_classes:
        if isinstance(spec, str):
            for match in difflib.get_close_matches(spec, sorted(candidates), n=3):
                if match not in close:
                    close.append(match)
    return f" Did you mean {close}?" if close else ""


def _flag_by_class(fn: str, model: torch.nn.Module, leaf_module_classes: Sequence[ClassSpec], flag: bool,
                   raise_if_not_found: bool) -> List[torch.nn.Module]:
    _check_classes(fn, leaf_module_classes)
    matched: List[torch.nn.Module] = []

    def matches(module: torch.nn.Module, spec: ClassSpec) -> bool:
        if isinstance(spec, type):
            return isinstance(module, spec)
        cls = type(module)
        return spec == cls.__name__ or spec == _qualified_name(cls)

    def visit(module: torch.nn.Module) -> None:
        if any(matches(module, spec) for spec in leaf_module_classes):
            module._z3_leaf = flag
            matched.append(module)

    # model.apply visits children before their parent; DeepSpeed returns modules in that order.
    model.apply(visit)
    remember_names(model, matched)

    if not matched and raise_if_not_found:
        raise ValueError(f"{fn}: no module of {_model_class(model)} is an instance of or is named "
                         f"{_describe_classes(leaf_module_classes)}.{_class_name_hint(model, leaf_module_classes)} "
                         f"Check the class name: a string must equal the bare class name (type(m).__name__) "
                         f"or the fully qualified 'module.QualName'; or pass raise_if_not_found=False "
                         f"to accept no match.")
    return matched


def set_z3_leaf_modules(model: torch.nn.Module,
                        leaf_module_classes: Sequence[ClassSpec],
                        raise_if_not_found: bool = True) -> List[torch.nn.Module]:
    """Flag every module of ``model`` (itself included) matching one of ``leaf_module_classes`` as a leaf.

    Entries are classes (matched with ``isinstance``, so subclasses match) or strings (matched
    against the bare class name or ``f"{cls.__module__}.{cls.__qualname__}"``).  Returns the
    matched modules in ``model.apply`` order (children before parents).  Raises ``ValueError``
    when nothing matches and ``raise_if_not_found`` is true, ``TypeError`` for a malformed list.
    """
    return _flag_by_class("set_z3_leaf_modules", model, leaf_module_classes, True, raise_if_not_found)


def unset_z3_leaf_modules(model: torch.nn.Module,
                          leaf_module_classes: Sequence[ClassSpec],
                          raise_if_not_found: bool = True) -> List[torch.nn.Module]:
    """Clear the leaf flag of every module matching ``leaf_module_classes``; see :func:`set_z3_leaf_modules`."""
    return _flag_by_class("unset_z3_leaf_modules", model, leaf_module_classes, False, raise_if_not_found)


def _missing_message(fn: str, what: str, model: torch.nn.Module, missing: Sequence[str],
                     candidates: Sequence[str]) -> str:
    parts = []
    for item in missing:
        close = difflib.get_close_matches(item, candidates, n=3)
        parts.append(f"{item!r} (did you mean {', '.join(repr(c) for c in close)}?)" if close else repr(item))
    return (f"{fn}: no module of {_model_class(model)} {what} {', '.join(parts)}. "
            f"Names are those of model.named_modules() (e.g. 'layers.0.mlp'); pass "
            f"raise_if_not_found=False to get the missing entries back instead of an error.")


def set_z3_leaf_modules_by_name(model: torch.nn.Module,
                                module_names: Sequence[str],
                                flag: bool = True,
                                raise_if_not_found: bool = True) -> Tuple[List[torch.nn.Module], List[str]]:
    """Set the leaf flag to ``flag`` on the modules named exactly ``module_names`` (as in ``named_modules()``).

    Returns ``(matched_modules, missing_names)`` in the order of ``module_names``.  Raises
    ``ValueError`` naming the missing names (with close suggestions) if any is missing and
    ``raise_if_not_found`` is true; matched modules are flagged before raising.
    """
    fn = "set_z3_leaf_modules_by_name"
    _check_strings(fn, "module_names", module_names)
    modules_by_name = dict(model.named_modules())
    matched: List[torch.nn.Module] = []
    missing: List[str] = []
    for name in module_names:
        module = modules_by_name.get(name)
        if module is None:
            missing.append(name)
            continue
        module._z3_leaf = flag
        matched.append(module)
    remember_names(model, matched)
    if missing and raise_if_not_found:
        raise ValueError(_missing_message(fn, "is named", model, missing, [n for n in modules_by_name if n]))
    return matched, missing


def set_z3_leaf_modules_by_suffix(model: torch.nn.Module,
                                  module_name_suffixes: Sequence[str],
                                  flag: bool = True,
                                  raise_if_not_found: bool = True) -> Tuple[List[torch.nn.Module], List[str]]:
    """Set the leaf flag to ``flag`` on modules whose ``named_modules()`` name ends with one of the suffixes.

    Matching is plain ``str.endswith`` (``"proj"`` matches ``"q_proj"``; ``""`` matches every
    module).  Returns ``(matched_modules, missing_suffixes)``; matched modules are deduplicated,
    ordered by suffix, then by ``named_modules()`` order.  Raises ``ValueError`` like
    :func:`set_z3_leaf_modules_by_name` for unmatched suffixes.
    """
    fn = "set_z3_leaf_modules_by_suffix"
    _check_strings(fn, "module_name_suffixes", module_name_suffixes)
    named = list(model.named_modules())
    matched: List[torch.nn.Module] = []
    seen = set()
    missing: List[str] = []
    for suffix in module_name_suffixes:
        found = False
        for name, module in named:
            if name.endswith(suffix):
                found = True
                module._z3_leaf = flag
                if id(module) not in seen:
                    seen.add(id(module))
                    matched.append(module)
        if not found:
            missing.append(suffix)
    remember_names(model, matched)
    if missing and raise_if_not_found:
        tails = set()
        for name, _ in named:
            if name:
                pieces = name.split(".")
                tails.update(".".join(pieces[i:]) for i in range(len(pieces)))
        raise ValueError(_missing_message(fn, "has a name ending with", model, missing, sorted(tails)))
    return matched, missing


# --------------------------------------------------------------------------- config


def _normalize_leaf_cfg(cfg: Any) -> dict:
    fn = "apply_leaf_module_config"
    if cfg is None:
        raw: dict = {}
    elif isinstance(cfg, Mapping):
        unknown = [key for key in cfg if key not in LEAF_MODULE_CONFIG_KEYS]
        if unknown:
            hint = ""
            if "zero_optimization" in unknown:
                hint = (" This takes the zero_optimization.leaf_module mapping, not a whole DeepSpeed "
                        "config: pass ds_config['zero_optimization']['leaf_module'].")
            elif "leaf_module" in unknown or "stage" in unknown:
                hint = (" This takes the zero_optimization.leaf_module mapping, not the zero_optimization "
                        "section: pass ds_config['zero_optimization']['leaf_module'].")
            raise ValueError(f"{fn}: unknown key(s) {unknown} in the leaf module config; valid keys are "
                             f"{list(LEAF_MODULE_CONFIG_KEYS)}.{hint}")
        raw = dict(cfg)
    elif all(hasattr(cfg, key) for key in LEAF_MODULE_CONFIG_KEYS):
        raw = {key: getattr(cfg, key) for key in LEAF_MODULE_CONFIG_KEYS}
    else:
        raise TypeError(f"{fn}: cfg must be None, a mapping with keys {list(LEAF_MODULE_CONFIG_KEYS)}, or an "
                        f"object with those attributes (e.g. DeepSpeedZeroLeafModuleConfig), got "
                        f"{type(cfg).__name__}")

    normalized = {}
    for key in LEAF_MODULE_CONFIG_KEYS:
        value = raw.get(key, _DEFAULTS[key])
        if isinstance(value, str):
            value = [value]
        elif not isinstance(value, (list, tuple)):
            raise TypeError(f"{fn}: '{key}' must be a string or a list of strings, got {value!r} of type "
                            f"{type(value).__name__}")
        for index, entry in enumerate(value):
            if not (isinstance(entry, str) or (key == "classes" and isinstance(entry, type))):
                allowed = "a class name string or a module class" if key == "classes" else "a string"
                raise TypeError(f"{fn}: {key}[{index}] is {entry!r} of type {type(entry).__name__}; "
                                f"each entry must be {allowed}")
        normalized[key] = list(dict.fromkeys(value))
    return normalized


def apply_leaf_module_config(model: torch.nn.Module, cfg: Any = None) -> List[torch.nn.Module]:
    """Flag leaf modules of ``model`` as DeepSpeed's ``zero_optimization.leaf_module`` config would.

    ``cfg`` is that mapping (keys ``classes``, ``names``, ``name_suffixes``), an object with those
    attributes (``DeepSpeedZeroLeafModuleConfig``), or ``None`` for all defaults (as a ``null``
    ``leaf_module`` entry means in a DeepSpeed config; DeepSpeed's own
    ``apply_zero_leaf_module_config(model, None)`` instead flags nothing).  Missing keys take
    DeepSpeed's defaults, a string becomes a one-item list and duplicates are dropped.  Nothing
    raises for entries that match no module: customised entries that match nothing only
    ``warnings.warn``.  Returns the matched modules, deduplicated, in match order (classes, then
    names, then suffixes).  Raises ``ValueError`` for unknown keys (e.g. a whole DeepSpeed config).
    """
    leaf_cfg = _normalize_leaf_cfg(cfg)
    customized = {key: leaf_cfg[key] != list(_DEFAULTS[key]) for key in LEAF_MODULE_CONFIG_KEYS}

    matched: List[torch.nn.Module] = []
    seen = set()

    def collect(modules: List[torch.nn.Module]) -> None:
        for module in modules:
            if id(module) not in seen:
                seen.add(id(module))
                matched.append(module)

    model_class = _model_class(model)
    if leaf_cfg["classes"]:
        collect(set_z3_leaf_modules(model, leaf_cfg["classes"], raise_if_not_found=False))
    if leaf_cfg["names"]:
        found, missing = set_z3_leaf_modules_by_name(model, leaf_cfg["names"], flag=True, raise_if_not_found=False)
        collect(found)
        if missing and customized["names"]:
            warnings.warn(f"ZeRO leaf module config: no module of {model_class} is named {missing}",
                          UserWarning,
                          stacklevel=2)
    if leaf_cfg["name_suffixes"]:
        found, missing = set_z3_leaf_modules_by_suffix(model,
                                                       leaf_cfg["name_suffixes"],
                                                       flag=True,
                                                       raise_if_not_found=False)
        collect(found)
        if missing and customized["name_suffixes"]:
            warnings.warn(f"ZeRO leaf module config: no module name of {model_class} ends with {missing}",
                          UserWarning,
                          stacklevel=2)
    if not matched and any(customized.values()):
        warnings.warn(f"ZeRO leaf module config matched no module of {model_class}; no module is flagged as a leaf",
                      UserWarning,
                      stacklevel=2)
    return matched
