"""Prometheus metrics for a registry: a collector that reads the shared state on each scrape.

One scraper sees every process's registrations without any process pushing: the figures
come from the registry itself (entries, capacity, sweeps, recoveries kept in shared
memory), from the event log (registrations, updates, removals and deaths, counted from the
events the collector reads after the previous scrape), from a death monitor when the
exporting process runs one, and from this process's operation metrics when they are on.

Needs the ``metrics`` extra (``pip install 'shmreg[metrics]'``)::

    from prometheus_client import CollectorRegistry, generate_latest
    from shmreg.metrics import RegistryCollector

    scrape_registry = CollectorRegistry()
    scrape_registry.register(RegistryCollector(reg))
    text = generate_latest(scrape_registry)

Names follow Prometheus conventions: a ``shmreg_`` prefix, base units, ``_total`` counters,
and no label per service name or pid (they would grow without bound); the labels are the
registry's name and, on ``shmreg_entries``, the namespace. Another part of shmreg adds its
own figures with ``add_section``: a function of the collector yielding metric families.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    generate_latest,
    start_http_server,
    write_to_textfile,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as _Metric
from prometheus_client.registry import Collector

from shmreg import _opmetrics
from shmreg._types import HealthStatus

if TYPE_CHECKING:
    from shmreg._liveness import Monitor
    from shmreg._registry import Registry

Metric = _Metric  # any metric family
Section = Callable[["RegistryCollector"], Iterable[Metric]]

_log = logging.getLogger("shmreg.metrics")
_STATUS_VALUE = {HealthStatus.HEALTHY: 0, HealthStatus.DEGRADED: 1, HealthStatus.UNHEALTHY: 2}
# Event kinds and the counter each is added to.
_EVENT_COUNTERS = {
    "registered": ("shmreg_registrations_total", "Registrations (takeovers included)."),
    "updated": ("shmreg_updates_total", "Re-registrations and metadata updates."),
    "unregistered": ("shmreg_removals_total", "Entries removed by unregister."),
    "died": ("shmreg_deaths_total", "Entries removed because their owner died."),
}


class RegistryCollector(Collector):
    """A ``prometheus_client`` collector for one open registry.

    ``monitor``: the death monitor this process runs, if any (adds its counters and lag).
    Thread-safe: an HTTP server may scrape from several threads at once.
    """

    def __init__(self, registry: Registry, *, monitor: Monitor | None = None) -> None:
        self.registry = registry
        self.monitor = monitor
        self.labels = {"registry": registry.name}
        self._lock = threading.Lock()
        backend = registry.backend
        self._cursor = backend.last_event_seq()  # per-kind event counts start here
        self._event_counts = dict.fromkeys(_EVENT_COUNTERS, 0)
        self._events_missed = 0
        self._scrape_errors = 0

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration time: that would scrape the registry

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        with self._lock:
            families: list[Metric] = []
            up = 1
            for section in SECTIONS:
                try:
                    families.extend(section(self))
                except Exception as exc:  # one failing source must not hide the others
                    up = 0 if section is registry_section else up
                    self._scrape_errors += 1
                    _log.warning(
                        "registry %r: metrics section %s failed: %r",
                        self.registry.name,
                        section.__name__,
                        exc,
                    )
            families.append(self.gauge("shmreg_backend_up", "1 if the backend answered.", up))
            families.append(
                self.counter(
                    "shmreg_scrape_errors_total",
                    "Sections of a scrape that failed (each is logged).",
                    self._scrape_errors,
                )
            )
            families.append(
                self.gauge(
                    "shmreg_scrape_duration_seconds",
                    "Time the previous part of this scrape took.",
                    time.perf_counter() - started,
                )
            )
        yield from families

    # ------------------------------------------------------------------ helpers for sections

    def gauge(
        self, name: str, doc: str, value: float, labels: dict[str, str] | None = None
    ) -> GaugeMetricFamily:
        """A one-sample gauge labelled with the registry (plus ``labels``)."""
        full = {**self.labels, **(labels or {})}
        family = GaugeMetricFamily(name, doc, labels=list(full))
        family.add_metric(list(full.values()), value)
        return family

    def counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        """A one-sample counter labelled with the registry; ``name`` ends in ``_total``."""
        family = CounterMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def read_new_events(self) -> None:
        """Count the kinds of the events written since the previous scrape."""
        backend = self.registry.backend
        while True:
            events, lost = backend.read_events(self._cursor)
            self._events_missed += lost
            self._cursor += lost
            for event in events:
                self._cursor = event.seq
                if event.kind in self._event_counts:
                    self._event_counts[event.kind] += 1
            if not events:
                return


# ---------------------------------------------------------------------- sections


def registry_section(c: RegistryCollector) -> Iterator[Metric]:
    """What the registry keeps in shared state: sizes, health, sweeps, recoveries."""
    reg = c.registry
    stats = reg.stats()
    health = reg.health_check()
    counts: dict[str, int] | None = getattr(reg.backend, "namespace_counts", lambda: None)()
    entries = GaugeMetricFamily(
        "shmreg_entries",
        "Entries of live processes, per namespace.",
        labels=["registry", "namespace"],
    )
    if counts is None:  # a backend without per-namespace counts: the total, namespace ""
        counts = {"": reg.backend.count()}
    for namespace, n in sorted(counts.items()):
        entries.add_metric([reg.name, namespace], n)
    yield entries
    yield c.gauge("shmreg_stored_entries", "Entries stored, dead owners' included.", stats.used)
    yield c.gauge("shmreg_dead_entries", "Entries of dead processes not yet removed.", health.dead)
    yield c.gauge(
        "shmreg_unknown_owner_entries",
        "Entries whose owner's liveness cannot be read.",
        health.unknown,
    )
    yield c.gauge(
        "shmreg_damaged_entries", "Entries whose record is damaged (fsck --repair).", health.damaged
    )
    yield c.gauge(
        "shmreg_health_status",
        "0 healthy, 1 degraded, 2 unhealthy (as shmreg health exits).",
        _STATUS_VALUE[health.status],
    )
    yield c.gauge(
        "shmreg_capacity_entries", "Entries the registry holds before growing.", stats.capacity
    )
    yield c.gauge(
        "shmreg_load_factor_ratio", "Used and tombstoned slots per slot.", stats.load_factor
    )
    yield c.gauge("shmreg_tombstones", "Slots of removed entries awaiting reuse.", stats.tombstones)
    yield c.gauge("shmreg_namespaces", "Namespaces with stored entries.", stats.namespaces)
    yield c.gauge("shmreg_memory_bytes", "Memory the registry's storage uses.", stats.memory_bytes)
    yield c.counter("shmreg_sweeps_total", "Sweeps run by any process.", stats.sweeps)
    yield c.counter("shmreg_sweep_removed_total", "Entries removed by sweeps.", stats.dead_found)
    if stats.last_sweep_time is not None:
        yield c.gauge(
            "shmreg_last_sweep_timestamp_seconds", "When the last sweep ran.", stats.last_sweep_time
        )
    if "recoveries" in stats.extra:
        yield c.counter(
            "shmreg_recoveries_total",
            "Repairs after a writer died holding the lock.",
            stats.extra["recoveries"],
        )


def events_section(c: RegistryCollector) -> Iterator[Metric]:
    """The event log: its sequence (shared, exact) and per-kind counts since the exporter began."""
    c.read_new_events()
    yield c.counter(
        "shmreg_events_total", "Changes committed, all kinds (the event sequence).", c._cursor
    )
    for kind, (name, doc) in _EVENT_COUNTERS.items():
        yield c.counter(name, doc + " Counted since the exporter started.", c._event_counts[kind])
    yield c.counter(
        "shmreg_events_missed_total",
        "Events overwritten in the ring before a scrape read them (kinds not counted).",
        c._events_missed,
    )


def monitor_section(c: RegistryCollector) -> Iterator[Metric]:
    """The death monitor of this process, if it runs one."""
    monitor = c.monitor
    if monitor is None:
        return
    stats = monitor.stats
    yield c.counter("shmreg_monitor_deaths_total", "Owner deaths the monitor saw.", stats.deaths)
    yield c.counter("shmreg_monitor_removed_total", "Entries the monitor removed.", stats.removed)
    # ``running`` covers a monitor thread; ``shmreg monitor`` runs the loop in the foreground
    # (run_forever), which has opened its wake-up pipe and not been asked to stop.
    up = monitor.running or (monitor._wake_r >= 0 and not monitor._stop.is_set())
    yield c.gauge("shmreg_monitor_up", "1 while the monitor's loop runs.", int(up))
    backend = c.registry.backend
    behind = max(0, backend.last_event_seq() - stats.seen)
    lag = 0.0
    if behind:
        events, _ = backend.read_events(stats.seen, limit=1)
        if events and events[0].time:
            lag = max(0.0, time.time() - events[0].time)
    yield c.gauge("shmreg_monitor_lag_events", "Events the monitor has not followed yet.", behind)
    yield c.gauge(
        "shmreg_monitor_lag_seconds", "Age of the oldest event the monitor has not followed.", lag
    )


def backend_monitor_section(c: RegistryCollector) -> Iterator[Metric]:
    """The ``BackendMonitor`` of this registry, if this process runs one."""
    from shmreg._monitoring import monitor_of

    monitor = monitor_of(c.registry)
    if monitor is None:
        return
    names, values = list(c.labels), list(c.labels.values())
    per_role = {
        "shmreg_backend_active": (GaugeMetricFamily, "1 for the backend the registry uses."),
        "shmreg_backend_check_up": (GaugeMetricFamily, "1 if the last health check answered."),
        "shmreg_backend_checks_total": (CounterMetricFamily, "Health checks run."),
        "shmreg_backend_check_failures_total": (CounterMetricFamily, "Health checks failed."),
        "shmreg_backend_check_duration_seconds": (GaugeMetricFamily, "The last check's time."),
    }
    families = {
        name: kind(name, doc, labels=[*names, "role"]) for name, (kind, doc) in per_role.items()
    }
    for role, h in monitor.backends.items():
        for name, value in (
            ("shmreg_backend_active", int(role == monitor.active)),
            ("shmreg_backend_check_up", int(h.up)),
            ("shmreg_backend_checks_total", h.checks),
            ("shmreg_backend_check_failures_total", h.failures),
            ("shmreg_backend_check_duration_seconds", h.last_duration),
        ):
            families[name].add_metric([*values, role], value)
    yield from families.values()
    yield c.counter(
        "shmreg_backend_failovers_total", "Switches to the standby.", monitor.figures.failovers
    )
    yield c.counter(
        "shmreg_backend_failbacks_total", "Switches back to the primary.", monitor.figures.failbacks
    )


def operations_section(c: RegistryCollector) -> Iterator[Metric]:
    """This process's operation metrics (``shmreg._opmetrics``), when they are on."""
    yield from _opmetrics.families(c.registry, c.labels)


