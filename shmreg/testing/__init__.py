"""Test helpers for code that uses shmreg, and for new backends.

``check_backend(factory)`` runs the conformance suite every backend passes; ``CHECKS`` lists
its checks as ``(name, function)`` so a pytest module can parametrize over them.
"""

from shmreg.testing._clock import FakeClock
from shmreg.testing._conformance import CHECKS, Check, ConformanceFailure, check_backend

# Reported where users import them from, not the private module.
for _public in (ConformanceFailure, check_backend):
    _public.__module__ = "shmreg.testing"
del _public

__all__ = ["CHECKS", "Check", "ConformanceFailure", "FakeClock", "check_backend"]
