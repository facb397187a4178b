"""``FakeClock``: a clock whose time moves only when something sleeps on it (or is told to).

Everything in shmreg that waits takes a ``clock`` (``wait_for``, ``watch``,
``cleanup_namespace``, the monitor). Passing a ``FakeClock`` makes timeouts and grace periods
expire as soon as the code has slept through them, without a real second going by::

    clock = FakeClock()
    with pytest.raises(shmreg.RegistryTimeout):
        reg.wait_for("ns", "absent", timeout=30, clock=clock)   # returns at once
    assert clock.monotonic() >= 30
"""

from __future__ import annotations

import math
import threading


class FakeClock:
    """A ``shmreg`` clock for tests: ``monotonic()`` returns its own time, ``sleep(s)`` adds s.

    Nothing ever really sleeps. Safe to share between threads: every read and every advance
    happens under one lock, so concurrent sleepers each move time forward by their own amount
    and no advance is lost.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = self._check(start, "start", negative_ok=True)
        self._slept = 0.0
        self._sleeps = 0
        self._lock = threading.Lock()

    @staticmethod
    def _check(seconds: float, what: str, *, negative_ok: bool = False) -> float:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"{what} must be a number of seconds, got {seconds!r}")
        if not math.isfinite(seconds):
            raise ValueError(f"{what} must be finite, got {seconds!r}")
        if seconds < 0 and not negative_ok:
            raise ValueError(f"{what} must be >= 0, got {seconds!r}")  # as time.sleep says
        return float(seconds)

    def monotonic(self) -> float:
        """The clock's current time in seconds (starts at ``start``, never goes back)."""
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        """Advance the time by ``seconds`` and return at once."""
        seconds = self._check(seconds, "sleep length")
        with self._lock:
            self._now += seconds
            self._slept += seconds
            self._sleeps += 1

    def advance(self, seconds: float) -> None:
        """Move the time forward by ``seconds`` from outside (not counted as a sleep)."""
        seconds = self._check(seconds, "advance")
        with self._lock:
            self._now += seconds

    @property
    def slept(self) -> float:
        """Total seconds passed to ``sleep`` so far."""
        with self._lock:
            return self._slept

    @property
    def sleeps(self) -> int:
        """How many times ``sleep`` was called."""
        with self._lock:
            return self._sleeps

    def __repr__(self) -> str:
        return f"FakeClock(now={self.monotonic()!r})"