def agents_section(c: RegistryCollector) -> Iterator[Metric]:
    """Supervised agents by status and their restarts, read from their records (which
    outlive the agents and the supervisor), one label set per supervisor namespace."""
    from shmreg.agents import list_agents
    from shmreg.agents._records import records_ns

    suffix = records_ns("")
    agent_namespaces = sorted(
        ns[: -len(suffix)] for ns in c.registry.backend.namespaces() if ns.endswith(suffix)
    )
    if not agent_namespaces:
        return
    names, values = list(c.labels), list(c.labels.values())
    agents = GaugeMetricFamily(
        "shmreg_agents", "Supervised agents by status.", labels=[*names, "agents", "status"]
    )
    restarts = CounterMetricFamily(
        "shmreg_agent_restarts_total",
        "Restarts of the agents a supervisor namespace holds (from their records).",
        labels=[*names, "agents"],
    )
    for namespace in agent_namespaces:
        infos = list_agents(c.registry, namespace)
        by_status: dict[str, int] = dict.fromkeys(AGENT_STATUSES, 0)
        for info in infos:
            by_status[info.status] = by_status.get(info.status, 0) + 1
        for status, count in by_status.items():
            agents.add_metric([*values, namespace, status], count)
        restarts.add_metric([*values, namespace], sum(info.restarts for info in infos))
    yield agents
    yield restarts


