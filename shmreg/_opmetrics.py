"""Operation metrics in-process: calls, errors and latency per operation kind.

``instrument(registry)`` counts that handle's calls: its point reads through wrappers stored
on the instance, its writes and scans through a subclass it switches the instance to
(nothing changes for other handles, nothing is kept in shared memory). Counts of calls and
errors are exact. Latency goes into a histogram from a sample: one point read in
``READ_SAMPLE`` (they take ~1-2 µs), one write in ``WRITE_SAMPLE``, every scan. Timing
every call would cost ~0.6 µs each (two clock reads and the bucket), 30 % of a lookup;
sampled, the overhead stays under 5 % (bench/opmetrics.py).

On by default for every registry opened in this process; ``SHMREG_OPERATION_METRICS=0`` in
the environment, or ``set_enabled(False)``, turns them off for registries opened after, and
``uninstrument(registry)`` for one already open. Counters are this process's own, kept
without a lock: under heavy multithreading an increment can rarely be lost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from shmreg._engine import fastpath

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

    __slots__ = ("buckets", "calls", "errors", "every", "left", "sum_ns")

    def __init__(self, every: int = 1) -> None:
        self.calls = 0  # in whole blocks of ``every``; ``every - left`` more are under way
        self.every = self.left = every
        self.errors: dict[str, int] = {}
        self.buckets = [0] * NBUCKETS  # the last one is +Inf
        self.sum_ns = [0]  # a list: the read wrappers add to it without an attribute store

    def failed(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


def set_enabled(enabled: bool) -> None:
    """Instrument registries opened from now on (True) or not (False)."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def _wrap_read(fn: Callable[[Any, Any], Any], stats: OpStats) -> Callable[[Any, Any], Any]:
    """A point read (bound to the backend) counted on every call, timed on one in
    ``READ_SAMPLE``. Calls are counted in blocks, added when the block's timed call runs and
    topped up at export from ``left``: the untimed path is a decrement and a test.

    With the compiled path the wrapper is its C twin (``_speedups.Counted``): the same
    figures, for ~0.05 µs a call instead of ~0.2 (a compiled lookup takes ~0.3)."""
    if fastpath.speedups is not None:
        counted: Any = fastpath.speedups.Counted(fn, stats, READ_SAMPLE, FIRST_SHIFT, NBUCKETS)
        return counted  # type: ignore[no-any-return]
    left = READ_SAMPLE
    buckets, total, last = stats.buckets, stats.sum_ns, NBUCKETS - 1

    def read(namespace: Any, service: Any) -> Any:
        nonlocal left
        left -= 1
        if left:
            try:
                return fn(namespace, service)
            except BaseException as exc:
                stats.failed(exc)
                raise
        left = READ_SAMPLE
        stats.calls += READ_SAMPLE
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

    read.pending = lambda: READ_SAMPLE - left  # type: ignore[attr-defined]
    return read


