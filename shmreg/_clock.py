"""Time as an object, so timeouts, grace periods and intervals can be tested without sleeping.

Everything in shmreg that waits takes a ``clock``; ``SYSTEM`` is the real one and
``shmreg.testing.FakeClock`` one whose ``sleep`` only moves its own time forward.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Time as ``wait_for``, ``watch`` and the monitor read it: pass a fake one in tests
    (``shmreg.testing.FakeClock``) so timeouts run without sleeping."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM = SystemClock()


def check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    """None, or a finite number of seconds >= 0; anything else is a caller's mistake."""
    from shmreg._errors import InvalidArgument

    if timeout is None:
        return None
    if type(timeout) not in (int, float) or not timeout >= 0 or timeout == float("inf"):
        raise InvalidArgument(
            f"{what} must be None or a finite number >= 0, got {timeout!r}",
            argument=what,
            value=repr(timeout),
        )
    return float(timeout)