#: Every status an agent can have: each is exported, zeros included, so alerts on a status
#: see a series before the first agent enters it.
AGENT_STATUSES = (
    "registered", "starting", "running", "stopping", "stopped", "restarting", "failed",
)

SECTIONS: list[Section] = [
    registry_section,
    events_section,
    monitor_section,
    backend_monitor_section,
    operations_section,
    agents_section,
]


def add_section(section: Section) -> None:
    """Export more figures: ``section(collector)`` yields metric families on every scrape."""
    if section not in SECTIONS:
        SECTIONS.append(section)


# ---------------------------------------------------------------------- exporting


def scrape_registry(registry: Registry, *, monitor: Monitor | None = None) -> CollectorRegistry:
    """A ``CollectorRegistry`` holding only this registry's collector."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(RegistryCollector(registry, monitor=monitor))
    return scrape


def exposition(registry: Registry) -> str:
    """The text exposition format of one scrape (what ``shmreg metrics NAME`` prints)."""
    return generate_latest(scrape_registry(registry)).decode()


def serve(scrape: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` from a daemon thread; returns the server (``.shutdown()`` stops it)."""
    server, _thread = start_http_server(port, addr, registry=scrape)
    return server


def write_textfile(scrape: CollectorRegistry, path: str) -> None:
    """Write one scrape to ``path`` atomically (a temporary file renamed over it), for
    node_exporter's textfile collector (the name must end in ``.prom``)."""
    write_to_textfile(path, scrape)


__all__ = [
    "RegistryCollector",
    "Section",
    "add_section",
    "exposition",
    "scrape_registry",
    "serve",
    "write_textfile",
]
