"""Conformance checks: many entries, racing threads, statistics, and the end of a backend."""

from __future__ import annotations

import os
import threading

import msgpack

from shmreg import _codec
from shmreg._errors import AlreadyRegistered, RegistryDestroyed
from shmreg._types import Metadata, ProcessIdentity, RegistryStats, Service
from shmreg.backends._protocol import Backend
from shmreg.testing._checks_common import (
    NS,
    OTHER,
    Check,
    _children,
    _equal,
    _expect,
    _me,
    _owner,
    _raises,
    collector,
)

CHECKS: list[tuple[str, Check]] = []
_check = collector(CHECKS)


# ------------------------------------------------------------------- scale, threads, stats


@_check
def many_entries(b: Backend) -> None:
    n = 5000
    for i in range(n):
        b.register(NS if i % 2 else OTHER, ("job", i), _me(), {"i": i})
    _equal(b.count(), n, "count()")
    _equal(len(b.list_services(NS)) + len(b.list_services(OTHER)), n, "listed")
    for i in range(0, n, 97):
        found = b.lookup_with_metadata(NS if i % 2 else OTHER, ("job", i))
        _equal(found, (os.getpid(), {"i": i}), f"lookup of entry {i}")
    _equal(b.stats().used, n, "stats().used")
    for i in range(0, n, 2):
        b.unregister(OTHER, ("job", i))
    _equal((b.count(), b.count(OTHER)), (n // 2, 0), "counts after unregistering half")


def _race(b: Backend, service: int, owners: list[ProcessIdentity]) -> list[object]:
    """Every owner registers ``service`` at once, each from its own thread."""
    barrier = threading.Barrier(len(owners), timeout=60)
    results: list[object] = [None] * len(owners)

    def claim(i: int) -> None:
        barrier.wait()
        try:
            results[i] = b.register(NS, service, owners[i], {"i": i})
        except AlreadyRegistered as exc:
            results[i] = exc
        except Exception as exc:  # reported by the caller, not lost in the thread
            results[i] = repr(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(owners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@_check
def concurrent_register_one_winner(b: Backend) -> None:
    with _children(3) as procs:
        owners = [_me(), *(_owner(p) for p in procs)]
        for round_ in range(10):
            results = _race(b, round_, owners)
            winners = [i for i, r in enumerate(results) if type(r) is int]
            _equal(len(winners), 1, f"winners of round {round_} ({results!r})")
            pid = owners[winners[0]].pid
            _expect(
                all(
                    isinstance(r, AlreadyRegistered) and r.pid == pid
                    for i, r in enumerate(results)
                    if i != winners[0]
                ),
                f"losers must get AlreadyRegistered(pid={pid}): {results!r}",
            )
            _equal(b.lookup(NS, round_), pid, "lookup of the winner")


@_check
def concurrent_writers_consistent(b: Backend) -> None:
    errors: list[str] = []

    def write(t: int) -> None:
        try:
            for i in range(300):
                b.register(NS, (t, i), _me(), {"t": t})
                if i % 3 == 0:
                    b.unregister(NS, (t, i))
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _equal(errors, [], "errors in writer threads")
    _equal(b.count(NS), 4 * 200, "count after concurrent writers")


#: Keys every backend's ``statistics()`` summary carries (``RegistryStats.summary``).
SUMMARY_KEYS = frozenset(
    {"backend", "name", "entries", "capacity", "load_factor", "memory_bytes", "sweeps",
     "generation", "ops"}
)


@_check
def stats_and_statistics(b: Backend) -> None:
    """The figures describe what the backend was created with and what it stores.

    Capacity is a floor the backend may round up (at most doubling) or grow past; memory is at
    least the bytes of every stored key and metadata and at most what a full registry of that
    capacity could need; ``statistics()`` repeats ``stats()``. A made-up figure fails one of
    these bounds.
    """
    created = getattr(b, "capacity", None)  # both shipped backends expose their settings
    limit = getattr(b, "max_metadata_bytes", 4096)
    blob = {"blob": "m" * max(0, min(limit, 4096) - 64)}  # near the largest allowed
    stored: dict[tuple[str, Service], Metadata | None] = {
        (NS, "a"): {"x": 1},
        (OTHER, "b"): None,
        (NS, ("big", 1)): blob,
    }
    for (namespace, service), metadata in stored.items():
        b.register(namespace, service, _me(), metadata)
    stats = b.stats()
    _expect(isinstance(stats, RegistryStats), f"stats() gave {stats!r}")
    _equal((stats.used, stats.namespaces), (3, 2), "stats() used, namespaces")
    floor = max(created if isinstance(created, int) else 0, stats.used, 1)
    _expect(
        floor <= stats.capacity <= 2 * floor + 1,
        f"stats().capacity {stats.capacity}: created with {created}, holding {stats.used}",
    )
    _expect(
        stats.used / (2 * stats.capacity)
        <= stats.load_factor
        <= (stats.used + stats.tombstones) / stats.capacity + 1e-9,
        f"stats().load_factor {stats.load_factor} for {stats.used} entries "
        f"(+{stats.tombstones} tombstones) in capacity {stats.capacity}",
    )
    payload = sum(
        len(_codec.encode_key(namespace, service)) + len(msgpack.packb(metadata or {}))
        for (namespace, service), metadata in stored.items()
    )
    most = stats.capacity * (limit + 1024) + 16 * 2**20
    _expect(
        payload <= stats.memory_bytes <= most,
        f"stats().memory_bytes {stats.memory_bytes}: stores {payload} bytes, a full "
        f"registry of this capacity needs at most {most}",
    )
    info = b.statistics()
    _expect(
        isinstance(info, dict) and set(info) >= SUMMARY_KEYS,
        f"statistics() must be a dict with at least {sorted(SUMMARY_KEYS)}, got {info!r}",
    )
    _expect(all(type(k) is str for k in info), f"statistics() keys must be str: {info!r}")
    _equal(
        {k: info[k] for k in ("backend", "name", "entries", "capacity", "memory_bytes",
                              "sweeps")},
        {"backend": stats.backend, "name": b.name, "entries": stats.used,
         "capacity": stats.capacity, "memory_bytes": stats.memory_bytes,
         "sweeps": stats.sweeps},
        "statistics() against stats()",
    )
    _expect(info["load_factor"] == stats.load_factor, f"statistics() load_factor {info}")
    _expect(
        isinstance(info["ops"], int) and info["ops"] >= len(stored),
        f"statistics() ops {info['ops']!r} after {len(stored)} registrations",
    )


@_check
def destroy_ends_every_call(b: Backend) -> None:
    b.register(NS, "svc", _me(), None)
    b.destroy()
    for call, args in (
        (b.lookup, (NS, "svc")),
        (b.lookup_with_metadata, (NS, "svc")),
        (b.register, (NS, "svc", _me(), None)),
        (b.unregister, (NS, "svc")),
        (b.list_services, (NS,)),
        (b.count, ()),
        (b.sweep, ()),
    ):
        _raises(RegistryDestroyed, call, *args)
    b.destroy()  # idempotent: callers clean up in finally blocks
