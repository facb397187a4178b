"""Test helpers for code that uses shmreg, and for new backends.

``assert_registered``, ``assert_not_registered`` and ``assert_metadata_equals`` check a
registry's entries with messages that show what it holds instead. ``check_backend(factory)``
runs the conformance suite every backend passes; ``CHECKS`` lists its checks as
``(name, function)`` so a pytest module can parametrize over them. ``FakeClock`` drives
time-dependent code by hand.

Names are imported on first use, so the pytest plugin (``shmreg.testing._plugin``, loaded
by every pytest run where shmreg is installed) does not pull in the conformance checks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shmreg.testing._assertions import (
        assert_metadata_equals,
        assert_not_registered,
        assert_registered,
    )
    from shmreg.testing._clock import FakeClock
    from shmreg.testing._conformance import CHECKS, Check, ConformanceFailure, check_backend

#: public name -> the private module defining it
_WHERE = {
    "assert_metadata_equals": "_assertions",
    "assert_not_registered": "_assertions",
    "assert_registered": "_assertions",
    "CHECKS": "_conformance",
    "Check": "_conformance",
    "ConformanceFailure": "_conformance",
    "check_backend": "_conformance",
    "FakeClock": "_clock",
}

__all__ = [
    "CHECKS",
    "Check",
    "ConformanceFailure",
    "FakeClock",
    "assert_metadata_equals",
    "assert_not_registered",
    "assert_registered",
    "check_backend",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'shmreg.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"shmreg.testing.{module}"), name)
    if callable(value) and getattr(value, "__module__", "").startswith("shmreg.testing."):
        value.__module__ = "shmreg.testing"  # reported where users import it from
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
