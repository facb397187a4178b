"""Conformance checks: the event ring that ``watch``, ``wait_for`` and the monitor follow.

Every committed change appends one event, numbered without gaps, in the order of the changes;
a refused call appends none. A reader resumes exactly where it stopped, and one that fell
more than the ring behind is told how many events it lost, to the event.

The checks assume a ring of at least 100 events (the shared ring keeps 4096); a backend with
a ring of another size says so in a ``ring_events`` attribute.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from shmreg._engine.events import Event
from shmreg._errors import (
    AlreadyRegistered,
    InvalidKey,
    InvalidMetadata,
    MetadataTooLarge,
    NotRegistered,
    StaleGeneration,
)
from shmreg._types import ProcessIdentity, Service
from shmreg.backends._protocol import Backend
from shmreg.testing._checks_common import (
    NS,
    OTHER,
    Check,
    _children,
    _equal,
    _expect,
    _limit,
    _me,
    _owner,
    _raises,
    _read_all,
    _reused,
    _ring_size,
    _row,
    _snapshot,
    _want,
    collector,
)

CHECKS: list[tuple[str, Check]] = []
_check = collector(CHECKS)


def _observed(b: Backend) -> tuple[int, object]:
    """The newest event number and everything a caller can read: what a refused call keeps."""
    return b.last_event_seq(), _snapshot(b)


@_check
def events_follow_writes(b: Backend) -> None:
    me, ghost = _me(), _reused(_me())
    base = b.last_event_seq()
    _expect(type(base) is int and base >= 0, f"last_event_seq() gave {base!r}")
    _equal(b.read_events(base), ([], 0), "read_events() at the newest event")
    started = time.time()
    with _children() as (child,):
        kid = _owner(child)
        g_svc = b.register(NS, "svc", me, {"v": 1})
        b.register(NS, "svc", me, {"v": 2})  # the holder again: updated, same generation
        b.update_metadata(NS, "svc", {"v": 3})
        b.update_metadata(NS, "svc", {"w": 4}, merge=True)
        g_kid = b.register(OTHER, ("agent", 1), kid, None)
        g_ghost = b.register(NS, 7, ghost, None)
        g_7 = b.register(NS, 7, me, None)  # over a dead holder: a takeover
        b.unregister(NS, "svc")
        b.unregister(OTHER, ("agent", 1))
        # Calls that change nothing append nothing.
        b.unregister(NS, "svc")
        b.unregister(NS, "never")
        _raises(AlreadyRegistered, b.register, NS, 7, kid, None)
    ended = time.time()
    expected: list[tuple[str, str, Service, ProcessIdentity, int, str | None]] = [
        ("registered", NS, "svc", me, g_svc, None),
        ("updated", NS, "svc", me, g_svc, None),
        ("updated", NS, "svc", me, g_svc, None),
        ("updated", NS, "svc", me, g_svc, None),
        ("registered", OTHER, ("agent", 1), kid, g_kid, None),
        ("registered", NS, 7, ghost, g_ghost, None),
        ("registered", NS, 7, me, g_7, "takeover"),
        ("unregistered", NS, "svc", me, g_svc, None),
        ("unregistered", OTHER, ("agent", 1), kid, g_kid, None),
    ]
    _equal(b.last_event_seq(), base + len(expected), "last_event_seq() after the writes")
    events, lost = _read_all(b, base)
    _equal(lost, 0, "events lost")
    _equal(
        [_row(e) for e in events],
        [
            _want(base + i + 1, kind, ns, service, owner, gen, reason)
            for i, (kind, ns, service, owner, gen, reason) in enumerate(expected)
        ],
        "events (seq, kind, namespace, service, pid, generation, reason, start ticks)",
    )
    for event in events:
        _expect(isinstance(event, Event) and event.lost == 0, f"not a plain Event: {event!r}")
        _expect(
            started - 1 <= event.time <= ended + 1,
            f"event time {event.time} outside the writes ({started}..{ended})",
        )


@_check
def read_events_resumes_exactly(b: Backend) -> None:
    base = b.last_event_seq()
    for i in range(40):
        b.register(NS, i, _me(), {"i": i})
    whole, lost = _read_all(b, base)
    _equal(
        (lost, [repr(e.service) for e in whole]),
        (0, [repr(i) for i in range(40)]),
        "one read of everything",
    )
    pieces: list[Event] = []
    after = base
    while True:
        events, lost = b.read_events(after, limit=7)
        _equal(lost, 0, f"read_events({after}, limit=7) lost")
        _expect(len(events) <= 7, f"read_events(limit=7) returned {len(events)} events")
        if not events:
            break
        _equal(events[0].seq, after + 1, f"first event after {after}")
        pieces += events
        after = events[-1].seq
    _equal(pieces, whole, "events read 7 at a time")
    _equal(b.read_events(base + 25), (whole[25:], 0), "read_events from the middle")
    _equal(b.read_events(base + 39, limit=1), (whole[39:], 0), "read_events of the newest")
    _equal(b.read_events(base + 40), ([], 0), "read_events when caught up")
    b.unregister(NS, 3)
    events, lost = b.read_events(base + 40)
    _equal(
        ([(e.seq, e.kind, repr(e.service)) for e in events], lost),
        ([(base + 41, "unregistered", "3")], 0),
        "a write after catching up",
    )
    _equal(b.read_events(base, limit=2), (whole[:2], 0), "old events stay readable")


@_check
def events_survive_growth(b: Backend) -> None:
    # Enough names to make a table that grows move to a bigger one; the numbering and the
    # events already written must carry over unbroken.
    # Read as it goes (every 50 writes), so a ring of 100 events is enough.
    position = b.last_event_seq()
    events: list[Event] = []

    def catch_up() -> None:
        nonlocal position
        new, lost = _read_all(b, position)
        _equal(lost, 0, f"events lost after {position}")
        events.extend(new)
        position = new[-1].seq if new else position

    gens = []
    for i in range(300):
        gens.append(b.register(OTHER, ("job", i), _me(), {"i": i}))
        if i % 50 == 49:
            catch_up()
    for i in range(0, 300, 3):
        b.unregister(OTHER, ("job", i))
    catch_up()
    _equal(
        [(e.kind, repr(e.service), e.generation) for e in events],
        [("registered", repr(("job", i)), gens[i]) for i in range(300)]
        + [("unregistered", repr(("job", i)), gens[i]) for i in range(0, 300, 3)],
        "kinds, services and generations of 300 registrations and 100 unregisters",
    )


@_check
def ring_overflow_counts_lost(b: Backend) -> None:
    ring = _ring_size(b)
    base = b.last_event_seq()
    b.register(NS, "svc", _me(), {"n": 0})
    for n in range(1, ring + 10):  # one name, so the table stays small: ring + 10 events
        b.update_metadata(NS, "svc", {"n": n})
    last = b.last_event_seq()
    _equal(last - base, ring + 10, f"events appended by {ring + 10} writes")
    # The ring keeps the newest `ring`: events base+11 .. last. Reading after base+k misses
    # 10 - k of the first ten, and not one more.
    for skip, missed in ((0, 10), (1, 9), (9, 1), (10, 0), (11, 0), (ring, 0)):
        events, lost = b.read_events(base + skip, limit=5)
        first = base + max(skip, 10) + 1
        _equal(
            (lost, [e.seq for e in events]),
            (missed, list(range(first, min(first + 5, last + 1)))),
            f"read_events({base} + {skip}, limit=5): (lost, numbers)",
        )
    events, lost = _read_all(b, base)
    _equal(
        (lost, len(events), events[0].seq if events else None),
        (10, ring, base + 11),
        "reading everything after the ring wrapped: lost, kept, first",
    )
    _expect(
        all(e.kind == "updated" and e.service == "svc" for e in events),
        "the kept events are the updates",
    )
    _equal(
        b.lookup_entry(NS, "svc"),
        (os.getpid(), events[-1].generation, {"n": ring + 9}),
        "the entry after the writes",
    )


@_check
def refused_writes_append_nothing(b: Backend) -> None:
    me = _me()
    gen = b.register(NS, "svc", me, {"v": 1})
    with _children() as (child,):
        b.register(OTHER, "held", _owner(child), None)
        before = _observed(b)
        stale = gen + 1
        _raises(StaleGeneration, b.update_metadata, NS, "svc", {"v": 2}, generation=stale)
        _raises(
            StaleGeneration, b.update_metadata, NS, "svc", {"v": 2}, merge=True, generation=stale
        )
        _raises(StaleGeneration, b.unregister, NS, "svc", generation=stale)
        _raises(NotRegistered, b.update_metadata, NS, "never", {"v": 2})
        _raises(AlreadyRegistered, b.register, OTHER, "held", me, None)
        _raises(InvalidMetadata, b.register, NS, "new", me, {"bad": object()})
        _raises(InvalidMetadata, b.update_metadata, NS, "svc", {1: "x"})
        _raises(MetadataTooLarge, b.update_metadata, NS, "svc", {"x": b"x" * (_limit(b) + 1)})
        _raises(InvalidKey, b.register, NS, 1.5, me, None)
        _equal(b.unregister(NS, "never"), False, "unregister of a name never registered")
        _equal(_observed(b), before, "newest event and state after refused calls")
        seen = before[0]
        _equal(b.read_events(seen), ([], 0), "events after refused calls")
        # The holder's generation passes the fence: one event each.
        b.update_metadata(NS, "svc", {"v": 3}, generation=gen)
        _equal(b.unregister(NS, "svc", generation=gen), True, "fenced unregister")
        events, lost = b.read_events(seen)
        _equal(
            ([(e.kind, e.generation) for e in events], lost),
            ([("updated", gen), ("unregistered", gen)], 0),
            "events of the fenced writes",
        )


@_check
def register_many_registers_all(b: Backend) -> None:
    me = _me()
    with _children(2) as procs:
        kids = [_owner(p) for p in procs]
        g_mine = b.register(NS, "mine", me, {"old": 1})
        base = b.last_event_seq()
        items: list[tuple[Service, ProcessIdentity, Mapping[str, Any] | None]] = [
            (i, kids[i % 2], {"i": i}) for i in range(10)
        ]
        items += [("mine", me, {"new": 1}), (("t", 1), me, None)]
        gens = b.register_many(NS, items)
        _expect(
            type(gens) is list
            and len(gens) == len(items)
            and all(type(g) is int and g > 0 for g in gens),
            f"register_many must return one int generation per item, got {gens!r}",
        )
        _equal(gens[10], g_mine, "generation of a name registered again by its holder")
        fresh = gens[:10] + gens[11:]
        _expect(
            len(set(fresh)) == len(fresh) and min(fresh) > g_mine,
            f"new names need new generations above {g_mine}: {fresh}",
        )
        for (service, owner, meta), gen in zip(items, gens, strict=True):
            _equal(
                b.lookup_entry(NS, service),
                (owner.pid, gen, dict(meta or {})),
                f"entry {service!r}",
            )
        events, lost = _read_all(b, base)
        _equal(
            (lost, [_row(e) for e in events]),
            (
                0,
                [
                    _want(base + i + 1, "updated" if s == "mine" else "registered", NS, s, o, g)
                    for i, ((s, o, _), g) in enumerate(zip(items, gens, strict=True))
                ],
            ),
            "one event per item, in order",
        )
        # Every item is validated before any is stored.
        before = _observed(b)
        _raises(
            InvalidMetadata, b.register_many, NS, [("x1", me, None), ("x2", me, {"bad": object()})]
        )
        _raises(InvalidKey, b.register_many, NS, [("x1", me, None), (1.5, me, None)])
        _equal(_observed(b), before, "newest event and state after a refused batch")
        # A name held by a live process stops the batch there: the items before it stay.
        exc = _raises(
            AlreadyRegistered,
            b.register_many,
            NS,
            [("y1", me, None), (0, me, None), ("y2", me, None)],
        )
        _equal(exc.pid, kids[0].pid, "AlreadyRegistered.pid")
        _equal(
            (b.lookup(NS, "y1"), b.lookup(NS, 0), b.lookup(NS, "y2")),
            (os.getpid(), kids[0].pid, None),
            "lookups after a batch stopped midway",
        )
