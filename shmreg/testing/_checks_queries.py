"""Conformance checks: namespaces, round trips, queries over many entries, and refused input."""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable
from typing import Any

from shmreg._errors import InvalidKey, InvalidMetadata, MetadataTooLarge
from shmreg._types import Service
from shmreg.backends._protocol import Backend
from shmreg.testing._checks_common import (
    NS,
    OTHER,
    Check,
    _canon,
    _children,
    _equal,
    _expect,
    _found,
    _limit,
    _me,
    _nest,
    _owner,
    _raises,
    _reap,
    _services,
    _short,
    _snapshot,
    collector,
)

CHECKS: list[tuple[str, Check]] = []
_check = collector(CHECKS)


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
        _equal((b.count(NS), b.count(OTHER), b.count("empty"), b.count()), (2, 1, 0, 3), "counts")
        b.unregister(OTHER, "shared")
        _equal(b.lookup_with_metadata(NS, "shared"), (os.getpid(), {"ns": 1}), "other ns")


@_check
def services_round_trip(b: Backend) -> None:
    services: list[Service] = [
        "svc",
        " ",
        "ünïcødé ✓ 日本",
        "a\\x00b",  # backslash, x, 0, 0: text that only looks like a NUL
        0,
        7,
        -5,
        2**64 - 1,
        -(2**63),
        ("agent", "planner-1"),
        ("a", 1, "b", 2, -3),
        (1,),
        ("1",),
        "1",
        1,
    ]
    for i, service in enumerate(services):
        b.register(NS, service, _me(), {"i": i})
    _equal(_services(b, NS), {repr(s) for s in services}, "list_services (type-exact)")
    _equal(
        {repr(e.service): e.metadata["i"] for e in b.list_entries(NS)},
        {repr(s): i for i, s in enumerate(services)},
        "list_entries",
    )
    for service in services:
        _equal(b.lookup(NS, service), os.getpid(), f"lookup({service!r})")


@_check
def metadata_round_trips(b: Backend) -> None:
    meta = {
        "none": None,
        "t": True,
        "f": False,
        "zero": 0,
        "neg": -1,
        "big": 2**64 - 1,
        "small": -(2**63),
        "float": 1.5,
        "negzero": -0.0,
        "inf": math.inf,
        "ninf": -math.inf,
        "s": "ü ✓",
        "empty": "",
        "b": b"\x00\xff",
        "eb": b"",
        "l": [1, "a", None, [2, [b"x"]], {"k": 1.0}],
        "el": [],
        "ed": {},
        "d": {"x": {"y": [True, 1, 1.0]}},
        "": "empty key",
        "ключ": 1,
    }
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
    for equals, expected in (
        ({"type": "worker"}, {"w1", "w2"}),
        ({"type": "worker", "zone": "a"}, {"w1"}),
        ({"zone": "a"}, {"w1", "db"}),
        ({"n": 2}, {"w2"}),
        ({"type": "cache"}, set()),
        ({"missing": None}, set()),
        ({"type": "worker", "zone": "c"}, set()),
        ({}, {"w1", "w2", "db", "bare"}),
    ):
        _equal(_found(b.find(NS, equals=equals)), {repr(s) for s in expected}, f"{equals}")
    entries = b.find(NS, equals={"type": "db"})
    _equal(entries, [("db", os.getpid(), {"type": "db", "zone": "a"})], "entry shape")


@_check
def find_by_list_membership(b: Backend) -> None:
    b.register(NS, "ab", _me(), {"capabilities": ["a", "b"], "tags": [1, "x"]})
    b.register(NS, "bc", _me(), {"capabilities": ["b", "c"], "tags": []})
    b.register(NS, "scalar", _me(), {"capabilities": "a"})
    for equals, expected in (
        ({"capabilities": "a"}, {"ab", "scalar"}),
        ({"capabilities": "b"}, {"ab", "bc"}),
        ({"capabilities": ["a", "b"]}, {"ab"}),
        ({"capabilities": ["b"]}, {"ab", "bc"}),
        ({"capabilities": ["a", "c"]}, set()),
        ({"capabilities": []}, {"ab", "bc"}),
        ({"capabilities": "z"}, set()),
        ({"tags": 1}, {"ab"}),
        ({"tags": "x", "capabilities": "b"}, {"ab"}),
    ):
        _equal(_found(b.find(NS, equals=equals)), {repr(s) for s in expected}, f"{equals}")


@_check
def find_uses_python_equality(b: Backend) -> None:
    # The prefilters a backend may use (hashes of "type", capability bit masks) must not
    # change the answer: equality is Python's ==, as for any other field.
    b.register(NS, "float", _me(), {"type": 1.0, "capabilities": [2.0], "level": 1.0})
    b.register(NS, "none", _me(), {"type": None, "capabilities": None})
    for equals, expected in (
        ({"level": 1}, {"float"}),
        ({"type": 1}, {"float"}),
        ({"capabilities": 2}, {"float"}),
        ({"type": None}, {"none"}),
        ({"capabilities": None}, {"none"}),
    ):
        _equal(_found(b.find(NS, equals=equals)), {repr(s) for s in expected}, f"{equals}")


