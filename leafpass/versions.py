"""Version ranges of the engines whose private APIs leafpass uses."""

from __future__ import annotations

import re

__all__ = ["in_range"]


def in_range(version: str, low: tuple[int, ...], high: tuple[int, ...]) -> bool:
    """True when ``version`` (``"2.13.0+cpu"``, ``"0.19.8"``) lies in ``[low, high)``,
    compared on as many leading numbers as ``low`` has."""
    match = re.match(r"^" + r"\.".join([r"(\d+)"] * len(low)), str(version))
    return match is not None and low <= tuple(int(x) for x in match.groups()) < high
