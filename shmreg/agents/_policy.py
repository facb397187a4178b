"""Restart intensity and backoff, per agent: pure bookkeeping on times the caller passes in.

Intensity (OTP's term): more than ``max_restarts`` restarts within ``max_seconds`` and the
agent is given up on (``failed``). Backoff: the first restart after a stable run is immediate,
each further one waits twice as long as the one before (from ``backoff_initial``, capped at
``backoff_max``), times a random factor in [0.5, 1) so that agents that crashed together do not
restart in lockstep. A run that lasted ``stable_after`` seconds resets the count.
"""

from __future__ import annotations

import random
from collections import deque

from shmreg.agents._config import RestartPolicy

__all__ = ["RestartTracker"]


class RestartTracker:
    """The restart history of one agent under one policy."""

    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._times: deque[float] = deque()
        self._streak = 0  # restarts since the last stable run
        self._rng = rng or random.Random()

    def reset(self) -> None:
        """Forget the history (an explicit start by a user)."""
        self._times.clear()
        self._streak = 0

    def exceeded(self, now: float) -> bool:
        """Whether one more restart at ``now`` would break the intensity limit."""
        window = self.policy.max_seconds
        while self._times and now - self._times[0] > window:
            self._times.popleft()
        return len(self._times) >= self.policy.max_restarts

    def next_delay(self, now: float, ran_for: float) -> float:
        """Record a restart at ``now`` after a run of ``ran_for`` seconds; the wait before it."""
        if ran_for >= self.policy.stable_after:
            self._streak = 0
        self._times.append(now)
        streak, self._streak = self._streak, self._streak + 1
        if streak == 0:
            return 0.0
        base = min(self.policy.backoff_max, self.policy.backoff_initial * 2 ** (streak - 1))
        return float(base * (0.5 + 0.5 * self._rng.random()))
