"""Hostile callers: every public Registry call fed bad arguments.

Each bad call must raise a shmreg error (a ``shmreg.ShmregError`` with a numeric ``.code``),
never a TypeError or KeyError, never hang and never crash, and must leave the registry
exactly as it was: its entries (``backend.dump()``), its live count and its newest event
number, compared before and after. A call that raises anything else is a bug.

Also here: access control between users (as root, a child that drops to ``nobody``), and a
check of the source that no code path unpickles what it reads from shared memory.
"""

from __future__ import annotations

import ast
import contextlib
import decimal
import math
import os
import re
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import alarm_after, children, destroying, finish_ok, segments_of, wait_zombie
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmreg

NS = "hostile"
PACKAGE = Path(shmreg.__file__).resolve().parent
HANG_S = 10.0


# ---------------------------------------------------------------------------- harness


class Hung(BaseException):
    """Raised by the alarm when a call outlives HANG_S: a hang, reported as a failure."""


def no_hang(seconds: float = HANG_S) -> contextlib.AbstractContextManager[None]:
    return alarm_after(seconds, Hung, f"call still running after {seconds} s")


def snapshot(reg: shmreg.Registry) -> tuple[Any, ...]:
    """Everything a bad call must not change: entries, live count, newest event number."""
    entries = sorted(reg.backend.dump(), key=repr)
    return entries, reg.stats().used, reg.backend.last_event_seq()


def refused(call: Callable[[], Any]) -> shmreg.ShmregError:
    """Run ``call``; it must raise a ShmregError with a code. Returns the error."""
    try:
        with no_hang():
            result = call()
            if isinstance(result, Iterator):  # generators (watch) do their work when pulled
                list(result)
    except shmreg.ShmregError as exc:
        assert isinstance(exc.code, int) and 1000 <= exc.code < 6000, exc.code
        assert type(exc).__module__ == "shmreg" or type(exc).__module__.startswith("shmreg.")
        return exc
    except Hung as exc:
        pytest.fail(f"hung: {exc}")
    except BaseException as exc:
        pytest.fail(
            f"raised {type(exc).__module__}.{type(exc).__name__} (not a ShmregError): {exc!r}"
        )
    pytest.fail(f"no error: returned {result!r}")


def assert_refused_unchanged(reg: shmreg.Registry, call: Callable[[], Any]) -> shmreg.ShmregError:
    before = snapshot(reg)
    error = refused(call)
    assert snapshot(reg) == before, f"{type(error).__name__} left the registry changed"
    return error


# ------------------------------------------------------------------------------ values

DEEP: dict[str, Any] = {}
_cursor = DEEP
for _ in range(10_000):
    _cursor["k"] = {}
    _cursor = _cursor["k"]
DEEP_LIST: list[Any] = []
_items = DEEP_LIST
for _ in range(10_000):
    _items.append([])
    _items = _items[0]
SELF_REF: dict[str, Any] = {}
SELF_REF["me"] = SELF_REF
HUGE_TEXT = "x" * 5_000_000
HUGE_KEY_TEXT = "k" * 100_000
NESTED_SERVICE: Any = "leaf"
for _ in range(20):
    NESTED_SERVICE = (NESTED_SERVICE,)

