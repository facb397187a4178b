"""shmreg: a process registry in shared memory.

Processes on one machine register names with their pid and a metadata dict; every other
process sees them at memory speed, and entries of dead processes go away on their own.
"""

from shmreg._clock import Clock
from shmreg._engine.events import Event
from shmreg._errors import *  # noqa: F403
from shmreg._errors import __all__ as _errors_all
from shmreg._liveness import CleanupReport, Monitor, MonitorStats
from shmreg._monitoring import BackendMonitor
from shmreg._registry import Registry
from shmreg._types import (
    Entry,
    HealthReport,
    HealthStatus,
    Liveness,
    Metadata,
    ProcessIdentity,
    RegistryStats,
    Service,
)

__version__ = "0.1.0"

for _public in (
    Registry,
    CleanupReport,
    Clock,
    Event,
    Monitor,
    MonitorStats,
    BackendMonitor,
    Entry,
    HealthReport,
    HealthStatus,
    Liveness,
    ProcessIdentity,
    RegistryStats,
):
    _public.__module__ = "shmreg"
del _public

__all__ = [
    *_errors_all,
    "CleanupReport",
    "Clock",
    "BackendMonitor",
    "Entry",
    "Event",
    "HealthReport",
    "HealthStatus",
    "Liveness",
    "Metadata",
    "Monitor",
    "MonitorStats",
    "ProcessIdentity",
    "Registry",
    "RegistryStats",
    "Service",
    "__version__",
]
