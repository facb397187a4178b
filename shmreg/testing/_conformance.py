"""The conformance suite every ``shmreg`` backend passes: ``check_backend(factory)``.

Each check is a function of one fresh, empty backend. It talks to the backend only through the
``Backend`` protocol (never the ``Registry`` facade), so a new backend can be held to the same
contract as the shipped ones before the facade ever sees it. Owners are real
``ProcessIdentity`` values: this process, and child interpreters that a check starts, kills
and reaps itself (in ``finally``), because liveness is half of what a registry promises and a
fabricated pid would test nothing.

Why one fresh backend per check: a failed check leaves whatever it left, and the next check
must not inherit it. ``check_backend`` destroys every backend it creates; a pytest module can
run the checks one by one from ``CHECKS``::

    @pytest.mark.parametrize("name, check", CHECKS, ids=[name for name, _ in CHECKS])
    def test_conformance(name, check):
        backend = make_backend()
        try:
            check(backend)
        finally:
            backend.destroy()

Checks raise ``AssertionError`` explicitly (not with ``assert``), so they still check under
``python -O``. A dead owner is a child that was killed *and reaped*; if the kernel hands its pid
to a new process within the check's few milliseconds, that check can fail spuriously.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from shmreg import _identity
from shmreg._errors import (
    AlreadyRegistered,
    InvalidKey,
    InvalidMetadata,
    MetadataTooLarge,
    NotRegistered,
    RegistryDestroyed,
    StaleGeneration,
)
from shmreg._types import (
    HealthReport,
    HealthStatus,
    Liveness,
    ProcessIdentity,
    RegistryStats,
    Service,
)
from shmreg.backends._protocol import Backend

__all__ = ["CHECKS", "Check", "ConformanceFailure", "check_backend"]

Check = Callable[[Backend], None]
#: ``(name, check)`` in the order ``check_backend`` runs them.
CHECKS: list[tuple[str, Check]] = []

NS = "conformance"
OTHER = "conformance:other"
_METADATA_LIMIT = 16 * 1024 * 1024  # the largest max_metadata_bytes any registry accepts


class ConformanceFailure(AssertionError):
    """Raised by ``check_backend``; ``failures`` maps each failed check's name to its message."""

    def __init__(self, failures: dict[str, str], total: int) -> None:
        self.failures = failures
        lines = [f"{len(failures)} of {total} conformance checks failed:"]
        lines += [f"- {name}: {message}" for name, message in failures.items()]
        super().__init__("\n".join(lines))


def check_backend(factory: Callable[[], Backend]) -> None:
    """Run every check on its own ``factory()`` backend; raise ``ConformanceFailure`` if any fail.

    ``factory`` returns a new, empty backend on each call; each is destroyed after its check.
    All checks run, so the error lists every failure at once.
    """
    failures: dict[str, str] = {}
    for name, check in CHECKS:
        backend = factory()
        try:
            check(backend)
        except Exception as exc:  # a wrong error type is a failure too, not a crash of the run
            failures[name] = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                backend.destroy()
            except Exception as exc:
                failures.setdefault(name, f"destroy() raised {type(exc).__name__}: {exc}")
    if failures:
        raise ConformanceFailure(failures, len(CHECKS))


def _check(fn: Check) -> Check:
    CHECKS.append((fn.__name__, fn))
    return fn


