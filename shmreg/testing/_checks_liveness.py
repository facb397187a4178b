"""Conformance checks: dead owners found, judged and removed, with the events that say so."""

from __future__ import annotations

import os
from collections.abc import Callable

from shmreg import _identity
from shmreg._errors import AlreadyRegistered, InvalidKey
from shmreg._types import HealthReport, HealthStatus, Liveness, ProcessIdentity, Service
from shmreg.backends._protocol import Backend
from shmreg.testing._checks_common import (
    NS,
    OTHER,
    Check,
    _children,
    _equal,
    _expect,
    _in_threads,
    _me,
    _owner,
    _raises,
    _read_all,
    _reap,
    _reused,
    _row,
    _services,
    _want,
    _zombie,
    collector,
)

CHECKS: list[tuple[str, Check]] = []
_check = collector(CHECKS)


# ---------------------------------------------------------------------------- liveness


@_check
def sweep_removes_only_dead(b: Backend) -> None:
    before = b.stats()
    with _children() as (child,):
        owner = _owner(child)
        for ns, service in ((NS, "d1"), (NS, "d2"), (OTHER, "d3")):
            b.register(ns, service, owner, {"x": 1})
        b.register(NS, "live", _me(), None)
        b.register(OTHER, "live", _me(), None)
        b.register(NS, "reused", _reused(_me()), None)
        _reap(child)
        _equal(b.sweep(), 4, "first sweep")
        _equal(b.sweep(), 0, "second sweep")
        _equal(b.health_check().total, 2, "health_check().total after sweep")
        _equal((_services(b, NS), _services(b, OTHER)), ({"'live'"}, {"'live'"}), "survivors")
    after = b.stats()
    _equal(after.sweeps - before.sweeps, 2, "stats().sweeps")
    _equal(after.dead_found - before.dead_found, 4, "stats().dead_found")
    _expect(after.last_sweep_time is not None, "stats().last_sweep_time is None after sweeps")


@_check
def health_check_classifies(b: Backend) -> None:
    report = b.health_check()
    _equal((report.status, report.total), (HealthStatus.HEALTHY, 0), "empty registry")
    with _children() as (child,):
        dead_owner = _owner(child)
        _reap(child)
        for total, dead, status in (
            (20, 1, HealthStatus.HEALTHY),
            (10, 1, HealthStatus.DEGRADED),
            (10, 2, HealthStatus.DEGRADED),
            (10, 3, HealthStatus.UNHEALTHY),
            (4, 4, HealthStatus.UNHEALTHY),
        ):
            for i in range(total):
                b.register(NS, i, dead_owner if i < dead else _me(), None)
            report = b.health_check()
            _expect(isinstance(report, HealthReport), f"health_check() gave {report!r}")
            _equal(
                (report.status, report.total, report.alive, report.dead, report.unknown),
                (status, total, total - dead, dead, 0),
                f"{dead} dead of {total}",
            )
            _expect(isinstance(report.backend, str) and report.backend != "", "report.backend")
            _equal(b.count(NS), total - dead, "health_check() must not remove entries")
            for i in range(total):
                b.unregister(NS, i)


@_check
def died_events_carry_reason(b: Backend) -> None:
    me = _me()
    with _children(2) as (gone_proc, zombie_proc):
        gone, zombie, reused = _owner(gone_proc), _owner(zombie_proc), _reused(me)
        cases: list[tuple[ProcessIdentity, str, Service, int, str]] = [
            (gone, NS, "gone", b.register(NS, "gone", gone, None), "gone"),
            (zombie, NS, ("z", 1), b.register(NS, ("z", 1), zombie, None), "zombie"),
            (reused, OTHER, 7, b.register(OTHER, 7, reused, None), "reused"),
        ]
        g_live = b.register(NS, "live", me, None)
        _reap(gone_proc)
        _zombie(zombie_proc, zombie)  # killed, not reaped: _children reaps it on the way out
        for ident, verdict in (
            (gone, Liveness.GONE),
            (zombie, Liveness.ZOMBIE),
            (reused, Liveness.REUSED),
        ):
            _equal(_identity.check(ident), verdict, f"_identity.check({ident}) (precondition)")
        base = b.last_event_seq()
        for i, (ident, ns, service, gen, reason) in enumerate(cases):
            _equal(
                b.remove_dead({ident: _identity.check(ident)}),
                1,
                f"remove_dead of the {reason} owner",
            )
            events, lost = b.read_events(base + i)
            _equal(
                ([_row(e) for e in events], lost),
                ([_want(base + i + 1, "died", ns, service, ident, gen, reason)], 0),
                f"event of removing the {reason} owner's entry",
            )
            _equal(b.lookup(ns, service), None, f"lookup after removing the {reason} entry")
        _equal(b.lookup_entry(NS, "live"), (os.getpid(), g_live, {}), "the live entry")
        _equal(b.owners(), {me}, "owners() after the removals")


