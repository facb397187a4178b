"""``BackendMonitor``: periodic health checks of a registry's backends, failover and failback.

A registry runs on its primary backend. The monitor checks the primary and a configured
standby every ``interval`` seconds; after ``fail_after`` failed checks in a row of the
backend in use it switches the registry to the other one (if that one answered its last
check), and back to the primary after ``recover_after`` healthy checks in a row of it.
The two thresholds are the hysteresis that keeps a flapping server from bouncing the
registry back and forth.

A check fails when ``health_check()`` raises (server unreachable, registry destroyed) or
takes longer than ``timeout``. A report that says "unhealthy" because of dead or damaged
entries is an answer, not a failure: the backend is up, its data needs a sweep or fsck.

On a registry whose backend is a ``DualWriteBackend`` (``BackendMonitor(registry)``, no
standby argument) the two sides are its primary and its secondary, and the switch goes
through it: failover makes the secondary serve (``fail_over``), failback first copies the
secondary's state to the primary (``fail_back``) and stays on the secondary if that fails,
so no acknowledged registration is lost. The registry keeps the same backend object, so its
death monitor follows the side that serves.

Given a separate ``standby`` instead, a switch only repoints the registry's calls: nothing
is copied either way, and the registry's death monitor keeps watching the primary.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shmreg import _log, _opmetrics
from shmreg._errors import InvalidArgument
from shmreg.backends._dualwrite import DualWriteBackend
from shmreg.backends._protocol import Backend

if TYPE_CHECKING:
    from shmreg._registry import Registry

PRIMARY, STANDBY = "primary", "standby"
_ATTR = "_shmreg_backend_monitor"  # where the metrics collector finds a registry's monitor


@dataclass
class BackendHealth:
    """What the monitor knows of one backend."""

    role: str
    backend: Backend
    up: bool = True
    checks: int = 0
    failures: int = 0  # failed checks, in all
    consecutive_failures: int = 0
    consecutive_ok: int = 0
    last_duration: float = 0.0
    last_error: str = ""
    last_status: str = ""  # the last report's status, when it answered


@dataclass
class MonitorFigures:
    failovers: int = 0
    failbacks: int = 0
    switches: list[tuple[float, str, str]] = field(default_factory=list)  # (time, to, why)


def switch_backend(registry: Registry, backend: Backend) -> None:
    """Point ``registry``'s calls at ``backend`` (its point reads too, metrics kept)."""
    registry._backend = backend
    registry.lookup = backend.lookup  # type: ignore[method-assign]
    registry.lookup_with_metadata = backend.lookup_with_metadata  # type: ignore[method-assign]
    _opmetrics.rebind_reads(registry)