BAD_NAMESPACES = [
    pytest.param(None, id="ns-None"),
    pytest.param(1, id="ns-int"),
    pytest.param(b"hostile", id="ns-bytes"),
    pytest.param(("a",), id="ns-tuple"),
    pytest.param("", id="ns-empty"),
    pytest.param("a\x00b", id="ns-NUL"),
    pytest.param("n" * 256, id="ns-256-bytes"),
    pytest.param(HUGE_KEY_TEXT, id="ns-huge"),
    pytest.param("\ud800", id="ns-surrogate"),
    pytest.param(math.nan, id="ns-NaN"),
]
BAD_SERVICES = [
    pytest.param(None, id="svc-None"),
    pytest.param(1.5, id="svc-float"),
    pytest.param(math.nan, id="svc-NaN"),
    pytest.param(True, id="svc-bool"),
    pytest.param(b"svc", id="svc-bytes"),
    pytest.param(["svc"], id="svc-list"),
    pytest.param({"svc": 1}, id="svc-dict"),
    pytest.param((), id="svc-empty-tuple"),
    pytest.param(("a", 1.5), id="svc-tuple-float"),
    pytest.param(NESTED_SERVICE, id="svc-nested-20"),
    pytest.param(("agent", ("planner", 1)), id="svc-nested-2"),
    pytest.param("", id="svc-empty"),
    pytest.param("a\x00b", id="svc-NUL"),
    pytest.param(("agent", ""), id="svc-tuple-empty-str"),
    pytest.param(("agent", "a\x00"), id="svc-tuple-NUL"),
    pytest.param(2**64, id="svc-int-65-bits"),
    pytest.param(-(2**63) - 1, id="svc-int-too-negative"),
    pytest.param(HUGE_KEY_TEXT, id="svc-huge"),
    pytest.param("\udfff", id="svc-surrogate"),
    pytest.param(object(), id="svc-object"),
]
BAD_METADATA = [
    pytest.param([1, 2], id="meta-list"),
    pytest.param("text", id="meta-str"),
    pytest.param(5, id="meta-int"),
    pytest.param({1: "a"}, id="meta-int-key"),
    pytest.param({("a",): 1}, id="meta-tuple-key"),
    pytest.param({"x": math.nan}, id="meta-NaN"),
    pytest.param({"x": [{"y": [math.nan]}]}, id="meta-nested-NaN"),
    pytest.param({"x": {1, 2}}, id="meta-set"),
    pytest.param({"x": (1, 2)}, id="meta-tuple"),
    pytest.param({"x": object()}, id="meta-object"),
    pytest.param({"x": 2**64}, id="meta-int-65-bits"),
    pytest.param({"x": decimal.Decimal("1.5")}, id="meta-decimal"),
    pytest.param({"x": 1j}, id="meta-complex"),
    pytest.param({"x": "\ud800"}, id="meta-surrogate"),
    pytest.param({"\ud800": 1}, id="meta-surrogate-key"),
    pytest.param({"x": HUGE_TEXT}, id="meta-huge"),
    pytest.param({"x": DEEP}, id="meta-deep-dict-10000"),
    pytest.param({"x": DEEP_LIST}, id="meta-deep-list-10000"),
    pytest.param(SELF_REF, id="meta-self-reference"),
]
BAD_PIDS = [
    pytest.param(-1, id="pid--1"),
    pytest.param(0, id="pid-0"),
    pytest.param(2**31, id="pid-2**31"),
    pytest.param(2**64, id="pid-2**64"),
    pytest.param(True, id="pid-True"),
    pytest.param(1.5, id="pid-1.5"),
    pytest.param("1", id="pid-str"),
    pytest.param(math.nan, id="pid-NaN"),
    pytest.param([1], id="pid-list"),
]
BAD_TIMEOUTS = [
    pytest.param(-1, id="t--1"),
    pytest.param(-0.001, id="t-negative"),
    pytest.param(math.nan, id="t-NaN"),
    pytest.param(math.inf, id="t-inf"),
    pytest.param(-math.inf, id="t--inf"),
    pytest.param("1", id="t-str"),
    pytest.param(True, id="t-bool"),
    pytest.param([1], id="t-list"),
    pytest.param(decimal.Decimal("1"), id="t-decimal"),
]


@pytest.fixture
def reg(registry: shmreg.Registry) -> Iterator[shmreg.Registry]:
    """The conftest registry with a few entries: ours, a sleeper's, typed, with capabilities."""
    with children() as kids:
        sleeper = kids.sleeper()
        registry.register(NS, "mine", metadata={"type": "worker", "capabilities": ["a"]})
        registry.register(NS, ("agent", 1), pid=sleeper.pid, metadata={"type": "agent", "n": 1})
        registry.register("other", 7, metadata={})
        yield registry


# ---------------------------------------------------------------- keys, on every call

KEYED_CALLS: dict[str, Callable[[shmreg.Registry, Any, Any], Any]] = {
    "register": lambda r, ns, s: r.register(ns, s),
    "register_many": lambda r, ns, s: r.register_many(ns, [(s, None, None)]),
    "lookup": lambda r, ns, s: r.lookup(ns, s),
    "lookup_with_metadata": lambda r, ns, s: r.lookup_with_metadata(ns, s),
    "get_metadata": lambda r, ns, s: r.get_metadata(ns, s),
    "get_metadata_field": lambda r, ns, s: r.get_metadata_field(ns, s, "type"),
    "update_metadata": lambda r, ns, s: r.update_metadata(ns, s, {"x": 1}),
    "update_metadata_merge": lambda r, ns, s: r.update_metadata(ns, s, {"x": 1}, merge=True),
    "unregister": lambda r, ns, s: r.unregister(ns, s),
    "registered": lambda r, ns, s: r.registered(ns, s),
    "wait_for": lambda r, ns, s: r.wait_for(ns, s, timeout=0),
    "register_self": lambda r, ns, s: r.register_self(ns, s).__enter__(),
}
NAMESPACE_CALLS: dict[str, Callable[[shmreg.Registry, Any], Any]] = {
    "list_services": lambda r, ns: r.list_services(ns),
    "list_services_with_metadata": lambda r, ns: r.list_services_with_metadata(ns),
    "find_services_by_metadata": lambda r, ns: r.find_services_by_metadata(ns, lambda m: True),
    "find_by_metadata": lambda r, ns: r.find_by_metadata(ns, type="worker"),
    "list_by_type": lambda r, ns: r.list_by_type(ns, "worker"),
    "count": lambda r, ns: r.count(ns),
    "cleanup_namespace": lambda r, ns: r.cleanup_namespace(ns, grace=0),
    "register_many": lambda r, ns: r.register_many(ns, [("svc", None, None)]),
}


