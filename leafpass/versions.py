"""Version ranges of the engines whose private APIs leafpass uses."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

__all__ = ["in_range"]


def in_range(version: str, low: tuple[int, ...], high: tuple[int, ...]) -> bool:
    """True when ``version`` (``"2.13.0+cpu"``, ``"0.19.8"``, ``"2.14.0a0+git1234"``) lies in
    ``[low, high)``, compared on its release numbers (``packaging.version``), as many as
    ``low`` has; a version packaging cannot read is out of range."""
    try:
        release = Version(str(version)).release
    except InvalidVersion:
        return False
    numbers = (tuple(release) + (0,) * len(low))[: len(low)]
    return low <= numbers < high