@_check
def find_by_predicate(b: Backend) -> None:
    for i in range(6):
        b.register(NS, i, _me(), {"load": i, "type": "even" if i % 2 == 0 else "odd"})
    b.register(OTHER, 99, _me(), {"load": 99, "type": "odd"})
    _equal(_found(b.find(NS, predicate=lambda m: m["load"] > 2)), {"3", "4", "5"}, "predicate")
    _equal(
        _found(b.find(NS, equals={"type": "odd"}, predicate=lambda m: m["load"] > 2)),
        {"3", "5"},
        "equals and predicate",
    )

    def meddle(meta: dict[str, Any]) -> bool:
        meta["load"] = -1
        return True

    b.find(NS, predicate=meddle)
    _equal(
        b.lookup_with_metadata(NS, 0),
        (os.getpid(), {"load": 0, "type": "even"}),
        "metadata after a predicate mutated its argument",
    )

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


# ------------------------------------------------------------------------- bad input

_BAD_NAMESPACES: list[object] = [5, None, b"ns", "", "a\x00b", "x" * 256, "\ud800", 1.5]
_BAD_SERVICES: list[object] = [
    True,
    1.5,
    ["a"],
    None,
    (),
    ("a", ["b"]),
    ("a", True),
    2**64,
    -(2**63) - 1,
    "x" * 2000,
    b"svc",
    "\ud800",
    {"a": 1},
    _nest(9, lambda v: (v,), "a"),
    ("a", ("b", 1)),  # tuples are flat: a tree belongs in the metadata
    "",
    "a\x00b",
    ("a", ""),
]


def _key_calls(
    b: Backend, ns: Any, service: Any
) -> list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
    calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
        (b.register, (ns, service, _me(), {"a": 1}), {}),
        (b.lookup, (ns, service), {}),
        (b.lookup_with_metadata, (ns, service), {}),
        (b.lookup_entry, (ns, service), {}),
        (b.update_metadata, (ns, service, {}), {}),
        (b.update_metadata, (ns, service, {}), {"merge": True}),
        (b.unregister, (ns, service), {}),
    ]
    if service == "svc":  # the namespace is the bad part: the namespace-wide calls too
        calls += [
            (b.list_services, (ns,), {}),
            (b.list_entries, (ns,), {}),
            (b.find, (ns,), {}),
            (b.find, (ns,), {"equals": {"a": 1}}),
        ]
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
    ([("a", 1)], "metadata"),
    ("text", "metadata"),
    (5, "metadata"),
    ({1: "x"}, "metadata"),
    ({"a": {2: "x"}}, "metadata['a']"),
    ({"a": {"b": {None: 1}}}, "metadata['a']['b']"),
    ({"a": (1,)}, "metadata['a']"),
    ({"a": {1, 2}}, "metadata['a']"),
    ({"a": object()}, "metadata['a']"),
    ({"a": [1, (2,)]}, "metadata['a'][1]"),
    ({"a": float("nan")}, "metadata['a']"),
    ({"a": [0.5, math.nan]}, "metadata['a'][1]"),
    ({"a": 2**64}, "metadata['a']"),
    ({"a": -(2**63) - 1}, "metadata['a']"),
    ({"a": bytearray(b"x")}, "metadata['a']"),
    ({"a": 1j}, "metadata['a']"),
    ({"a": _nest(40, lambda v: [v])}, "metadata['a']"),
    ({"a": _nest(40, lambda v: {"k": v})}, "metadata['a']"),
]


@_check
def bad_metadata_rejected(b: Backend) -> None:
    b.register(NS, "svc", _me(), {"keep": [1]})
    before = _snapshot(b)
    for meta, path in _BAD_METADATA:
        for call, args, kwargs in (
            (b.register, (NS, "new", _me(), meta), {}),
            (b.register, (NS, "svc", _me(), meta), {}),
            (b.update_metadata, (NS, "svc", meta), {}),
            (b.update_metadata, (NS, "svc", meta), {"merge": True}),
        ):
            exc = _raises(InvalidMetadata, call, *args, **kwargs)
            _expect(
                isinstance(exc.path, str) and exc.path.startswith(path),
                f"InvalidMetadata.path for {_short(meta)}: {exc.path!r}, wanted {path}...",
            )
        _equal(_snapshot(b), before, f"state after InvalidMetadata for {_short(meta)}")


@_check
def oversized_metadata_rejected(b: Backend) -> None:
    limit = _limit(b)
    b.register(NS, "svc", _me(), {"keep": 1})
    before = _snapshot(b)
    huge = {"blob": b"x" * (limit + 1)}
    for call in (
        lambda: b.register(NS, "new", _me(), huge),
        lambda: b.register(NS, "svc", _me(), huge),
        lambda: b.update_metadata(NS, "svc", huge),
        lambda: b.update_metadata(NS, "svc", huge, merge=True),
    ):
        exc = _raises(MetadataTooLarge, call)
        _expect(exc.size > exc.limit == limit, f"MetadataTooLarge size/limit: {exc}")
    # Each half fits; merged they do not.
    half = {"h1": b"x" * (limit // 2 + 16)}
    b.update_metadata(NS, "svc", half)
    before = _snapshot(b)
    _raises(
        MetadataTooLarge, b.update_metadata, NS, "svc", {"h2": b"y" * (limit // 2 + 16)}, merge=True
    )
    _equal(_snapshot(b), before, "state after a merge that grew too large")
    b.register(NS, "svc", _me(), {"fits": b"x" * (limit - 64)})
    _expect(b.lookup(NS, "svc") == os.getpid(), "metadata just under the limit")
