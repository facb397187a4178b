"""Conformance checks: registering, looking up, updating and unregistering one name at a time."""

from __future__ import annotations

import os
from typing import Any

from shmreg._errors import AlreadyRegistered, NotRegistered, StaleGeneration
from shmreg._types import Service
from shmreg.backends._protocol import Backend
from shmreg.testing._checks_common import (
    NS,
    OTHER,
    Check,
    _children,
    _equal,
    _expect,
    _found,
    _me,
    _owner,
    _raises,
    _reap,
    _reused,
    _services,
    _snapshot,
    _zombie,
    collector,
)

CHECKS: list[tuple[str, Check]] = []
_check = collector(CHECKS)


# ------------------------------------------------------------------------ registration


@_check
def register_returns_generation(b: Backend) -> None:
    gen = b.register(NS, "svc", _me(), {"a": 1})
    _expect(type(gen) is int and gen > 0, f"generation must be an int > 0, got {gen!r}")
    _equal(b.lookup_entry(NS, "svc"), (os.getpid(), gen, {"a": 1}), "lookup_entry")


@_check
def same_owner_reregisters(b: Backend) -> None:
    gen = b.register(NS, "svc", _me(), {"a": 1, "b": 2})
    _equal(b.register(NS, "svc", _me(), {"c": 3}), gen, "generation after re-register")
    _equal(b.lookup_with_metadata(NS, "svc"), (os.getpid(), {"c": 3}), "metadata replaced")
    b.register(NS, "svc", _me(), None)
    _equal(b.lookup_entry(NS, "svc"), (os.getpid(), gen, {}), "metadata None is {}")
    _equal(b.count(NS), 1, "count")


@_check
def live_owner_keeps_name(b: Backend) -> None:
    with _children() as (child,):
        gen = b.register(NS, "svc", _owner(child), {"by": "child"})
        before = _snapshot(b)
        exc = _raises(AlreadyRegistered, b.register, NS, "svc", _me(), {"by": "me"})
        _equal((exc.pid, exc.namespace, exc.service), (child.pid, NS, "svc"), "error fields")
        _equal(_snapshot(b), before, "state after AlreadyRegistered")
        _equal(b.lookup_entry(NS, "svc"), (child.pid, gen, {"by": "child"}), "holder")
        b.register(NS, "mine", _me(), None)
        exc = _raises(AlreadyRegistered, b.register, NS, "mine", _owner(child), None)
        _equal(exc.pid, os.getpid(), "AlreadyRegistered.pid")


@_check
def dead_owner_is_taken_over(b: Backend) -> None:
    with _children() as (child,):
        old = b.register(NS, "svc", _owner(child), {"by": "child"})
        _reap(child)
        new = b.register(NS, "svc", _me(), {"by": "me"})
        _expect(new > old, f"takeover generation {new} must exceed {old}")
        _equal(b.lookup_entry(NS, "svc"), (os.getpid(), new, {"by": "me"}), "new holder")


@_check
def reused_pid_is_dead(b: Backend) -> None:
    impostor = _reused(_me())  # our pid, another start time: the holder is long gone
    old = b.register(NS, "svc", impostor, {"by": "old"})
    new = b.register(NS, "svc", _me(), {"by": "me"})
    _expect(new > old, f"takeover generation {new} must exceed {old}")
    _equal(b.lookup_entry(NS, "svc"), (os.getpid(), new, {"by": "me"}), "new holder")
    b.register(NS, "gone", impostor, None)
    _equal(b.health_check().dead, 1, "health_check().dead")
    _equal(b.sweep(), 1, "sweep() of the reused-pid entry")
    _equal(b.lookup(NS, "gone"), None, "lookup after sweep")


@_check
def zombie_owner_is_dead(b: Backend) -> None:
    with _children() as (child,):
        owner = _owner(child)
        b.register(NS, "svc", owner, None)
        b.register(NS, "other", owner, None)
        _zombie(child, owner)
        gen = b.register(NS, "svc", _me(), None)
        _equal(b.lookup_entry(NS, "svc"), (os.getpid(), gen, {}), "taken over from zombie")
        _equal(b.sweep(), 1, "sweep() of the zombie's entry")


