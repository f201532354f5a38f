"""Make the repository importable in this process and in the ranks it spawns.

Spawned ranks start from a copy of this process's ``sys.path``, so putting the repository
root on it here lets them import ``leafpass`` and the test modules even when
pytest is run without ``PYTHONPATH``.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

from tests.distributed.shared import extension_builds  # noqa: E402


@pytest.fixture(scope="module")
def extension_builds_before() -> set[str]:
    """The JIT extension cache before a module's ranks ran: tests assert nothing was added."""
    return extension_builds()
