"""Plain value types shared by every layer (a leaf module: it imports nothing of shmreg).

``Service`` is what a caller names inside a namespace; ``ProcessIdentity`` is how shmreg tells
one OS process from another that later got the same pid; the frozen dataclasses are what
``stats()`` and ``health_check()`` return.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# A service name: a non-empty str without NUL, an int, or a flat tuple of those.
Service = str | int | tuple[Any, ...]
Metadata = dict[str, Any]


class ProcessIdentity(NamedTuple):
    """An OS process as shmreg stores it: the pid plus the kernel's start time in clock ticks.

    Two processes that share a pid (the second got it after the first exited) differ in
    ``start_ticks``; that is what makes pid reuse detectable. ``host`` says on which machine
    (``shmreg._identity.host_id()``): ``""`` means this one, which is all a one-host backend
    ever stores. A process is judged alive or dead only on its own host.
    """

    pid: int
    start_ticks: int
    host: str = ""


class Liveness(enum.Enum):
    """What the live system says about a stored identity, compared three ways and then some."""

    SAME = "same"  # the very process that registered is running
    GONE = "gone"  # no process has this pid any more
    REUSED = "reused"  # the pid now belongs to another process
    ZOMBIE = "zombie"  # exited, not yet reaped by its parent: dead for a registry
    UNKNOWN = "unknown"  # cannot tell (no permission, other pid namespace): treated as alive

    @property
    def is_dead(self) -> bool:
        return self in (Liveness.GONE, Liveness.REUSED, Liveness.ZOMBIE)


class Entry(NamedTuple):
    """One registration as queries return it."""

    service: Service
    pid: int
    metadata: Metadata


class HealthStatus(str, enum.Enum):
    """A registry's health by the share of its entries whose owners are dead."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class HealthReport:
    """``health_check()``: healthy below 10 % dead entries, degraded below 30 %, else unhealthy."""

    status: HealthStatus
    backend: str
    total: int
    alive: int
    dead: int
    unknown: int
    detail: str = ""
    damaged: int = 0  # entries whose record is damaged (scans skip them; fsck --repair)

    @classmethod
    def summarise(
        cls,
        backend: str,
        counts: Mapping[ProcessIdentity, int],
        verdicts: Mapping[ProcessIdentity, Liveness],
    ) -> HealthReport:
        """The report for entries per owner (``counts``) and each owner's verdict."""
        total = sum(counts.values())
        dead = sum(n for ident, n in counts.items() if verdicts[ident].is_dead)
        unknown = sum(n for ident, n in counts.items() if verdicts[ident] is Liveness.UNKNOWN)
        return cls(cls.classify(total, dead), backend, total, total - dead - unknown, dead, unknown)

    @staticmethod
    def classify(total: int, dead: int) -> HealthStatus:
        """The status for ``dead`` of ``total`` entries (the thresholds live here only)."""
        if total == 0:
            return HealthStatus.HEALTHY
        ratio = dead / total
        if ratio >= 0.30:
            return HealthStatus.UNHEALTHY
        if ratio >= 0.10:
            return HealthStatus.DEGRADED
        return HealthStatus.HEALTHY


@dataclass(frozen=True)
class RegistryStats:
    """A snapshot of one registry, as ``Registry.stats()`` returns it."""

    backend: str
    capacity: int
    used: int
    tombstones: int
    load_factor: float
    namespaces: int
    memory_bytes: int
    sweeps: int
    last_sweep_time: float | None
    dead_found: int
    extra: dict[str, Any] = field(default_factory=dict)
    # Entries whose owner's liveness cannot be read (another pid namespace, hidepid):
    # kept, never swept, and counted here.
    unknown_owners: int = 0

    def summary(self, name: str) -> dict[str, Any]:
        """The flat dict a backend's ``statistics()`` returns."""
        return {
            "backend": self.backend,
            "name": name,
            "entries": self.used,
            "capacity": self.capacity,
            "load_factor": self.load_factor,
            "memory_bytes": self.memory_bytes,
            "sweeps": self.sweeps,
            "generation": self.extra.get("generation", 1),
            "ops": self.extra["ops"],
        }