@pytest.mark.parametrize("call", sorted(KEYED_CALLS))
@pytest.mark.parametrize("namespace", BAD_NAMESPACES)
def test_bad_namespace(reg: shmreg.Registry, call: str, namespace: Any) -> None:
    error = assert_refused_unchanged(reg, lambda: KEYED_CALLS[call](reg, namespace, "svc"))
    assert isinstance(error, shmreg.InvalidKey), repr(error)


@pytest.mark.parametrize("call", sorted(KEYED_CALLS))
@pytest.mark.parametrize("service", BAD_SERVICES)
def test_bad_service(reg: shmreg.Registry, call: str, service: Any) -> None:
    error = assert_refused_unchanged(reg, lambda: KEYED_CALLS[call](reg, NS, service))
    assert isinstance(error, shmreg.InvalidKey), repr(error)


@pytest.mark.parametrize("call", sorted(NAMESPACE_CALLS))
@pytest.mark.parametrize("namespace", BAD_NAMESPACES)
def test_bad_namespace_on_namespace_calls(reg: shmreg.Registry, call: str, namespace: Any) -> None:
    if call == "count" and namespace is None:
        assert reg.count(None) == 3  # None means every namespace
        return
    error = assert_refused_unchanged(reg, lambda: NAMESPACE_CALLS[call](reg, namespace))
    assert isinstance(error, shmreg.InvalidKey), repr(error)


@pytest.mark.parametrize(
    "namespace",
    [
        pytest.param(1, id="ns-int"),
        pytest.param(b"hostile", id="ns-bytes"),
        pytest.param(("a",), id="ns-tuple"),
        pytest.param("", id="ns-empty"),
        pytest.param("a\x00b", id="ns-NUL"),
    ],
)
def test_watch_bad_namespace(reg: shmreg.Registry, namespace: Any) -> None:
    error = assert_refused_unchanged(reg, lambda: reg.watch(namespace, since=0, timeout=0))
    assert isinstance(error, shmreg.InvalidKey), repr(error)


def test_names_with_slash_and_nul_are_keys_not_paths(reg: shmreg.Registry) -> None:
    """'/' is an ordinary character of a namespace or service: no two of these keys
    collide, each round-trips exactly. (NUL and '' are refused, in namespaces and services
    alike: see BAD_NAMESPACES and BAD_SERVICES.)"""
    keys = [
        ("a/b", "c"),
        ("a", "b/c"),
        ("a", "b\\x00c"),  # the four characters, not a NUL
        ("a", ("b", "c")),
        ("a", "b"),
        ("/", "/"),
        ("..", "../../etc/passwd"),
        ("a", " "),
    ]
    for i, (ns, service) in enumerate(keys):
        reg.register(ns, service, metadata={"i": i})
    for i, (ns, service) in enumerate(keys):
        assert reg.lookup_with_metadata(ns, service) == (os.getpid(), {"i": i})
    assert sorted(reg.list_services("a"), key=repr) == sorted(
        [s for n, s in keys if n == "a"], key=repr
    )
    for ns, service in keys:
        assert reg.unregister(ns, service) is True


# ---------------------------------------------------------------- metadata and pids


@pytest.mark.parametrize("metadata", BAD_METADATA)
@pytest.mark.parametrize(
    "call",
    ["register", "register_existing", "register_many", "update", "update_merge", "register_self"],
)
def test_bad_metadata(reg: shmreg.Registry, call: str, metadata: Any) -> None:
    calls: dict[str, Callable[[], Any]] = {
        "register": lambda: reg.register(NS, "new", metadata=metadata),
        "register_existing": lambda: reg.register(NS, "mine", metadata=metadata),
        "register_many": lambda: reg.register_many(
            NS, [("ok-first", None, {"fine": 1}), ("new", None, metadata)]
        ),
        "update": lambda: reg.update_metadata(NS, "mine", metadata),
        "update_merge": lambda: reg.update_metadata(NS, "mine", metadata, merge=True),
        "register_self": lambda: reg.register_self(NS, "new", metadata).__enter__(),
    }
    error = assert_refused_unchanged(reg, calls[call])
    assert isinstance(error, (shmreg.InvalidMetadata, shmreg.MetadataTooLarge)), repr(error)


def test_metadata_error_names_the_offending_path(reg: shmreg.Registry) -> None:
    error = assert_refused_unchanged(
        reg, lambda: reg.register(NS, "new", metadata={"a": {"b": [1, {"c": math.nan}]}})
    )
    assert "['a']['b'][1]['c']" in str(error), str(error)


def test_merge_that_would_grow_past_the_limit_is_refused(reg_name: str) -> None:
    with destroying(reg_name), shmreg.Registry.create(reg_name, max_metadata_bytes=64) as reg:
        reg.register(NS, "k", metadata={"a": "x" * 40})
        error = assert_refused_unchanged(
            reg, lambda: reg.update_metadata(NS, "k", {"b": "y" * 40}, merge=True)
        )
        assert isinstance(error, shmreg.MetadataTooLarge)
        assert reg.get_metadata(NS, "k") == {"a": "x" * 40}


