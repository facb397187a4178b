"""Operation metrics in-process: calls, errors and latency per operation kind.

``instrument(registry)`` wraps the registry's public calls on that instance (nothing on the
class, nothing in shared memory). Counts of calls and errors are exact. Latency goes into a
histogram from a sample: one point read in ``READ_SAMPLE`` (they take ~1-2 µs), one write in
``WRITE_SAMPLE``, every scan. Timing every call would cost ~0.6 µs each (two clock reads and
the bucket), 30 % of a lookup; sampled, the overhead stays under 5 % (bench/opmetrics.py).

On by default for every registry opened in this process; ``SHMREG_OPERATION_METRICS=0`` in
the environment, or ``set_enabled(False)``, turns them off for registries opened after, and
``uninstrument(registry)`` for one already open. Counters are this process's own, kept
without a lock: under heavy multithreading an increment can rarely be lost.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    from shmreg._registry import Registry

READ_SAMPLE = 64  # one point read in this many is timed
WRITE_SAMPLE = 8  # one write in this many
# Histogram buckets double from 1.024 µs (2**10 ns) up: a latency's bucket is one
# bit_length(), far cheaper on the call path than a search over arbitrary bounds.
FIRST_SHIFT = 10
NBUCKETS = 21  # up to 2**30 ns (~1.07 s), then +Inf
BOUNDS_NS = [1 << (FIRST_SHIFT + i) for i in range(NBUCKETS - 1)]
READS = ("lookup", "lookup_with_metadata")
WRITES = ("register", "register_many", "update_metadata", "unregister")
SCANS = (
    "list_services",
    "list_services_with_metadata",
    "find_services_by_metadata",
    "find_by_metadata",
    "list_by_type",
    "count",
    "sweep",
)
_ATTR = "_shmreg_opstats"
_enabled = os.environ.get("SHMREG_OPERATION_METRICS", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)
_now = time.perf_counter_ns


class OpStats:
    """One operation kind's figures: calls, errors by exception type, latency histogram."""

    __slots__ = ("buckets", "calls", "errors", "sum_ns")

    def __init__(self) -> None:
        self.calls = 0
        self.errors: dict[str, int] = {}
        self.buckets = [0] * NBUCKETS  # the last one is +Inf
        self.sum_ns = [0]  # a list: the wrappers add to it without an attribute store

    def failed(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


def set_enabled(enabled: bool) -> None:
    """Instrument registries opened from now on (True) or not (False)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def _wrap(
    fn: Callable[..., Any], owner: weakref.ref[Registry] | None, stats: OpStats, every: int
) -> Callable[..., Any]:
    """``fn`` counted on every call and timed on one call in ``every``.

    Calls are counted in blocks of ``every``, added when the block's timed call runs and
    topped up at export from ``left``: the untimed path is a decrement and a test. With
    ``owner``, ``fn`` is the class's function and the registry is held weakly: a wrapper
    holding a bound method would make registry -> wrapper -> registry a cycle, and an
    unclosed registry would then be freed by the cyclic collector, not when dropped.
    """
    left = every
    buckets, total, last = stats.buckets, stats.sum_ns, NBUCKETS - 1

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal left
        left -= 1
        if left:
            try:
                return fn(owner(), *args, **kwargs)  # type: ignore[misc]
            except BaseException as exc:
                stats.failed(exc)
                raise
        left = every
        stats.calls += every
        start = _now()
        try:
            result = fn(owner(), *args, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            stats.failed(exc)
            raise
        ns = _now() - start
        total[0] += ns
        i = (ns >> FIRST_SHIFT).bit_length()
        buckets[i if i < last else last] += 1
        return result

    def read(namespace: Any, service: Any) -> Any:  # the point reads' path: no packing
        nonlocal left
        left -= 1
        if left:
            try:
                return fn(namespace, service)
            except BaseException as exc:
                stats.failed(exc)
                raise
        left = every
        stats.calls += every
        start = _now()
        try:
            result = fn(namespace, service)
        except BaseException as exc:
            stats.failed(exc)
            raise
        ns = _now() - start
        total[0] += ns
        i = (ns >> FIRST_SHIFT).bit_length()
        buckets[i if i < last else last] += 1
        return result

    chosen = call if owner is not None else read
    chosen.pending = lambda: every - left  # type: ignore[attr-defined]
    return chosen


def instrument(registry: Registry) -> None:
    """Wrap ``registry``'s operations with metrics (idempotent)."""
    if getattr(registry, _ATTR, None) is not None:
        return
    table: dict[str, OpStats] = {}
    wrappers: dict[str, Callable[..., Any]] = {}
    owner = weakref.ref(registry)
    for op in READS + WRITES + SCANS:
        table[op] = stats = OpStats()
        if op in READS:  # bound to the backend already: no cycle through the registry
            wrappers[op] = _wrap(getattr(registry, op), None, stats, READ_SAMPLE)
        else:
            every = WRITE_SAMPLE if op in WRITES else 1
            wrappers[op] = _wrap(getattr(type(registry), op), owner, stats, every)
    for op, wrapper in wrappers.items():
        setattr(registry, op, wrapper)
    setattr(registry, _ATTR, (table, wrappers))


def rebind_reads(registry: Registry) -> None:
    """After the registry's point reads were rebound (a backend switch): wrap them again,
    counting into the same figures."""
    state = getattr(registry, _ATTR, None)
    if state is None:
        return
    table, wrappers = state
    for op in READS:
        wrappers[op] = _wrap(getattr(registry, op), None, table[op], READ_SAMPLE)
        setattr(registry, op, wrappers[op])


def uninstrument(registry: Registry) -> None:
    """Remove the wrappers: the registry's calls go straight through again."""
    state = getattr(registry, _ATTR, None)
    if state is None:
        return
    for op in state[1]:
        delattr(registry, op)  # the class's method (or, for reads, rebind below)
    backend = registry.backend
    registry.lookup = backend.lookup  # type: ignore[method-assign]
    registry.lookup_with_metadata = backend.lookup_with_metadata  # type: ignore[method-assign]
    setattr(registry, _ATTR, None)


def snapshot(registry: Registry) -> dict[str, dict[str, Any]]:
    """Per operation: ``calls``, ``errors`` (by exception type), ``sampled``, ``sum_ns`` and
    the histogram ``buckets`` (counts per bound of ``BOUNDS_NS``, then +Inf); empty when off."""
    state = getattr(registry, _ATTR, None)
    if state is None:
        return {}
    table, wrappers = state
    out = {}
    for op, stats in table.items():
        pending = getattr(wrappers[op], "pending", lambda: 0)()
        out[op] = {
            "calls": stats.calls + pending,
            "errors": dict(stats.errors),
            "sampled": sum(stats.buckets),
            "sum_ns": stats.sum_ns[0],
            "buckets": list(stats.buckets),
        }
    return out


def families(
    registry: Registry, labels: Mapping[str, str]
) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
    """Prometheus families of ``snapshot(registry)``; nothing when metrics are off."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    ops = snapshot(registry)
    if not ops:
        return
    names, values = list(labels), list(labels.values())
    calls = CounterMetricFamily(
        "shmreg_operations_total",
        "Calls per operation in this process (errors included).",
        labels=[*names, "operation"],
    )
    errors = CounterMetricFamily(
        "shmreg_operation_errors_total",
        "Calls that raised, per operation and exception type, in this process.",
        labels=[*names, "operation", "error"],
    )
    latency = HistogramMetricFamily(
        "shmreg_operation_duration_seconds",
        f"Latency per operation in this process (point reads: one call in {READ_SAMPLE}).",
        labels=[*names, "operation"],
    )
    bounds = [f"{b / 1e9:.9g}" for b in BOUNDS_NS] + ["+Inf"]
    for op, data in ops.items():
        calls.add_metric([*values, op], data["calls"])
        for error, n in sorted(data["errors"].items()):
            errors.add_metric([*values, op, error], n)
        running, cumulative = 0, []
        for bound, n in zip(bounds, data["buckets"], strict=True):
            running += n
            cumulative.append((bound, running))
        latency.add_metric([*values, op], cumulative, data["sum_ns"] / 1e9)
    yield calls
    yield errors
    yield latency