@_check
def generation_grows_with_each_owner(b: Backend) -> None:
    seen = [b.register(NS, "svc", _reused(_me()), None)]
    seen.append(b.register(NS, "svc", _me(), None))
    _equal(b.unregister(NS, "svc"), True, "unregister")
    seen.append(b.register(NS, "svc", _me(), None))
    for i in range(300):  # enough to make a growing table rebuild
        b.register(OTHER, i, _me(), None)
    _equal(b.unregister(NS, "svc"), True, "unregister")
    seen.append(b.register(NS, "svc", _me(), None))
    _equal(seen, sorted(set(seen)), "generations of one name (strictly increasing)")


@_check
def caller_dict_is_copied_in(b: Backend) -> None:
    meta: dict[str, Any] = {"l": [1], "d": {"x": 1}}
    gen = b.register(NS, "svc", _me(), meta)
    meta["l"].append(2)
    meta["d"]["y"] = 2
    meta["new"] = True
    _equal(
        b.lookup_with_metadata(NS, "svc"),
        (os.getpid(), {"l": [1], "d": {"x": 1}}),
        "stored metadata after the caller mutated its dict",
    )
    update: dict[str, Any] = {"u": [1]}
    b.update_metadata(NS, "svc", update)
    update["u"].append(2)
    _equal(
        b.lookup_entry(NS, "svc"),
        (os.getpid(), gen, {"u": [1]}),
        "stored metadata after the caller mutated its update",
    )


@_check
def returned_dicts_are_copies(b: Backend) -> None:
    b.register(NS, "svc", _me(), {"type": "w", "l": [1], "d": {"x": 1}})
    expected = {"type": "w", "l": [1], "d": {"x": 1}}
    found = b.lookup_with_metadata(NS, "svc")
    entry = b.lookup_entry(NS, "svc")
    _expect(found is not None and entry is not None, "registered entry not found")
    assert found is not None and entry is not None  # for mypy; checked just above
    results = [
        found[1],
        entry[2],
        b.list_entries(NS)[0].metadata,
        b.find(NS, equals={"type": "w"})[0].metadata,
    ]
    for meta in results:
        meta["l"].append(2)
        meta["d"]["y"] = 2
        meta["extra"] = 1
    _equal(b.lookup_with_metadata(NS, "svc"), (os.getpid(), expected), "after mutating reads")
    _expect(len({id(m) for m in results}) == len(results), "two reads returned one dict")


# ----------------------------------------------------------------------------- lookups


@_check
def lookup_hit_and_miss(b: Backend) -> None:
    gen = b.register(NS, ("agent", 1), _me(), {"a": 1})
    pid = os.getpid()
    _equal(b.lookup(NS, ("agent", 1)), pid, "lookup hit")
    _equal(b.lookup_with_metadata(NS, ("agent", 1)), (pid, {"a": 1}), "lookup_with_metadata")
    _equal(b.lookup_entry(NS, ("agent", 1)), (pid, gen, {"a": 1}), "lookup_entry")
    for ns, service in (
        (NS, ("agent", 2)),
        (OTHER, ("agent", 1)),
        (NS, "agent"),
        (NS, ("agent", "1")),
        ("never", ("agent", 1)),
    ):
        _equal(b.lookup(ns, service), None, f"lookup({ns!r}, {service!r})")
        _equal(b.lookup_with_metadata(ns, service), None, f"lookup_with_metadata({service!r})")
        _equal(b.lookup_entry(ns, service), None, f"lookup_entry({service!r})")
    # 1, "1" and (1,) are three different names.
    distinct: list[Service] = [1, "1", (1,), ("1",)]
    for i, name in enumerate(distinct):
        b.register(NS, name, _me(), {"i": i})
    for i, name in enumerate(distinct):
        _equal(b.lookup_with_metadata(NS, name), (pid, {"i": i}), f"{name!r}")