@pytest.mark.parametrize("pid", BAD_PIDS)
@pytest.mark.parametrize("call", ["register", "register_existing", "register_many"])
def test_bad_pid(reg: shmreg.Registry, call: str, pid: Any) -> None:
    calls: dict[str, Callable[[], Any]] = {
        "register": lambda: reg.register(NS, "new", pid=pid),
        "register_existing": lambda: reg.register(NS, "mine", pid=pid),
        "register_many": lambda: reg.register_many(NS, [("a", None, None), ("b", pid, None)]),
    }
    error = assert_refused_unchanged(reg, calls[call])
    if type(pid) is int and pid >= 1:
        assert isinstance(error, shmreg.ProcessNotAlive), repr(error)  # no such process
    else:
        assert isinstance(error, shmreg.InvalidArgument), repr(error)  # not a pid at all
        assert error.argument == "pid"


def test_pids_of_the_dead_a_zombie_and_a_thread(reg: shmreg.Registry) -> None:
    with children() as kids:
        dead = kids.add(subprocess.Popen(["true"]))
        dead.wait()
        zombie = subprocess.Popen(["true"])
        kids.add(zombie)
        wait_zombie(zombie.pid)
        tids: list[int] = []
        release = threading.Event()
        thread = threading.Thread(
            target=lambda: (tids.append(threading.get_native_id()), release.wait(30))
        )
        thread.start()
        try:
            while not tids:
                threading.Event().wait(0.001)
            for pid in (dead.pid, zombie.pid, tids[0]):
                error = assert_refused_unchanged(reg, lambda p=pid: reg.register(NS, "x", pid=p))
                assert isinstance(error, shmreg.ProcessNotAlive), (pid, error)
        finally:
            release.set()
            thread.join()


# ------------------------------------------------------------- timeouts, since, grace


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
@pytest.mark.parametrize("call", ["wait_for", "watch", "cleanup_namespace"])
def test_bad_timeouts_and_grace(reg: shmreg.Registry, call: str, timeout: Any) -> None:
    calls: dict[str, Callable[[], Any]] = {
        "wait_for": lambda: reg.wait_for(NS, "never", timeout=timeout),
        "watch": lambda: reg.watch(since=0, timeout=timeout),
        "cleanup_namespace": lambda: reg.cleanup_namespace(NS, grace=timeout),
    }
    error = assert_refused_unchanged(reg, calls[call])
    assert isinstance(error, shmreg.InvalidArgument), repr(error)


@pytest.mark.parametrize(
    "since",
    [
        pytest.param(-1, id="since--1"),
        pytest.param(-(2**70), id="since-very-negative"),
        pytest.param(1.5, id="since-float"),
        pytest.param(math.nan, id="since-NaN"),
        pytest.param("3", id="since-str"),
        pytest.param(True, id="since-bool"),
        pytest.param([0], id="since-list"),
    ],
)
def test_watch_bad_since(reg: shmreg.Registry, since: Any) -> None:
    error = assert_refused_unchanged(reg, lambda: reg.watch(since=since, timeout=0))
    assert isinstance(error, shmreg.InvalidArgument), repr(error)


def test_wait_for_zero_timeout_on_a_missing_name_times_out(reg: shmreg.Registry) -> None:
    error = assert_refused_unchanged(reg, lambda: reg.wait_for(NS, "never", timeout=0))
    assert isinstance(error, shmreg.RegistryTimeout)


# ------------------------------------------------------------------ the other arguments


@pytest.mark.parametrize(
    "items",
    [
        pytest.param(5, id="int"),
        pytest.param(None, id="None"),
        pytest.param([("a",)], id="1-tuple"),
        pytest.param([("a", None)], id="2-tuple"),
        pytest.param([5], id="int-item"),
        pytest.param({"ab": None}, id="dict"),
        pytest.param([("a", None, None, None)], id="4-tuple"),
    ],
)
def test_register_many_bad_items(reg: shmreg.Registry, items: Any) -> None:
    assert_refused_unchanged(reg, lambda: reg.register_many(NS, items))


@pytest.mark.parametrize(
    "field",
    [
        pytest.param([], id="list"),
        pytest.param({}, id="dict"),
        pytest.param({1}, id="set"),
    ],
)
def test_get_metadata_field_unhashable(reg: shmreg.Registry, field: Any) -> None:
    assert_refused_unchanged(reg, lambda: reg.get_metadata_field(NS, "mine", field))


def test_get_metadata_field_of_a_missing_name(reg: shmreg.Registry) -> None:
    error = assert_refused_unchanged(reg, lambda: reg.get_metadata_field(NS, "nope", "type"))
    assert isinstance(error, shmreg.NotRegistered)