def _timed(stats: OpStats, base: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The one call in ``stats.every`` that is timed (the rest take the method's fast path)."""
    stats.left = stats.every
    stats.calls += stats.every
    start = _now()
    try:
        result = base(*args, **kwargs)
    except BaseException as exc:
        stats.failed(exc)
        raise
    ns = _now() - start
    stats.sum_ns[0] += ns
    i = (ns >> FIRST_SHIFT).bit_length()
    stats.buckets[i if i < NBUCKETS - 1 else NBUCKETS - 1] += 1
    return result


def _method(op: str, base: Callable[..., Any]) -> Callable[..., Any]:
    """``base`` (a scan: timed on every call) as a counted method of the subclass.

    Methods of a subclass, not closures stored on the instance: a closure holding the
    registry would keep it alive in a cycle (freed late, by the collector), one holding it
    weakly would lose it in a chained ``Registry.attach(name).register(...)``.
    """

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _timed(self.__dict__[_ATTR][0][op], base, self, *args, **kwargs)

    method.__name__ = op
    method.__doc__ = base.__doc__
    return method


def _write_methods(cls: Any) -> dict[str, Callable[..., Any]]:
    """The writes as counted methods, timed on one call in ``WRITE_SAMPLE``.

    Written out with each write's own parameters: forwarding ``*args, **kwargs`` costs
    ~0.5 µs a call, several per cent of a register.
    """
    register_, register_many_ = cls.register, cls.register_many
    update_metadata_, unregister_ = cls.update_metadata, cls.unregister

    def register(
        self: Any, namespace: str, service: Any, pid: int | None = None, metadata: Any = None
    ) -> Any:
        stats: OpStats = self.__dict__[_ATTR][0]["register"]
        stats.left -= 1
        if stats.left:
            try:
                return register_(self, namespace, service, pid, metadata)
            except BaseException as exc:
                stats.failed(exc)
                raise
        return _timed(stats, register_, self, namespace, service, pid, metadata)

    def register_many(self: Any, namespace: str, items: Any) -> Any:
        stats: OpStats = self.__dict__[_ATTR][0]["register_many"]
        stats.left -= 1
        if stats.left:
            try:
                return register_many_(self, namespace, items)
            except BaseException as exc:
                stats.failed(exc)
                raise
        return _timed(stats, register_many_, self, namespace, items)

    def update_metadata(
        self: Any,
        namespace: str,
        service: Any,
        metadata: Any,
        *,
        merge: bool = False,
        generation: int | None = None,
    ) -> Any:
        stats: OpStats = self.__dict__[_ATTR][0]["update_metadata"]
        stats.left -= 1
        if stats.left:
            try:
                return update_metadata_(
                    self, namespace, service, metadata, merge=merge, generation=generation
                )
            except BaseException as exc:
                stats.failed(exc)
                raise
        return _timed(
            stats,
            update_metadata_,
            self,
            namespace,
            service,
            metadata,
            merge=merge,
            generation=generation,
        )

    def unregister(
        self: Any, namespace: str, service: Any, *, generation: int | None = None
    ) -> Any:
        stats: OpStats = self.__dict__[_ATTR][0]["unregister"]
        stats.left -= 1
        if stats.left:
            try:
                return unregister_(self, namespace, service, generation=generation)
            except BaseException as exc:
                stats.failed(exc)
                raise
        return _timed(stats, unregister_, self, namespace, service, generation=generation)

    methods: dict[str, Callable[..., Any]] = {
        "register": register,
        "register_many": register_many,
        "update_metadata": update_metadata,
        "unregister": unregister,
    }
    for name in methods:
        methods[name].__doc__ = getattr(cls, name).__doc__
    return methods


_classes: dict[type, type] = {}


def _instrumented_class(cls: type) -> type:
    """``cls`` with its writes and scans counted (made once per class)."""
    made = _classes.get(cls)
    if made is None:
        methods: dict[str, Any] = {op: _method(op, getattr(cls, op)) for op in SCANS}
        methods.update(_write_methods(cls))
        methods["__module__"] = cls.__module__
        methods["__qualname__"] = cls.__qualname__
        made = _classes[cls] = type(cls.__name__, (cls,), methods)
    return made


def instrument(registry: Registry) -> None:
    """Count and time ``registry``'s operations (idempotent)."""
    if registry.__dict__.get(_ATTR) is not None:
        return
    table: dict[str, OpStats] = {}
    reads: dict[str, Callable[..., Any]] = {}
    for op in READS + WRITES + SCANS:
        table[op] = OpStats(READ_SAMPLE if op in READS else WRITE_SAMPLE if op in WRITES else 1)
    for op in READS:  # bound to the backend already: no cycle through the registry
        reads[op] = _wrap_read(getattr(registry, op), table[op])
        setattr(registry, op, reads[op])
    registry.__dict__[_ATTR] = (table, reads)
    registry.__class__ = _instrumented_class(type(registry))


def rebind_reads(registry: Registry) -> None:
    """After the registry's point reads were rebound (a backend switch): wrap them again,
    counting into the same figures."""
    state = registry.__dict__.get(_ATTR)
    if state is None:
        return
    table, reads = state
    for op in READS:
        reads[op] = _wrap_read(getattr(registry, op), table[op])
        setattr(registry, op, reads[op])


def uninstrument(registry: Registry) -> None:
    """Remove the counting: the registry's calls go straight through again."""
    if registry.__dict__.get(_ATTR) is None:
        return
    registry.__class__ = type(registry).__mro__[1]
    backend = registry.backend
    registry.lookup = backend.lookup  # type: ignore[method-assign]
    registry.lookup_with_metadata = backend.lookup_with_metadata  # type: ignore[method-assign]
    registry.__dict__[_ATTR] = None


def snapshot(registry: Registry) -> dict[str, dict[str, Any]]:
    """Per operation: ``calls``, ``errors`` (by exception type), ``sampled``, ``sum_ns`` and
    the histogram ``buckets`` (counts per bound of ``BOUNDS_NS``, then +Inf); empty when off."""
    state = registry.__dict__.get(_ATTR)
    if state is None:
        return {}
    table, reads = state
    out = {}
    for op, stats in table.items():
        pending = reads[op].pending() if op in reads else stats.every - stats.left
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
