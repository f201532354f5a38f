"""Which modules of the model a stack of frames is in (``ModuleIndex.place``).

Which module a break is in is decided from source: each user frame of the break's
stack is matched against the source lines of the ``forward`` of the model's module
classes, walking down the module tree from the outermost frame. Code shared by
several instances (``layers.0.mlp`` and ``layers.1.mlp`` run the same ``forward``
from the same line) cannot be told apart from a stack, so a break names every
instance it may be in.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from torch import nn

import leafpass

from .explain_frames import Frame, norm_path

__all__ = ["ModuleIndex"]


class ModuleIndex:
    """Module names of a model and the source lines of their classes, to place frames in modules."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.named: list[tuple[str, nn.Module]] = list(model.named_modules())
        self.name_of: dict[int, str] = {id(m): n for n, m in self.named}
        self.by_name: dict[str, nn.Module] = dict(self.named)
        self.order: dict[str, int] = {n: i for i, (n, _) in enumerate(self.named)}
        self.flagged: set[str] = {n for n, m in self.named if leafpass.z3_leaf_module(m)}
        self.classes: set[type] = {type(m) for _, m in self.named}
        self._forward_range: dict[type, tuple[str, int, int] | None] = {}
        self._class_range: dict[type, tuple[str, int, int] | None] = {}

    # source ranges ---------------------------------------------------------

    @staticmethod
    def _range(obj) -> tuple[str, int, int] | None:
        try:
            obj = inspect.unwrap(obj)
            filename = inspect.getsourcefile(obj)
            lines, start = inspect.getsourcelines(obj)
        except (TypeError, OSError, ValueError):
            return None
        if not filename:
            return None
        return norm_path(filename), start, start + len(lines) - 1

    def forward_range(self, cls: type) -> tuple[str, int, int] | None:
        if cls not in self._forward_range:
            forward = getattr(cls, "forward", None)
            unimplemented = getattr(nn.Module, "forward", None)
            self._forward_range[cls] = None if forward is None or forward is unimplemented else self._range(forward)
        return self._forward_range[cls]

    def class_range(self, cls: type) -> tuple[str, int, int] | None:
        if cls not in self._class_range:
            self._class_range[cls] = self._range(cls)
        return self._class_range[cls]

    @staticmethod
    def covers(rng, frame: Frame) -> bool:
        return rng is not None and rng[0] == norm_path(frame.filename) and rng[1] <= frame.lineno <= rng[2]

    def forward_owner(self, frame: Frame) -> str | None:
        """``Class.forward`` when ``frame`` is in the ``forward`` of one of the model's module classes."""
        owners = {cls.__name__ for cls in self.classes if self.covers(self.forward_range(cls), frame)}
        return f"{owners.pop()}.forward" if len(owners) == 1 else None

    def constructed_class(self, frame: Frame) -> str | None:
        """The name of the model's module class whose ``__init__`` (or ``__new__``) ``frame`` is
        in: code building a new module (an ``nn.Linear(...)`` inside a ``forward``), not code
        of one of the model's modules."""
        if frame.name not in ("__init__", "__new__"):
            return None
        owners = sorted(cls.__name__ for cls in self.classes if self.covers(self.class_range(cls), frame))
        return owners[0] if owners else None

    def constructing(self, frames: Iterable[Frame]) -> str | None:
        """The class the first constructor frame of ``frames`` builds, if any (see :meth:`place`)."""
        return next((cls for cls in map(self.constructed_class, frames) if cls), None)

    def callable_module(self, name: str) -> bool:
        """Whether the module has a ``forward`` of its own (``ModuleList`` and friends do not)."""
        return self.forward_range(type(self.by_name[name])) is not None

    # tree ----------------------------------------------------------------------

    @staticmethod
    def is_under(name: str, ancestor: str) -> bool:
        """``name`` is ``ancestor`` or inside it."""
        return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")

    @staticmethod
    def depth(name: str) -> int:
        return 0 if name == "" else name.count(".") + 1

    def _matching(self, frame: Frame, names: Iterable[str], use_class: bool) -> list[str]:
        found = []
        for name in names:
            cls = type(self.by_name[name])
            rng = self.class_range(cls) if use_class else self.forward_range(cls)
            if self.covers(rng, frame):
                found.append(name)
        return found

    def place(self, frames: list[Frame]) -> list[str]:
        """The innermost modules whose code the stack ``frames`` (outermost first) is in.

        The outermost frame picks every module whose ``forward`` (else whose class body)
        holds it; each following frame moves down to the descendants whose ``forward``
        holds it, or stays (a helper function or another method of the same module).
        A frame entered through ``module(...)`` from a traced frame is not in a flagged
        leaf: z3leaf keeps such a call opaque (``leaf.forward(...)`` is not kept opaque).
        A frame in a module class's ``__init__`` builds a new module (``nn.Linear(4, 4)``
        called in a ``forward``), none of the model's: the walk stops there, and the break
        is in the module whose code builds it (:meth:`constructing` names the class).
        """
        all_names = [n for n, _ in self.named]
        current: list[str] | None = None
        for frame in frames:
            if self.constructed_class(frame) is not None:
                break
            if current is None:
                found = self._matching(frame, all_names, False) or self._matching(frame, all_names, True)
                if found:
                    # the outermost modules holding the frame: a frame of one forward is in
                    # every module of that class, keep the ones not inside another match
                    current = [n for n in found if not any(o != n and self.is_under(n, o) for o in found)]
                continue
            below = [n for n in all_names if n not in current and any(self.is_under(n, c) for c in current)]
            found = self._matching(frame, below, False)
            if not found and not self._matching(frame, current, True):
                found = self._matching(frame, below, True)
            if frame.via_call:
                found = [n for n in found if n not in self.flagged] or found
            if found:
                current = [n for n in found if not any(o != n and self.is_under(n, o) for o in found)]
        return sorted(current or [], key=self.order.__getitem__)
