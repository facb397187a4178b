"""Conformance checks: many entries, racing threads, statistics, and the end of a backend."""

from __future__ import annotations

import os
import threading

from shmreg._errors import AlreadyRegistered, RegistryDestroyed
from shmreg._types import ProcessIdentity, RegistryStats
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


@_check
def stats_and_statistics(b: Backend) -> None:
    b.register(NS, "a", _me(), {"x": 1})
    b.register(OTHER, "b", _me(), None)
    stats = b.stats()
    _expect(isinstance(stats, RegistryStats), f"stats() gave {stats!r}")
    _equal((stats.used, stats.namespaces), (2, 2), "stats() used, namespaces")
    _expect(
        stats.capacity >= stats.used and 0 < stats.load_factor <= 1 and stats.memory_bytes > 0,
        f"stats() capacity, load_factor, memory_bytes: {stats}",
    )
    info = b.statistics()
    _expect(
        isinstance(info, dict) and all(type(k) is str for k in info),
        f"statistics() must be a dict with str keys, got {info!r}",
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