@_check
def sweep_emits_died_events(b: Backend) -> None:
    me, ghost = _me(), _reused(_me())
    with _children() as (child,):
        kid = _owner(child)
        removed = [
            (NS, "a", kid, b.register(NS, "a", kid, None), "gone"),
            (OTHER, ("b", 1), kid, b.register(OTHER, ("b", 1), kid, None), "gone"),
            (NS, "ghost", ghost, b.register(NS, "ghost", ghost, None), "reused"),
        ]
        b.register(NS, "live", me, None)
        _reap(child)
        base = b.last_event_seq()
        _equal(b.sweep(), 3, "sweep()")
        events, lost = _read_all(b, base)
        _equal(lost, 0, "events lost")
        _equal(
            sorted(_row(e)[1:] for e in events),
            sorted(
                _want(0, "died", ns, service, owner, gen, reason)[1:]
                for ns, service, owner, gen, reason in removed
            ),
            "died events of a sweep (in any order)",
        )
        _equal(b.sweep(), 0, "second sweep()")
        _equal(b.last_event_seq(), base + 3, "events after a sweep that found nothing")


@_check
def remove_dead_needs_proof(b: Backend) -> None:
    me, ghost = _me(), _reused(_me())
    g_live = b.register(NS, "live", me, None)
    b.register(NS, "ghost", ghost, None)
    base, counted = b.last_event_seq(), b.stats()
    for verdicts in (
        {},
        {me: Liveness.SAME},
        {me: Liveness.UNKNOWN},
        {ghost: Liveness.SAME},
        {ghost: Liveness.UNKNOWN},
    ):
        _equal(b.remove_dead(verdicts), 0, f"remove_dead({verdicts})")
    _equal(b.last_event_seq(), base, "events after verdicts that prove nothing")
    _equal((b.stats().sweeps, b.stats().dead_found), (counted.sweeps, counted.dead_found),
           "stats() after removals of nothing")
    # A dead verdict names one identity, not a pid: our own entry, same pid, stays.
    _equal(b.remove_dead({ghost: Liveness.REUSED}), 1, "remove_dead of the reused identity")
    after = b.stats()  # the monitor removes through remove_dead: counted like a sweep
    _equal((after.sweeps - counted.sweeps, after.dead_found - counted.dead_found), (1, 1),
           "stats() (sweeps, dead_found) after remove_dead removed one entry")
    _equal(b.lookup_entry(NS, "live"), (os.getpid(), g_live, {}), "entry of the same pid")
    with _children() as (child,):
        kid = _owner(child)
        b.register(NS, "svc", kid, None)
        _reap(child)
        verdict = _identity.check(kid)
        gen = b.register(NS, "svc", me, None)  # taken over between the verdict and the removal
        seen = b.last_event_seq()
        _equal(b.remove_dead({kid: verdict}), 0, "remove_dead after the name changed hands")
        _equal(b.lookup_entry(NS, "svc"), (os.getpid(), gen, {}), "the new holder's entry")
        _equal(b.read_events(seen), ([], 0), "events of a remove_dead that removed nothing")