# ------------------------------------------------------------------------------ helpers


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _equal(actual: object, expected: object, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: expected {_short(expected)}, got {_short(actual)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _raises(kind: type[Exception], call: Callable[..., Any], *args: Any,
            **kwargs: Any) -> Any:
    """Call and return the raised ``kind`` error; anything else fails the check."""
    what = f"{getattr(call, '__name__', 'call')}{_short(args)[:100]}"
    try:
        result = call(*args, **kwargs)
    except kind as exc:
        # The traceback's frames reach back to the caller, which keeps the error: a cycle
        # that would pin the backend's frames (and any view into shared memory they hold)
        # until the garbage collector runs, long after the backend was destroyed.
        link: BaseException | None = exc
        while link is not None:
            link.__traceback__ = None
            link = link.__cause__ or link.__context__
        return exc
    except Exception as exc:
        raise AssertionError(
            f"{what}: expected {kind.__name__}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: expected {kind.__name__}, returned {_short(result)}")


def _canon(value: object) -> object:
    """A form equal only for values of the same types: True != 1, 1.0 != 1, (1,) != [1]."""
    if type(value) is dict:
        return ("dict", tuple(sorted((str(k), _canon(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canon(v) for v in value))
    return (type(value).__name__, repr(value))


def _me() -> ProcessIdentity:
    return _identity.self_identity()


def _reused(identity: ProcessIdentity) -> ProcessIdentity:
    """The identity a registry would hold if ``identity``'s pid now belonged to a newcomer."""
    return ProcessIdentity(identity.pid, identity.start_ticks + 1)


@contextmanager
def _children(count: int = 1) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Sleeping child interpreters; whatever happens, each is killed and reaped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-S", "-c", "import time; time.sleep(300)"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _owner(proc: subprocess.Popen[bytes]) -> ProcessIdentity:
    return _identity.identity_of(proc.pid)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _zombie(proc: subprocess.Popen[bytes], owner: ProcessIdentity) -> None:
    """Kill without reaping, and wait until the kernel shows the zombie."""
    proc.kill()
    deadline = time.monotonic() + 10
    while _identity.check(owner) is not Liveness.ZOMBIE:
        _expect(time.monotonic() < deadline, f"pid {proc.pid} never became a zombie")
        time.sleep(0.001)


def _snapshot(backend: Backend, namespaces: tuple[str, ...] = (NS, OTHER)) -> object:
    """Everything a caller can observe, in a comparable form."""
    seen: list[object] = [backend.count(), backend.stats().used]
    for ns in namespaces:
        rows = []
        for entry in backend.list_entries(ns):
            found = backend.lookup_entry(ns, entry.service)
            rows.append((repr(entry.service), entry.pid, found and found[1],
                         _canon(entry.metadata)))
        seen.append(sorted(rows, key=repr))
    return seen


def _services(backend: Backend, namespace: str) -> set[str]:
    return {repr(s) for s in backend.list_services(namespace)}


def _found(entries: list[Any]) -> set[str]:
    return {repr(e.service) for e in entries}


def _limit(backend: Backend) -> int:
    limit = getattr(backend, "max_metadata_bytes", None)
    return limit if type(limit) is int else _METADATA_LIMIT


def _nest(levels: int, wrap: Callable[[object], object], seed: object = 1) -> object:
    value = seed
    for _ in range(levels):
        value = wrap(value)
    return value


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
    _equal(b.lookup_with_metadata(NS, "svc"), (os.getpid(), {"l": [1], "d": {"x": 1}}),
           "stored metadata after the caller mutated its dict")
    update: dict[str, Any] = {"u": [1]}
    b.update_metadata(NS, "svc", update)
    update["u"].append(2)
    _equal(b.lookup_entry(NS, "svc"), (os.getpid(), gen, {"u": [1]}),
           "stored metadata after the caller mutated its update")


@_check
def returned_dicts_are_copies(b: Backend) -> None:
    b.register(NS, "svc", _me(), {"type": "w", "l": [1], "d": {"x": 1}})
    expected = {"type": "w", "l": [1], "d": {"x": 1}}
    found = b.lookup_with_metadata(NS, "svc")
    entry = b.lookup_entry(NS, "svc")
    _expect(found is not None and entry is not None, "registered entry not found")
    assert found is not None and entry is not None  # for mypy; checked just above
    results = [found[1], entry[2], b.list_entries(NS)[0].metadata,
               b.find(NS, equals={"type": "w"})[0].metadata]
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
    for ns, service in ((NS, ("agent", 2)), (OTHER, ("agent", 1)), (NS, "agent"),
                        (NS, ("agent", "1")), ("never", ("agent", 1))):
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
    _equal(b.lookup_entry(NS, "svc"),
           (os.getpid(), gen, {"a": {"y": 2}, "b": 1, "c": [1], "d": 4}), "after merge")


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
    _equal((exc.expected, exc.actual, exc.namespace, exc.service), (gen + 1, gen, NS, "svc"),
           "StaleGeneration fields")
    _raises(StaleGeneration, b.update_metadata, NS, "svc", {"v": 2}, merge=True,
            generation=gen + 1)
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


# ----------------------------------------------------------------------------- queries


@_check
def namespaces_are_isolated(b: Backend) -> None:
    with _children() as (child,):
        b.register(NS, "shared", _me(), {"ns": 1})
        b.register(OTHER, "shared", _owner(child), {"ns": 2})
        b.register(NS, "only-here", _me(), None)
        _equal(_services(b, NS), {"'shared'", "'only-here'"}, "list_services(NS)")
        _equal(b.list_entries(OTHER), [("shared", child.pid, {"ns": 2})], "list_entries")
        _equal(b.list_services("empty"), [], "list_services of an unused namespace")
        _equal((b.count(NS), b.count(OTHER), b.count("empty"), b.count()), (2, 1, 0, 3),
               "counts")
        b.unregister(OTHER, "shared")
        _equal(b.lookup_with_metadata(NS, "shared"), (os.getpid(), {"ns": 1}), "other ns")


@_check
def services_round_trip(b: Backend) -> None:
    services: list[Service] = ["svc", "", "ünïcødé ✓ 日本", "a\x00b", 0, 7, -5, 2**64 - 1, -(2**63),
                ("agent", "planner-1"), ("a", 1, ("b", (2, -3))), (1,), ("1",), "1", 1]
    for i, service in enumerate(services):
        b.register(NS, service, _me(), {"i": i})
    _equal(_services(b, NS), {repr(s) for s in services}, "list_services (type-exact)")
    _equal({repr(e.service): e.metadata["i"] for e in b.list_entries(NS)},
           {repr(s): i for i, s in enumerate(services)}, "list_entries")
    for service in services:
        _equal(b.lookup(NS, service), os.getpid(), f"lookup({service!r})")


@_check
def metadata_round_trips(b: Backend) -> None:
    meta = {"none": None, "t": True, "f": False, "zero": 0, "neg": -1, "big": 2**64 - 1,
            "small": -(2**63), "float": 1.5, "negzero": -0.0, "inf": math.inf,
            "ninf": -math.inf, "s": "ü ✓", "empty": "", "b": b"\x00\xff", "eb": b"",
            "l": [1, "a", None, [2, [b"x"]], {"k": 1.0}], "el": [], "ed": {},
            "d": {"x": {"y": [True, 1, 1.0]}}, "": "empty key", "ключ": 1}
    b.register(NS, "svc", _me(), meta)
    b.register(NS, "proxy", _me(), types.MappingProxyType({"m": [1]}))  # any Mapping
    found = b.lookup_with_metadata(NS, "svc")
    _equal(_canon(found and found[1]), _canon(meta), "lookup_with_metadata (type-exact)")
    entry = b.lookup_entry(NS, "svc")
    _equal(_canon(entry and entry[2]), _canon(meta), "lookup_entry (type-exact)")
    listed = {repr(e.service): e.metadata for e in b.list_entries(NS)}
    _equal(_canon(listed.get("'svc'")), _canon(meta), "list_entries (type-exact)")
    _equal(listed.get("'proxy'"), {"m": [1]}, "metadata given as a MappingProxyType")
    b.update_metadata(NS, "proxy", meta)
    _equal(_canon(b.find(NS, equals={"s": "ü ✓"})[1].metadata), _canon(meta), "find")


@_check
def find_by_equality(b: Backend) -> None:
    b.register(NS, "w1", _me(), {"type": "worker", "zone": "a", "n": 1})
    b.register(NS, "w2", _me(), {"type": "worker", "zone": "b", "n": 2})
    b.register(NS, "db", _me(), {"type": "db", "zone": "a"})
    b.register(NS, "bare", _me(), {})
    b.register(OTHER, "w9", _me(), {"type": "worker"})
    for equals, expected in (({"type": "worker"}, {"w1", "w2"}),
                             ({"type": "worker", "zone": "a"}, {"w1"}),
                             ({"zone": "a"}, {"w1", "db"}), ({"n": 2}, {"w2"}),
                             ({"type": "cache"}, set()), ({"missing": None}, set()),
                             ({"type": "worker", "zone": "c"}, set()),
                             ({}, {"w1", "w2", "db", "bare"})):
        _equal(_found(b.find(NS, equals=equals)), {repr(s) for s in expected}, f"{equals}")
    entries = b.find(NS, equals={"type": "db"})
    _equal(entries, [("db", os.getpid(), {"type": "db", "zone": "a"})], "entry shape")


@_check
def find_by_list_membership(b: Backend) -> None:
    b.register(NS, "ab", _me(), {"capabilities": ["a", "b"], "tags": [1, "x"]})
    b.register(NS, "bc", _me(), {"capabilities": ["b", "c"], "tags": []})
    b.register(NS, "scalar", _me(), {"capabilities": "a"})
    for equals, expected in (({"capabilities": "a"}, {"ab", "scalar"}),
                             ({"capabilities": "b"}, {"ab", "bc"}),
                             ({"capabilities": ["a", "b"]}, {"ab"}),
                             ({"capabilities": ["b"]}, {"ab", "bc"}),
                             ({"capabilities": ["a", "c"]}, set()),
                             ({"capabilities": []}, {"ab", "bc"}),
                             ({"capabilities": "z"}, set()),
                             ({"tags": 1}, {"ab"}), ({"tags": "x", "capabilities": "b"}, {"ab"})):
        _equal(_found(b.find(NS, equals=equals)), {repr(s) for s in expected}, f"{equals}")


@_check
def find_uses_python_equality(b: Backend) -> None:
    # The prefilters a backend may use (hashes of "type", capability bit masks) must not
    # change the answer: equality is Python's ==, as for any other field.
    b.register(NS, "float", _me(), {"type": 1.0, "capabilities": [2.0], "level": 1.0})
    b.register(NS, "none", _me(), {"type": None, "capabilities": None})
    for equals, expected in (({"level": 1}, {"float"}), ({"type": 1}, {"float"}),
                             ({"capabilities": 2}, {"float"}), ({"type": None}, {"none"}),
                             ({"capabilities": None}, {"none"})):
        _equal(_found(b.find(NS, equals=equals)), {repr(s) for s in expected}, f"{equals}")


@_check
def find_by_predicate(b: Backend) -> None:
    for i in range(6):
        b.register(NS, i, _me(), {"load": i, "type": "even" if i % 2 == 0 else "odd"})
    b.register(OTHER, 99, _me(), {"load": 99, "type": "odd"})
    _equal(_found(b.find(NS, predicate=lambda m: m["load"] > 2)), {"3", "4", "5"}, "predicate")
    _equal(_found(b.find(NS, equals={"type": "odd"}, predicate=lambda m: m["load"] > 2)),
           {"3", "5"}, "equals and predicate")

    def meddle(meta: dict[str, Any]) -> bool:
        meta["load"] = -1
        return True

    b.find(NS, predicate=meddle)
    _equal(b.lookup_with_metadata(NS, 0), (os.getpid(), {"load": 0, "type": "even"}),
           "metadata after a predicate mutated its argument")

    def broken(meta: dict[str, Any]) -> bool:
        raise ZeroDivisionError("from the predicate")

    _raises(ZeroDivisionError, b.find, NS, predicate=broken)


@_check
def count_counts_live_entries(b: Backend) -> None:
    _equal((b.count(), b.count(NS)), (0, 0), "empty counts")
    with _children() as (child,):
        for i in range(5):
            b.register(NS, i, _me(), None)
        for i in range(3):
            b.register(OTHER, i, _owner(child), None)
        _equal((b.count(), b.count(NS), b.count(OTHER)), (8, 5, 3), "counts")
        b.unregister(NS, 0)
        _reap(child)
        _equal((b.count(), b.count(NS), b.count(OTHER)), (4, 4, 0), "after unregister, death")


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
        for total, dead, status in ((20, 1, HealthStatus.HEALTHY),
                                    (10, 1, HealthStatus.DEGRADED),
                                    (10, 2, HealthStatus.DEGRADED),
                                    (10, 3, HealthStatus.UNHEALTHY),
                                    (4, 4, HealthStatus.UNHEALTHY)):
            for i in range(total):
                b.register(NS, i, dead_owner if i < dead else _me(), None)
            report = b.health_check()
            _expect(isinstance(report, HealthReport), f"health_check() gave {report!r}")
            _equal((report.status, report.total, report.alive, report.dead, report.unknown),
                   (status, total, total - dead, dead, 0), f"{dead} dead of {total}")
            _expect(isinstance(report.backend, str) and report.backend != "", "report.backend")
            _equal(b.count(NS), total - dead, "health_check() must not remove entries")
            for i in range(total):
                b.unregister(NS, i)


# ------------------------------------------------------------------------- bad input

_BAD_NAMESPACES: list[object] = [5, None, b"ns", "", "a\x00b", "x" * 256, "\ud800", 1.5]
_BAD_SERVICES: list[object] = [True, 1.5, ["a"], None, (), ("a", ["b"]), ("a", True), 2**64,
                               -(2**63) - 1, "x" * 2000, b"svc", "\ud800", {"a": 1},
                               _nest(9, lambda v: (v,), "a")]


def _key_calls(b: Backend, ns: Any, service: Any) -> list[tuple[Callable[..., Any], tuple[Any, ...],
                                                                  dict[str, Any]]]:
    calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
        (b.register, (ns, service, _me(), {"a": 1}), {}), (b.lookup, (ns, service), {}),
        (b.lookup_with_metadata, (ns, service), {}), (b.lookup_entry, (ns, service), {}),
        (b.update_metadata, (ns, service, {}), {}),
        (b.update_metadata, (ns, service, {}), {"merge": True}),
        (b.unregister, (ns, service), {})]
    if service == "svc":  # the namespace is the bad part: the namespace-wide calls too
        calls += [(b.list_services, (ns,), {}), (b.list_entries, (ns,), {}), (b.find, (ns,), {}),
                  (b.find, (ns,), {"equals": {"a": 1}})]
        if ns is not None:  # count(None) counts every namespace
            calls.append((b.count, (ns,), {}))
    return calls


def _rejects_keys(b: Backend, cases: list[tuple[object, object]]) -> None:
    b.register(NS, "svc", _me(), {"a": 1})
    b.register(OTHER, ("t", 1), _me(), None)
    before = _snapshot(b)
    for ns, service in cases:
        for call, args, kwargs in _key_calls(b, ns, service):
            exc = _raises(InvalidKey, call, *args, **kwargs)
            _expect(isinstance(exc.key, str), f"InvalidKey.key must be a str: {exc.key!r}")
        _equal(_snapshot(b), before, f"state after InvalidKey for {_short((ns, service))}")


@_check
def bad_namespace_rejected(b: Backend) -> None:
    _rejects_keys(b, [(ns, "svc") for ns in _BAD_NAMESPACES])


@_check
def unhashable_namespace_rejected(b: Backend) -> None:
    _rejects_keys(b, [(["ns"], "svc"), ({"ns": 1}, "svc"), ({"ns"}, 1)])


@_check
def bad_service_rejected(b: Backend) -> None:
    _rejects_keys(b, [(NS, service) for service in _BAD_SERVICES])


_BAD_METADATA: list[tuple[object, str]] = [
    ([("a", 1)], "metadata"), ("text", "metadata"), (5, "metadata"),
    ({1: "x"}, "metadata"), ({"a": {2: "x"}}, "metadata['a']"),
    ({"a": {"b": {None: 1}}}, "metadata['a']['b']"), ({"a": (1,)}, "metadata['a']"),
    ({"a": {1, 2}}, "metadata['a']"), ({"a": object()}, "metadata['a']"),
    ({"a": [1, (2,)]}, "metadata['a'][1]"), ({"a": float("nan")}, "metadata['a']"),
    ({"a": [0.5, math.nan]}, "metadata['a'][1]"), ({"a": 2**64}, "metadata['a']"),
    ({"a": -(2**63) - 1}, "metadata['a']"), ({"a": bytearray(b"x")}, "metadata['a']"),
    ({"a": 1j}, "metadata['a']"), ({"a": _nest(40, lambda v: [v])}, "metadata['a']"),
    ({"a": _nest(40, lambda v: {"k": v})}, "metadata['a']"),
]


@_check
def bad_metadata_rejected(b: Backend) -> None:
    b.register(NS, "svc", _me(), {"keep": [1]})
    before = _snapshot(b)
    for meta, path in _BAD_METADATA:
        for call, args, kwargs in ((b.register, (NS, "new", _me(), meta), {}),
                                   (b.register, (NS, "svc", _me(), meta), {}),
                                   (b.update_metadata, (NS, "svc", meta), {}),
                                   (b.update_metadata, (NS, "svc", meta), {"merge": True})):
            exc = _raises(InvalidMetadata, call, *args, **kwargs)
            _expect(isinstance(exc.path, str) and exc.path.startswith(path),
                    f"InvalidMetadata.path for {_short(meta)}: {exc.path!r}, wanted {path}...")
        _equal(_snapshot(b), before, f"state after InvalidMetadata for {_short(meta)}")


@_check
def oversized_metadata_rejected(b: Backend) -> None:
    limit = _limit(b)
    b.register(NS, "svc", _me(), {"keep": 1})
    before = _snapshot(b)
    huge = {"blob": b"x" * (limit + 1)}
    for call in (lambda: b.register(NS, "new", _me(), huge),
                 lambda: b.register(NS, "svc", _me(), huge),
                 lambda: b.update_metadata(NS, "svc", huge),
                 lambda: b.update_metadata(NS, "svc", huge, merge=True)):
        exc = _raises(MetadataTooLarge, call)
        _expect(exc.size > exc.limit == limit, f"MetadataTooLarge size/limit: {exc}")
    # Each half fits; merged they do not.
    half = {"h1": b"x" * (limit // 2 + 16)}
    b.update_metadata(NS, "svc", half)
    before = _snapshot(b)
    _raises(MetadataTooLarge, b.update_metadata, NS, "svc", {"h2": b"y" * (limit // 2 + 16)},
            merge=True)
    _equal(_snapshot(b), before, "state after a merge that grew too large")
    b.register(NS, "svc", _me(), {"fits": b"x" * (limit - 64)})
    _expect(b.lookup(NS, "svc") == os.getpid(), "metadata just under the limit")


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
            _expect(all(isinstance(r, AlreadyRegistered) and r.pid == pid
                        for i, r in enumerate(results) if i != winners[0]),
                    f"losers must get AlreadyRegistered(pid={pid}): {results!r}")
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
    _expect(stats.capacity >= stats.used and 0 < stats.load_factor <= 1 and stats.memory_bytes > 0,
            f"stats() capacity, load_factor, memory_bytes: {stats}")
    info = b.statistics()
    _expect(isinstance(info, dict) and all(type(k) is str for k in info),
            f"statistics() must be a dict with str keys, got {info!r}")


@_check
def destroy_ends_every_call(b: Backend) -> None:
    b.register(NS, "svc", _me(), None)
    b.destroy()
    for call, args in ((b.lookup, (NS, "svc")), (b.lookup_with_metadata, (NS, "svc")),
                       (b.register, (NS, "svc", _me(), None)), (b.unregister, (NS, "svc")),
                       (b.list_services, (NS,)), (b.count, ()), (b.sweep, ())):
        _raises(RegistryDestroyed, call, *args)
    b.destroy()  # idempotent: callers clean up in finally blocks