@_check
def dead_owner_invisible_to_reads(b: Backend) -> None:
    with _children() as (child,):
        owner = _owner(child)
        b.register(NS, "dead", owner, {"type": "w"})
        b.register(OTHER, "dead", owner, {"type": "w"})
        b.register(NS, "live", _me(), {"type": "w"})
        _equal(b.count(), 3, "count() before the owner dies")
        _reap(child)
        for call in (b.lookup, b.lookup_with_metadata, b.lookup_entry):
            _equal(call(NS, "dead"), None, f"{call.__name__} of a dead owner's entry")
        _equal(_services(b, NS), {"'live'"}, "list_services")
        _equal(_found(b.list_entries(NS)), {"'live'"}, "list_entries")
        _equal(_found(b.find(NS, equals={"type": "w"})), {"'live'"}, "find(equals)")
        _equal(_found(b.find(NS, predicate=lambda m: True)), {"'live'"}, "find(predicate)")
        _equal(b.list_entries(OTHER), [], "list_entries of a namespace of dead owners")
        _equal((b.count(NS), b.count(OTHER), b.count()), (1, 0, 1), "counts")
        _raises(NotRegistered, b.update_metadata, NS, "dead", {"x": 1})
        _equal(b.unregister(NS, "dead"), False, "unregister of a dead owner's entry")
        _equal(b.sweep(), 1, "sweep() after unregistering one of the two dead entries")


# ---------------------------------------------------------------------- update, unregister


@_check
def update_metadata_replaces(b: Backend) -> None:
    gen = b.register(NS, "svc", _me(), {"a": 1, "b": 2})
    b.update_metadata(NS, "svc", {"c": 3})
    _equal(b.lookup_entry(NS, "svc"), (os.getpid(), gen, {"c": 3}), "after replace")
    b.update_metadata(NS, "svc", {})
    _equal(b.lookup_entry(NS, "svc"), (os.getpid(), gen, {}), "after replace with {}")


@_check
def update_metadata_merges_shallow(b: Backend) -> None:
    gen = b.register(NS, "svc", _me(), {"a": {"x": 1}, "b": 1, "c": [1]})
    b.update_metadata(NS, "svc", {"a": {"y": 2}, "d": 4}, merge=True)
    _equal(
        b.lookup_entry(NS, "svc"),
        (os.getpid(), gen, {"a": {"y": 2}, "b": 1, "c": [1], "d": 4}),
        "after merge",
    )


@_check
def update_metadata_needs_registration(b: Backend) -> None:
    b.register(OTHER, "svc", _me(), None)
    before = _snapshot(b)
    exc = _raises(NotRegistered, b.update_metadata, NS, "svc", {"a": 1})
    _equal((exc.namespace, exc.service), (NS, "svc"), "NotRegistered fields")
    _raises(NotRegistered, b.update_metadata, NS, "svc", {"a": 1}, merge=True)
    b.register(NS, "svc", _me(), None)
    b.unregister(NS, "svc")
    _raises(NotRegistered, b.update_metadata, NS, "svc", {"a": 1})
    _equal(_snapshot(b), before, "state after NotRegistered")


@_check
def generation_fences_writes(b: Backend) -> None:
    gen = b.register(NS, "svc", _me(), {"v": 1})
    before = _snapshot(b)
    exc = _raises(StaleGeneration, b.update_metadata, NS, "svc", {"v": 2}, generation=gen + 1)
    _equal(
        (exc.expected, exc.actual, exc.namespace, exc.service),
        (gen + 1, gen, NS, "svc"),
        "StaleGeneration fields",
    )
    _raises(StaleGeneration, b.update_metadata, NS, "svc", {"v": 2}, merge=True, generation=gen + 1)
    _raises(StaleGeneration, b.unregister, NS, "svc", generation=gen + 1)
    _equal(_snapshot(b), before, "state after StaleGeneration")
    b.update_metadata(NS, "svc", {"v": 3}, generation=gen)
    b.update_metadata(NS, "svc", {"w": 4}, merge=True, generation=gen)
    _equal(b.lookup_entry(NS, "svc"), (os.getpid(), gen, {"v": 3, "w": 4}), "fenced updates")
    _equal(b.unregister(NS, "svc", generation=gen), True, "fenced unregister")
    _equal(b.lookup(NS, "svc"), None, "lookup after unregister")


@_check
def unregister_is_idempotent(b: Backend) -> None:
    b.register(NS, "svc", _me(), None)
    b.register(OTHER, "svc", _me(), None)
    _equal(b.unregister(NS, "svc"), True, "first unregister")
    _equal(b.unregister(NS, "svc"), False, "second unregister")
    _equal(b.unregister(NS, "never"), False, "unregister of a name never registered")
    _equal(b.unregister("never", "svc"), False, "unregister in an unknown namespace")
    _equal((b.lookup(NS, "svc"), b.lookup(OTHER, "svc")), (None, os.getpid()), "lookups")
    _equal((b.count(NS), b.count()), (0, 1), "counts")