@_check
def remove_dead_concurrent_once(b: Backend) -> None:
    me = _me()
    b.register(NS, "live", me, None)
    with _children(3) as procs:
        kids = [_owner(p) for p in procs]
        for p in procs:
            _reap(p)
        rounds: list[tuple[str, Callable[[dict[ProcessIdentity, Liveness]], list[object]]]] = [
            ("two remove_dead", lambda v: _in_threads([lambda: b.remove_dead(v)] * 2)),
            ("remove_dead and sweep", lambda v: _in_threads([lambda: b.remove_dead(v), b.sweep])),
            ("two sweeps", lambda _: _in_threads([b.sweep, b.sweep])),
        ]
        for r, (what, race) in enumerate(rounds):
            dead = [kids[r], ProcessIdentity(me.pid, me.start_ticks + 1 + r)]
            services = [(r, i) for i in range(60)]
            for i, service in enumerate(services):
                b.register(NS, service, dead[i % 2], None)
            verdicts = _identity.check_many(dead)
            base = b.last_event_seq()
            results = race(verdicts)
            _expect(all(type(n) is int for n in results), f"{what}: results {results}")
            _equal(
                sum(n for n in results if type(n) is int),
                len(services),
                f"{what}: entries removed in total ({results})",
            )
            events, lost = _read_all(b, base)
            _equal(
                (lost, sorted(repr(e.service) for e in events)),
                (0, sorted(repr(s) for s in services)),
                f"{what}: one died event per entry",
            )
            _expect(all(e.kind == "died" for e in events), f"{what}: kinds of the events")
            _equal(b.owners(), {me}, f"{what}: owners() afterwards")


@_check
def owners_match_registrations(b: Backend) -> None:
    me = _me()
    _equal((b.owner_counts(), b.owners()), ({}, set()), "owners of an empty registry")
    with _children(3) as procs:
        kids = [_owner(p) for p in procs]
        counts = {me: 2, kids[0]: 3, kids[1]: 2, kids[2]: 4}
        held: dict[ProcessIdentity, list[tuple[str, tuple[str, int]]]] = {}
        n = 0
        for owner, count in counts.items():
            for _ in range(count):
                held.setdefault(owner, []).append((NS if n % 2 else OTHER, ("e", n)))
                b.register(NS if n % 2 else OTHER, ("e", n), owner, {"n": n})
                n += 1
        _equal(b.owner_counts(), counts, "owner_counts()")
        _equal(b.owners(), set(counts), "owners()")
        ns, service = held[kids[2]][0]
        b.unregister(ns, service)
        counts[kids[2]] -= 1
        _equal(b.owner_counts(), counts, "owner_counts() after an unregister")
        ns, service = held[kids[0]][0]
        _raises(AlreadyRegistered, b.register, ns, service, me, None)
        _reap(procs[1])
        # Dead but not removed yet: still listed, which is how monitors and sweeps find it.
        _equal(b.owner_counts(), counts, "owner_counts() with a dead owner not yet removed")
        ns, service = held[kids[1]][0]
        b.register(ns, service, me, None)  # taken over from the dead owner
        counts[me] += 1
        counts[kids[1]] -= 1
        _equal(b.owner_counts(), counts, "owner_counts() after a takeover")
        _equal(b.sweep(), 1, "sweep()")
        del counts[kids[1]]
        _equal((b.owner_counts(), b.owners()), (counts, set(counts)), "after the sweep")


@_check
def namespace_owners_lists_live_entries(b: Backend) -> None:
    me = _me()
    _equal(b.namespace_owners(NS), [], "namespace_owners() of an empty namespace")
    with _children() as (child,):
        kid = _owner(child)
        g_a = b.register(NS, "a", me, {"x": 1})
        g_t = b.register(NS, ("t", 2), kid, None)
        g_o = b.register(OTHER, "a", kid, None)
        b.register(NS, "gone", me, None)
        b.unregister(NS, "gone")

        def owned(ns: str) -> list[tuple[str, ProcessIdentity, int]]:
            rows = b.namespace_owners(ns)
            _expect(
                all(
                    isinstance(ident, ProcessIdentity) and type(gen) is int
                    for _, ident, gen in rows
                ),
                f"namespace_owners({ns!r}) rows: {rows}",
            )
            return sorted((repr(service), ident, gen) for service, ident, gen in rows)

        _equal(owned(NS), sorted([("'a'", me, g_a), ("('t', 2)", kid, g_t)]), "namespace")
        _equal(owned(OTHER), [("'a'", kid, g_o)], "other namespace")
        _equal(owned("conformance:empty"), [], "an unused namespace")
        _raises(InvalidKey, b.namespace_owners, "")
        b.register(NS, "a", me, {"x": 2})  # the holder again: same generation
        _reap(child)
        # A dead owner's entries are not listed, removed or not (the per-read probe).
        _equal(owned(NS), [("'a'", me, g_a)], "namespace after the child died")
        _equal(owned(OTHER), [], "other namespace after the child died")
        g_new = b.register(NS, ("t", 2), me, None)
        _equal(
            owned(NS),
            sorted([("'a'", me, g_a), ("('t', 2)", me, g_new)]),
            "namespace after a takeover",
        )