@pytest.mark.parametrize(
    "predicate",
    [pytest.param(5, id="int"), pytest.param("type", id="str"), pytest.param({}, id="dict")],
)
def test_find_services_by_metadata_non_callable(reg: shmreg.Registry, predicate: Any) -> None:
    assert_refused_unchanged(reg, lambda: reg.find_services_by_metadata(NS, predicate))


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(lambda r: r.list_by_type(NS, "\ud800"), id="list_by_type"),
        pytest.param(lambda r: r.find_by_metadata(NS, type="\udfff"), id="find-type"),
        pytest.param(lambda r: r.find_by_metadata(NS, capabilities="\ud800"), id="find-caps"),
        pytest.param(
            lambda r: r.find_by_metadata(NS, capabilities=["a", "\ud800"]), id="find-caps-list"
        ),
    ],
)
def test_query_with_a_surrogate_type_or_capability(
    reg: shmreg.Registry, query: Callable[[shmreg.Registry], Any]
) -> None:
    before = snapshot(reg)
    try:
        assert query(reg) == []
    except shmreg.ShmregError:
        pass
    except BaseException as exc:
        pytest.fail(f"raised {type(exc).__name__}: {exc!r}")
    assert snapshot(reg) == before


def test_a_raising_predicate_propagates_unchanged(reg: shmreg.Registry) -> None:
    """The caller's own exception is theirs: passed through as is, nothing changed."""

    class Mine(Exception):
        pass

    def predicate(meta: dict[str, Any]) -> bool:
        raise Mine("from the caller")

    before = snapshot(reg)
    with pytest.raises(Mine):
        reg.find_services_by_metadata(NS, predicate)
    assert snapshot(reg) == before


@pytest.mark.parametrize(
    "equals",
    [
        {"type": [[1]]},
        {"type": {1}},
        {"type": math.nan},
        {"capabilities": {"a"}},
        {"capabilities": object()},
        {"capabilities": [object()]},
        {"type": DEEP},
        {"n": 2**200},
    ],
    ids=[
        "list-of-list",
        "set",
        "NaN",
        "caps-set",
        "caps-object",
        "caps-list-of-object",
        "deep-dict",
        "int-200-bits",
    ],
)
def test_queries_with_unmatchable_values_find_nothing(
    reg: shmreg.Registry, equals: dict[str, Any]
) -> None:
    before = snapshot(reg)
    with no_hang():
        assert reg.find_by_metadata(NS, **equals) == []
        assert reg.list_by_type(NS, equals.get("type", object())) == []
    assert snapshot(reg) == before


def test_bad_generation_fences_are_stale(reg: shmreg.Registry) -> None:
    for generation in ("1", 1.5, -1, 2**70, None.__class__):
        error = assert_refused_unchanged(
            reg, lambda g=generation: reg.unregister(NS, "mine", generation=g)
        )
        assert isinstance(error, shmreg.StaleGeneration)
        error = assert_refused_unchanged(
            reg, lambda g=generation: reg.update_metadata(NS, "mine", {"x": 1}, generation=g)
        )
        assert isinstance(error, shmreg.StaleGeneration)


def test_count_of_no_namespace_is_everything(reg: shmreg.Registry) -> None:
    assert reg.count() == 3


# ----------------------------------------------------------------- opening a registry


def _name() -> str:
    return f"t-{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        pytest.param("init", {"capacity": 0}, id="capacity-0"),
        pytest.param("init", {"capacity": -1}, id="capacity--1"),
        pytest.param("create", {"capacity": "5"}, id="capacity-str"),
        pytest.param("create", {"capacity": 1.5}, id="capacity-float"),
        pytest.param("create", {"capacity": True}, id="capacity-bool"),
        pytest.param("create", {"capacity": math.nan}, id="capacity-NaN"),
        pytest.param(
            "create",
            {"capacity": 2**64},
            id="capacity-2**64",
        ),
        pytest.param(
            "create",
            {"capacity": 2**62},
            id="capacity-2**62",
        ),
        pytest.param("create", {"max_metadata_bytes": 0}, id="max-meta-0"),
        pytest.param("create", {"max_metadata_bytes": -5}, id="max-meta-negative"),
        pytest.param("create", {"max_metadata_bytes": "4096"}, id="max-meta-str"),
        pytest.param(
            "create",
            {"max_metadata_bytes": 2**40},
            id="max-meta-2**40",
        ),
        pytest.param(
            "create",
            {"max_metadata_bytes": 2**24 + 1},
            id="max-meta-16MiB+1",
        ),
        pytest.param("create", {"mode": "0o666"}, id="mode-str"),
        pytest.param("create", {"mode": -1}, id="mode-negative"),
        pytest.param("create", {"mode": 0o7777}, id="mode-setuid-bits"),
        pytest.param("create", {"mode": 1.5}, id="mode-float"),
        pytest.param("init", {"backend": "nope"}, id="backend-unknown"),
        pytest.param("init", {"backend": 5}, id="backend-int"),
        pytest.param("init", {"backend": object()}, id="backend-object"),
        pytest.param("attach", {}, id="attach-missing"),
        pytest.param("attach", {"capacity": -1}, id="attach-capacity-negative"),
    ],
)
def test_bad_open_arguments(factory: str, kwargs: dict[str, Any]) -> None:
    name = _name()
    open_ = {
        "init": shmreg.Registry,
        "create": shmreg.Registry.create,
        "attach": shmreg.Registry.attach,
    }[factory]
    with destroying(name):
        refused(lambda: open_(name, **kwargs))
        assert segments_of(name) == [], "a refused open left segments behind"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(None, id="None"),
        pytest.param(5, id="int"),
        pytest.param(b"reg", id="bytes"),
        pytest.param("", id="empty"),
        pytest.param("a/b", id="slash"),
        pytest.param("../etc", id="dotdot"),
        pytest.param("a\x00b", id="NUL"),
        pytest.param("a b", id="space"),
        pytest.param("a.b", id="dot"),
        pytest.param("-lead", id="leading-dash"),
        pytest.param("x" * 101, id="101-chars"),
        pytest.param("x" * 100_000, id="huge"),
        pytest.param("\ud800", id="surrogate"),
        pytest.param("é", id="non-ascii"),
    ],
)
@pytest.mark.parametrize("factory", ["init", "create", "attach"])
def test_bad_registry_names(name: Any, factory: str) -> None:
    open_ = {
        "init": shmreg.Registry,
        "create": shmreg.Registry.create,
        "attach": shmreg.Registry.attach,
    }[factory]
    error = refused(lambda: open_(name))
    assert isinstance(error, shmreg.InvalidRegistryName), repr(error)