class BackendMonitor:
    """Health checks of ``registry``'s backends; failover and failback (see the module).

    ``standby`` is omitted for a registry on a ``DualWriteBackend`` (its secondary is the
    standby). ``on_switch(role, reason)`` is called after each switch. ``check_once()`` runs
    one round (what the background thread of ``start()`` does every ``interval`` seconds).
    """

    def __init__(
        self,
        registry: Registry,
        standby: Backend | None = None,
        *,
        interval: float = 5.0,
        fail_after: int = 3,
        recover_after: int = 5,
        timeout: float = 5.0,
        on_switch: Callable[[str, str], None] | None = None,
    ) -> None:
        for argument, value in (("fail_after", fail_after), ("recover_after", recover_after)):
            if type(value) is not int or value < 1:
                raise InvalidArgument(
                    f"{argument} must be an int >= 1, got {value!r}",
                    argument=argument,
                    value=repr(value),
                )
        for argument, seconds in (("interval", interval), ("timeout", timeout)):
            if type(seconds) not in (int, float) or not 0 < seconds < float("inf"):
                raise InvalidArgument(
                    f"{argument} must be seconds > 0, got {seconds!r}",
                    argument=argument,
                    value=repr(seconds),
                )
        dual = registry.backend if isinstance(registry.backend, DualWriteBackend) else None
        if dual is not None and standby in (None, dual.secondary):
            standby = dual.secondary
        elif dual is not None or not isinstance(standby, Backend):
            raise InvalidArgument(
                "standby must implement shmreg.backends.Backend (and be omitted for a "
                f"registry on a DualWriteBackend), got {standby!r}",
                argument="standby",
                value=repr(standby),
            )
        self.registry = registry
        self._dual = dual
        self.backends = {
            PRIMARY: BackendHealth(PRIMARY, registry.backend if dual is None else dual.primary),
            STANDBY: BackendHealth(STANDBY, standby),
        }
        self.active = STANDBY if dual is not None and dual.serving != "primary" else PRIMARY
        self.figures = MonitorFigures()
        self._interval = float(interval)
        self._fail_after = fail_after
        self._recover_after = recover_after
        self._timeout = float(timeout)
        self._on_switch = on_switch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        setattr(registry, _ATTR, self)

    # ------------------------------------------------------------------ checks

    def _check(self, health: BackendHealth) -> None:
        started = time.monotonic()
        error = ""
        try:
            report = health.backend.health_check()
            health.last_status = report.status.value
        except Exception as exc:  # whatever the backend raises, it did not answer
            error = f"{type(exc).__name__}: {exc}"
        health.last_duration = time.monotonic() - started
        if not error and health.last_duration > self._timeout:
            error = f"health check took {health.last_duration:.1f} s (timeout {self._timeout} s)"
        health.checks += 1
        if error:
            health.failures += 1
            health.consecutive_failures += 1
            health.consecutive_ok = 0
            health.last_error = error
            if health.up:
                _log.monitoring.warning(
                    "registry %r: %s backend check failed: %s",
                    self.registry.name,
                    health.role,
                    error,
                )
            health.up = False
        else:
            health.consecutive_failures = 0
            health.consecutive_ok += 1
            if not health.up:
                _log.monitoring.info(
                    "registry %r: %s backend answers again", self.registry.name, health.role
                )
            health.up = True

    def check_once(self) -> str:
        """Check both backends, switch if the thresholds say so; the role in use after."""
        with self._lock:
            for health in self.backends.values():
                self._check(health)
            active = self.backends[self.active]
            other_role = STANDBY if self.active == PRIMARY else PRIMARY
            other = self.backends[other_role]
            if self.active == PRIMARY and active.consecutive_failures >= self._fail_after:
                if other.up:
                    self._switch(
                        STANDBY,
                        f"{active.consecutive_failures} failed checks: {active.last_error}",
                    )
            elif self.active == STANDBY:
                if other.consecutive_ok >= self._recover_after:
                    self._switch(PRIMARY, f"{other.consecutive_ok} healthy checks")
                elif active.consecutive_failures >= self._fail_after and other.up:
                    self._switch(PRIMARY, f"standby failed: {active.last_error}")
            return self.active

    def _switch(self, role: str, reason: str) -> None:
        if self._dual is None:
            switch_backend(self.registry, self.backends[role].backend)
        elif role == STANDBY:
            self._dual.fail_over()
        else:
            try:
                copied = self._dual.fail_back()
            except Exception as exc:  # the primary is not up to date: stay, try next round
                _log.monitoring.warning(
                    "registry %r: failback postponed, the primary could not be resynced: %s",
                    self.registry.name,
                    exc,
                )
                return
            reason = f"{reason}; {copied} names resynced to the primary"
        previous, self.active = self.active, role
        self.backends[role].consecutive_ok = 0
        if role == STANDBY:
            self.figures.failovers += 1
            _log.monitoring.warning(
                "registry %r: failover from primary to standby backend (%s)",
                self.registry.name,
                reason,
            )
        else:
            self.figures.failbacks += 1
            _log.monitoring.warning(
                "registry %r: back from %s to the primary backend (%s)",
                self.registry.name,
                previous,
                reason,
            )
        self.figures.switches.append((time.time(), role, reason))
        del self.figures.switches[:-100]  # the latest hundred are plenty to read
        if self._on_switch is not None:
            self._on_switch(role, reason)

    # ------------------------------------------------------------------ thread

    def start(self) -> BackendMonitor:
        """Check every ``interval`` seconds in a daemon thread until ``stop()``."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"shmreg-backend-monitor-{self.registry.name}", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception as exc:  # an on_switch callback's error must not end the checks
                _log.monitoring.exception(
                    "registry %r: backend monitor round failed: %r", self.registry.name, exc
                )
            self._stop.wait(self._interval)

    def stop(self, timeout: float = 30.0) -> None:
        """End the background checks, waiting up to ``timeout`` s for a round under way."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> BackendMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        """The figures as a plain dict (for logs, JSON and the metrics collector)."""
        return {
            "active": self.active,
            "failovers": self.figures.failovers,
            "failbacks": self.figures.failbacks,
            "backends": {
                role: {
                    "kind": getattr(h.backend, "kind", type(h.backend).__name__),
                    "up": h.up,
                    "checks": h.checks,
                    "failures": h.failures,
                    "last_duration": h.last_duration,
                    "last_error": h.last_error,
                    "last_status": h.last_status,
                }
                for role, h in self.backends.items()
            },
        }


def monitor_of(registry: Registry) -> BackendMonitor | None:
    """The ``BackendMonitor`` created for ``registry`` in this process, if any."""
    found: BackendMonitor | None = getattr(registry, _ATTR, None)
    return found
