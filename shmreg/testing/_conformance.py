"""The conformance suite every ``shmreg`` backend passes: ``check_backend(factory)``.

Each check is a function of one fresh, empty backend. It talks to the backend only through the
``Backend`` protocol (never the ``Registry`` facade), so a new backend can be held to the same
contract as the shipped ones before the facade ever sees it. Owners are real
``ProcessIdentity`` values: this process, and child interpreters that a check starts, kills
and reaps itself (in ``finally``), because liveness is half of what a registry promises and a
fabricated pid would test nothing. (The one exception: a pid that is live with a start time it
never had, which is exactly what a registry holds after that pid was reused.)

Why one fresh backend per check: a failed check leaves whatever it left, and the next check
must not inherit it. ``check_backend`` destroys every backend it creates; a pytest module can
run the checks one by one from ``CHECKS``::

    @pytest.mark.parametrize("name, check", CHECKS, ids=[name for name, _ in CHECKS])
    def test_conformance(name, check):
        backend = make_backend()
        try:
            check(backend)
        finally:
            backend.destroy()

The checks live in ``_checks_*`` modules by subject (registration, queries, liveness, events,
scale); this module runs them. Helpers they share are in ``_checks_common``.
"""

from __future__ import annotations

from collections.abc import Callable

from shmreg.backends._protocol import Backend
from shmreg.testing import (
    _checks_events,
    _checks_liveness,
    _checks_migration,
    _checks_queries,
    _checks_registration,
    _checks_scale,
)
from shmreg.testing._checks_common import Check

__all__ = ["CHECKS", "Check", "ConformanceFailure", "check_backend"]

#: ``(name, check)`` in the order ``check_backend`` runs them.
CHECKS: list[tuple[str, Check]] = [
    *_checks_registration.CHECKS,
    *_checks_queries.CHECKS,
    *_checks_liveness.CHECKS,
    *_checks_events.CHECKS,
    *_checks_scale.CHECKS,
    *_checks_migration.CHECKS,
]


class ConformanceFailure(AssertionError):
    """Raised by ``check_backend``; ``failures`` maps each failed check's name to its message."""

    def __init__(self, failures: dict[str, str], total: int) -> None:
        self.failures = failures
        lines = [f"{len(failures)} of {total} conformance checks failed:"]
        lines += [f"- {name}: {message}" for name, message in failures.items()]
        super().__init__("\n".join(lines))


def check_backend(factory: Callable[[], Backend]) -> None:
    """Run every check on its own ``factory()`` backend; raise ``ConformanceFailure`` if any fail.

    ``factory`` returns a new, empty backend on each call; each is destroyed after its check.
    All checks run, so the error lists every failure at once.
    """
    failures: dict[str, str] = {}
    for name, check in CHECKS:
        backend = factory()
        try:
            check(backend)
        except Exception as exc:  # a wrong error type is a failure too, not a crash of the run
            failures[name] = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                backend.destroy()
            except Exception as exc:
                failures.setdefault(name, f"destroy() raised {type(exc).__name__}: {exc}")
    if failures:
        raise ConformanceFailure(failures, len(CHECKS))
