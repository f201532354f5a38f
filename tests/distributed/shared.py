"""Helpers shared by the distributed test modules."""

from __future__ import annotations

import os


def gathers(before: dict[str, int], after: dict[str, int]) -> int:
    """All-gathers issued between two snapshots of a collective counter."""
    return after.get("all_gather", 0) - before.get("all_gather", 0)


def extension_builds() -> set[str]:
    """What torch's JIT extension cache holds (DeepSpeed's CPU ops are built there)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    found = set()
    for dirpath, dirnames, _files in os.walk(root):
        found.update(os.path.join(dirpath, d) for d in dirnames)
    return found


def assert_rank_failed_first(err, rank: int, message: str) -> None:
    """``err`` (a DistributedRunError) says ``rank`` raised ``message`` first, the other rank
    failed after it, nothing hung, and every process exited non-zero."""
    text = str(err)
    assert err.hung_ranks == [], text
    assert err.first_failed_rank == rank, text
    assert text.startswith(f"rank {rank} raised:\nTraceback"), text
    assert message in text, text
    assert f"rank {1 - rank} failed too" in text, text
    assert all(code not in (0, None) for code in err.exitcodes), err.exitcodes