@pytest.mark.parametrize(
    ("setting", "asked"),
    [("capacity", 5), ("max_metadata_bytes", 99)],
)
def test_attach_with_other_settings_names_both_values(
    reg: shmreg.Registry, setting: str, asked: int
) -> None:
    for open_ in (shmreg.Registry.attach, shmreg.Registry, shmreg.Registry.create):
        error = assert_refused_unchanged(reg, lambda o=open_: o(reg.name, **{setting: asked}))
        assert isinstance(error, shmreg.IncompatibleRegistry), repr(error)
        assert (error.setting, error.expected) == (setting, asked)
        # The conftest registry: capacity 1024, the default 4096 metadata bytes.
        assert error.actual == (1024 if setting == "capacity" else 4096)
        assert str(asked) in str(error) and str(error.actual) in str(error)


def test_odd_max_metadata_bytes_opens(reg_name: str) -> None:
    with destroying(reg_name):
        try:
            reg = shmreg.Registry.create(reg_name, capacity=8, max_metadata_bytes=300_001)
        except shmreg.ShmregError:
            assert segments_of(reg_name) == []
            return
        with reg:
            reg.register(NS, "k", metadata={"x": "y" * 299_000})
            assert reg.get_metadata(NS, "k") == {"x": "y" * 299_000}


HUGE_CAPACITY_CHILD = r"""
import sys
try:
    shmreg.Registry.create(sys.argv[1], capacity=2**40)
    report({"result": "opened"})
except shmreg.ShmregError as exc:
    report({"result": type(exc).__name__})
except BaseException as exc:
    report({"result": "not-shmreg", "type": type(exc).__name__, "msg": str(exc)})
"""


def test_absurd_capacity_is_a_clean_shmreg_error() -> None:
    name = _name()
    with destroying(name), children() as kids:
        lines = finish_ok(kids.py(HUGE_CAPACITY_CHILD, name))
        assert lines[-1]["result"] not in ("not-shmreg", "opened"), lines
        assert segments_of(name) == []


# ------------------------------------------------------------------ hypothesis garbage

_odd = st.sampled_from(
    [
        object(),
        print,
        type,
        Ellipsis,
        NotImplemented,
        range(3),
        bytearray(b"x"),
        memoryview(b"x"),
        1j,
        decimal.Decimal("NaN"),
        frozenset({1}),
        {1, 2},
        lambda: 1,
        threading.Lock(),
        math.inf,
        -math.inf,
        math.nan,
        2**64,
        -(2**63) - 1,
        2**200,
    ]
)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.text(alphabet=st.sampled_from("a/\x00\ud800\udfff\u202e."), max_size=8),
    st.binary(max_size=10),
    _odd,
)
garbage = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(
            st.one_of(st.text(max_size=5), st.integers(), st.none()), inner, max_size=4
        ),
    ),
    max_leaves=12,
)
valid_service = st.one_of(
    st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=10),
    st.integers(0, 1000),
)
service_arg = st.one_of(valid_service, garbage)
namespace_arg = st.one_of(st.just("hyp"), garbage)

GARBAGE = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def shared() -> Iterator[shmreg.Registry]:
    """One registry for all the garbage of this module (reg_name pattern, destroyed after)."""
    name = _name()
    with destroying(name):
        reg = shmreg.Registry.create(name, capacity=256)
        reg.register("hyp", "fixed", metadata={"type": "t", "capabilities": ["c"]})
        try:
            yield reg
        finally:
            reg.close()


def _shmreg_or_success(reg: shmreg.Registry, call: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, result) or (False, error); any other exception or a change on error fails."""
    before = snapshot(reg)
    try:
        with no_hang():
            result = call()
            if isinstance(result, Iterator):
                result = list(result)
    except shmreg.ShmregError as exc:
        assert isinstance(exc.code, int), exc
        assert snapshot(reg) == before, f"{exc!r} left the registry changed"
        return False, exc
    except Hung as exc:
        pytest.fail(f"hung: {exc}")
    except BaseException as exc:
        pytest.fail(f"raised {type(exc).__name__} (not a ShmregError): {exc!r}")
    return True, result


@GARBAGE
@given(
    namespace=st.one_of(st.just("hyp-reg"), garbage),
    service=service_arg,
    pid=st.one_of(st.none(), garbage),
    metadata=st.one_of(st.none(), garbage),
)
def test_garbage_register(
    shared: shmreg.Registry, namespace: Any, service: Any, pid: Any, metadata: Any
) -> None:
    ok, generation = _shmreg_or_success(
        shared, lambda: shared.register(namespace, service, pid=pid, metadata=metadata)
    )
    if ok:
        assert type(generation) is int and generation > 0
        owner = os.getpid() if pid is None else pid
        assert shared.lookup(namespace, service) == owner
        assert shared.unregister(namespace, service) is True


@GARBAGE
@given(namespace=namespace_arg, service=service_arg, field=st.text(max_size=5))
def test_garbage_reads(shared: shmreg.Registry, namespace: Any, service: Any, field: str) -> None:
    for call in (
        lambda: shared.lookup(namespace, service),
        lambda: shared.lookup_with_metadata(namespace, service),
        lambda: shared.registered(namespace, service),
        lambda: shared.get_metadata(namespace, service),
        lambda: shared.get_metadata_field(namespace, service, field),
        lambda: (
            shared.unregister(namespace, service)
            if (namespace, service) != ("hyp", "fixed")
            else None
        ),
        lambda: shared.list_services(namespace),
        lambda: shared.list_services_with_metadata(namespace),
        lambda: shared.count(namespace),
        lambda: shared.wait_for(namespace, service, timeout=0),
    ):
        _shmreg_or_success(shared, call)
    assert shared.lookup("hyp", "fixed") == os.getpid()


@GARBAGE
@given(metadata=garbage, merge=st.booleans())
def test_garbage_update(shared: shmreg.Registry, metadata: Any, merge: bool) -> None:
    ok, _ = _shmreg_or_success(
        shared, lambda: shared.update_metadata("hyp", "fixed", metadata, merge=merge)
    )
    if ok:
        stored = shared.get_metadata("hyp", "fixed")
        assert isinstance(stored, dict)
    shared.update_metadata("hyp", "fixed", {"type": "t", "capabilities": ["c"]})


@GARBAGE
@given(
    equals=st.dictionaries(
        st.sampled_from(["type", "capabilities", "x", "n"]), garbage, max_size=3
    ),
    type_=garbage,
)
def test_garbage_queries(shared: shmreg.Registry, equals: dict[str, Any], type_: Any) -> None:
    # Lone surrogates included: in "type" or "capabilities" they once raised
    # UnicodeEncodeError (test_query_with_a_surrogate_type_or_capability pins the fix).
    ok, found = _shmreg_or_success(shared, lambda: shared.find_by_metadata("hyp", **equals))
    assert ok and isinstance(found, list)
    ok, found = _shmreg_or_success(shared, lambda: shared.list_by_type("hyp", type_))
    assert ok and isinstance(found, list)


@GARBAGE
@given(timeout=garbage, since=st.one_of(st.none(), garbage), grace=garbage)
def test_garbage_timeouts(shared: shmreg.Registry, timeout: Any, since: Any, grace: Any) -> None:
    def finite_positive(value: Any) -> bool:
        return type(value) in (int, float) and 0 < value < math.inf

    if timeout is None or finite_positive(timeout):
        timeout = 0  # a valid wait would only slow the test down (or, None, never end)
    if finite_positive(grace):
        grace = -grace
    _shmreg_or_success(shared, lambda: shared.wait_for("hyp", "never", timeout=timeout))
    _shmreg_or_success(shared, lambda: shared.watch("hyp", since=since, timeout=0))
    _shmreg_or_success(shared, lambda: shared.watch("hyp", since=0, timeout=timeout))
    _shmreg_or_success(shared, lambda: shared.cleanup_namespace("hyp-empty", grace=grace))


@GARBAGE
@given(name=st.one_of(st.none(), garbage), capacity=garbage, max_meta=garbage, mode=garbage)
def test_garbage_open_arguments(name: Any, capacity: Any, max_meta: Any, mode: Any) -> None:
    # create=False: garbage that passes every check still only attaches, to a registry that
    # does not exist (RegistryNotFound), so no setting can make it build anything.
    if name is None:
        name = _name()
    error = refused(
        lambda: shmreg.Registry(
            name, capacity=capacity, max_metadata_bytes=max_meta, mode=mode, create=False
        )
    )
    assert isinstance(
        error, (shmreg.InvalidRegistryName, shmreg.InvalidBackendConfig, shmreg.RegistryNotFound)
    ), repr(error)


@settings(GARBAGE, max_examples=60)
@given(items=garbage)
def test_garbage_register_many(shared: shmreg.Registry, items: Any) -> None:
    ok, _ = _shmreg_or_success(shared, lambda: shared.register_many("hyp-many", items))
    if ok:
        for item in items:
            shared.unregister("hyp-many", item[0])


# ------------------------------------------------------------------------------ access

DROP_AND_ATTACH = r"""
import importlib, pkgutil, sys
# Everything shmreg might import lazily, imported while still root (the interpreter's own
# files are under a directory nobody may read).
import shmreg.backends
for mod in pkgutil.walk_packages(shmreg.__path__, "shmreg."):
    if mod.name.endswith("__main__"):
        continue  # running the command line is not importing
    try:
        importlib.import_module(mod.name)
    except Exception:
        pass
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
assert os.geteuid() == 65534
name, parent = sys.argv[1], int(sys.argv[2])
out = {}
for how, open_ in (("attach", shmreg.Registry.attach), ("init", shmreg.Registry)):
    try:
        reg = open_(name)
    except shmreg.ShmregError as exc:
        out[how] = {"error": type(exc).__name__, "code": exc.code}
        continue
    except BaseException as exc:
        out[how] = {"error": "not-shmreg " + type(exc).__name__ + ": " + str(exc)}
        continue
    try:
        found = reg.lookup_with_metadata("acl", "parent")
        out[how] = {"found": [found[0], found[1]] if found else None}
        reg.register("acl", "nobody-" + how, metadata={"uid": os.geteuid()})
        out[how]["mine"] = reg.lookup("acl", "nobody-" + how)
    except BaseException as exc:
        out[how]["use-error"] = type(exc).__name__ + ": " + str(exc)
    finally:
        reg.close()
report(out)
"""

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")


@root_only
def test_other_user_is_refused_a_private_registry(reg_name: str) -> None:
    with destroying(reg_name), children() as kids:
        reg = shmreg.Registry.create(reg_name)
        try:
            reg.register("acl", "parent", metadata={"uid": 0})
            before = snapshot(reg)
            out = finish_ok(kids.py(DROP_AND_ATTACH, reg_name, str(os.getpid())))[-1]
            for how in ("attach", "init"):
                assert out[how] == {"error": "RegistryPermissionError", "code": 2007}, out
            assert snapshot(reg) == before
            assert len(segments_of(reg_name)) == 2  # nothing created beside root and data
        finally:
            reg.close()


@root_only
def test_other_user_shares_a_registry_created_0o666(reg_name: str) -> None:
    with destroying(reg_name), children() as kids:
        reg = shmreg.Registry.create(reg_name, mode=0o666)
        try:
            reg.register("acl", "parent", metadata={"uid": 0})
            proc = kids.py(DROP_AND_ATTACH, reg_name, str(os.getpid()))
            out = finish_ok(proc)[-1]
            for how in ("attach", "init"):
                assert out[how]["found"] == [os.getpid(), {"uid": 0}], out
                assert out[how]["mine"] == proc.pid, out
                assert "use-error" not in out[how], out
            # The child has exited: its entries read as absent, the parent's stays.
            assert reg.lookup("acl", "nobody-attach") is None
            assert reg.lookup_with_metadata("acl", "parent") == (os.getpid(), {"uid": 0})
        finally:
            reg.close()


# ----------------------------------------------------------------------- no unpickling

_SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_no_code_path_unpickles() -> None:
    """Nothing read from shared memory can run code: no pickle/marshal loads anywhere.

    The single use of pickle is ``_error_base.py`` asking ``pickle.dumps`` whether an error's
    context value can travel (its ``__reduce__`` for sending errors between processes);
    nothing loads a pickle, and msgpack is never given hooks that build objects.
    """
    assert _SOURCES, PACKAGE
    forbidden = re.compile(
        r"pickle\.loads?\b|\bmarshal\b|Unpickler|\b_pickle\b|cloudpickle|\bdill\b|\bshelve\b"
        r"|jsonpickle"
    )
    users: dict[str, set[str]] = {}
    for path in _SOURCES:
        text = path.read_text(encoding="utf-8")
        rel = str(path.relative_to(PACKAGE))
        assert not forbidden.search(text), f"{rel}: {forbidden.search(text)}"
        tree = ast.parse(text, filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ("pickle", "marshal", "shelve", "copyreg"):
                        users.setdefault(rel, set()).add(f"import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] in ("pickle", "marshal", "shelve", "copyreg"):
                    users.setdefault(rel, set()).add(f"from {node.module}")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "pickle"
            ):
                users.setdefault(rel, set()).add(f"pickle.{node.attr}")
            elif isinstance(node, ast.Call):
                hooks = [k.arg for k in node.keywords if k.arg and k.arg.endswith("_hook")]
                assert not hooks, f"{rel}:{node.lineno}: a call with {hooks}"
                if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                    pytest.fail(f"{rel}:{node.lineno}: {node.func.id}()")
    assert users == {"_error_base.py": {"import pickle", "pickle.dumps"}}, users
