"""The compiled scan: find, listings and counts answered in C, equal to the Python scan.

``Fast.scan`` walks the slot table, judges owners, checks records and decodes them with a
msgpack decoder of its own; whatever the Python scan would skip, count and log (damage, a
stuck slot, a moved table) it hands back. These tests hold it to the Python scan's answers
on the same registry, hold its decoder to msgpack-python's, and check it is the path taken.
"""

from __future__ import annotations

import contextlib
import math
import random
import string
import subprocess
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
from helpers import DEADLINE_S, read_line, run_py

import shmreg
from shmreg import _codec
from shmreg._engine import fastpath
from shmreg._engine import layout as L
from shmreg._types import Entry
from shmreg.backends import _shm_scans

pytestmark = pytest.mark.skipif(not fastpath.ACTIVE, reason=fastpath.describe())

if fastpath.ACTIVE:
    from shmreg._engine import _speedups
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``True == 1`` is not enough here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@contextmanager
def _python_scans(reg: shmreg.Registry) -> Iterator[None]:
    """Scans of ``reg`` answered by the Python scan alone for the duration."""
    backend: Any = reg.backend
    fast, backend._fast = backend._fast, None
    try:
        yield
    finally:
        backend._fast = fast


def _answers(reg: shmreg.Registry, namespace: str) -> dict[str, Any]:
    """Every scan-backed answer for ``namespace``, in an order-free form."""
    return {
        "entries": sorted(map(repr, reg.backend.list_entries(namespace))),
        "services": sorted(map(repr, reg.list_services(namespace))),
        "count": reg.count(namespace),
        "type": sorted(map(repr, reg.find_by_metadata(namespace, type="worker"))),
        "cap": sorted(map(repr, reg.find_by_metadata(namespace, capabilities="gpu"))),
        "caps": sorted(map(repr, reg.find_by_metadata(namespace, capabilities=["gpu", "ssd"]))),
        "both": sorted(map(repr, reg.find_by_metadata(namespace, type="db", capabilities="ssd"))),
    }


# ------------------------------------------------------------------ the decoder

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.binary(max_size=4), inner, max_size=5)
    ),
    max_leaves=30,
)


@hypothesis.given(_values, st.booleans(), st.booleans())
@hypothesis.settings(max_examples=300, deadline=None)
def test_its_decoder_returns_what_msgpack_python_returns(
    value: Any, single_float: bool, use_list: bool
) -> None:
    try:
        data = msgpack.packb(value, use_bin_type=True, use_single_float=single_float)
    except OverflowError:  # a float past float32's range
        hypothesis.assume(False)
    expected = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=use_list)
    assert _same(_speedups.unpack(data, use_list), expected)


def test_it_hands_ext_types_which_the_registry_never_stores_to_python() -> None:
    for data in (msgpack.packb(msgpack.ExtType(5, b"x")), msgpack.packb(msgpack.Timestamp(1))):
        with pytest.raises(ValueError):
            _speedups.unpack(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # never used
        msgpack.packb({1: "int key"}, strict_types=False),
        b"\xa2\xff\xfe",  # invalid UTF-8
        b"\x92\x01",  # cut short
        b"\x01\x02",  # something left over
        b"\xdb\xff\xff\xff\xff",  # a length past the end
        b"\xdd\xff\xff\xff\xff",  # an array count past the end
    ],
)
def test_its_decoder_refuses_what_msgpack_python_refuses(data: bytes) -> None:
    with pytest.raises(ValueError):  # msgpack's own errors are ValueErrors too
        msgpack.unpackb(data, raw=False, strict_map_key=True)
    with pytest.raises(ValueError):
        _speedups.unpack(data)


def test_its_decoder_hands_nesting_past_the_storable_depth_to_python() -> None:
    value: Any = "deep"
    for _ in range(_speedups.MAX_METADATA_DEPTH + 5):
        value = [value]
    with pytest.raises(ValueError):
        _speedups.unpack(msgpack.packb(value))


def test_repeated_short_strings_are_shared_and_long_ones_are_not() -> None:
    short, long = "gpu", "x" * 40
    out = _speedups.unpack(msgpack.packb([short, short, long, long]))
    assert out == [short, short, long, long]
    assert out[0] is out[1] and out[2] is not out[3]


def test_the_scan_modes_match_their_python_names() -> None:
    assert _speedups.SCAN_ENTRIES == _shm_scans.SCAN_ENTRIES
    assert _speedups.SCAN_SERVICES == _shm_scans.SCAN_SERVICES
    assert _speedups.SCAN_COUNT == _shm_scans.SCAN_COUNT


# ------------------------------------------------------------------ the scan


def _colliding_namespaces() -> tuple[str, str]:
    """Two namespaces whose crc32 (the slot's namespace hash) is the same."""
    rnd, seen = random.Random(7), {}
    while True:
        name = "".join(rnd.choices(string.ascii_letters, k=8))
        crc = zlib.crc32(name.encode())
        if crc in seen and seen[crc] != name:
            return seen[crc], name
        seen[crc] = name


def _fill(reg: shmreg.Registry, namespace: str, n: int, salt: int = 0) -> None:
    kinds = ["worker", "db", ["worker", "db"], None]
    caps = [["gpu"], ["ssd"], ["gpu", "ssd"], [], "gpu", {"odd": "caps"}]
    for i in range(n):
        meta: dict[str, Any] = {"i": i + salt, "caps_ok": True, "f": i / 3, "b": bytes([i % 256])}
        kind = kinds[i % len(kinds)]
        if kind is not None:
            meta["type"] = kind
        meta["capabilities"] = caps[i % len(caps)]
        meta["nested"] = {"deep": [i, {"x": "é" * (i % 3)}]}
        service: Any = f"s{i}" if i % 5 else (i if i % 2 else ("tuple", i))
        reg.register(namespace, service, metadata=meta)


def test_it_answers_every_scan_as_the_python_scan_does(registry: shmreg.Registry) -> None:
    reg = registry
    first, second = _colliding_namespaces()
    _fill(reg, first, 300)
    _fill(reg, second, 120, salt=1000)
    _fill(reg, "other", 50)
    # A dead owner's entries: its process is gone, so neither path lists them.
    child = run_py(
        f"import sys, shmreg\nreg = shmreg.Registry.attach({reg.name!r})\n"
        f"reg.register({first!r}, 'from-child', metadata={{'type': 'worker'}})\n"
        "print('{}', flush=True)\nsys.stdin.read()\n",
        stdin=subprocess.PIPE,
    )
    try:
        read_line(child)
        alive = _answers(reg, first)
        assert "'from-child'" in " ".join(alive["services"])
    finally:
        child.kill()
        child.wait(timeout=DEADLINE_S)
    before = reg.backend._fast.counts()["scans"]  # type: ignore[attr-defined]
    compiled = {ns: _answers(reg, ns) for ns in (first, second, "other", "absent")}
    scans = reg.backend._fast.counts()["scans"] - before  # type: ignore[attr-defined]
    assert scans == 4 * 7  # every scan above was answered in C
    with _python_scans(reg):
        python = {ns: _answers(reg, ns) for ns in (first, second, "other", "absent")}
    assert compiled == python
    assert compiled[first]["count"] == 300 and compiled[second]["count"] == 120
    assert compiled["absent"]["entries"] == []
    assert "'from-child'" not in " ".join(compiled[first]["services"])


class _Grumpy:
    """A wanted value whose ``==`` raises: both paths must raise it alike."""

    def __eq__(self, other: object) -> bool:
        raise ArithmeticError("no comparing me")

    __hash__ = object.__hash__


def test_its_confirmation_of_candidates_is_codec_selects(registry: shmreg.Registry) -> None:
    reg = registry
    metas: list[dict[str, Any]] = [
        {"type": "w", "n": 1, "tags": ["a", "b"], "d": {"x": 1}},
        {"type": "w", "n": 1.0, "tags": "a", "d": {"x": 2}},
        {"type": ["w", "v"], "n": True, "tags": []},
        {"type": "v", "n": 2, "nested": [["a"]]},
        {"n": None},
    ]
    for i in range(60):
        reg.register("ns", f"s{i}", metadata=metas[i % len(metas)])
    queries: list[dict[str, Any]] = [
        {"type": "w"},
        {"type": "w", "n": 1},
        {"n": 1},
        {"n": None},
        {"tags": "a"},
        {"tags": ["a", "b"]},
        {"tags": ["a"], "type": "w"},
        {"d": {"x": 1}},
        {"nested": ["a"]},
        {"missing": 0},
        {"type": "v", "n": 2.0},
    ]
    for equals in queries:
        got = sorted(map(repr, reg.backend.find("ns", equals=equals)))
        with _python_scans(reg):
            assert got == sorted(map(repr, reg.backend.find("ns", equals=equals))), equals
    for paths in (contextlib.nullcontext(), _python_scans(reg)):
        with paths, pytest.raises(ArithmeticError):
            reg.backend.find("ns", equals={"n": _Grumpy()})


def test_entries_are_the_public_entry_type_with_fresh_containers(registry: shmreg.Registry) -> None:
    reg = registry
    for i in range(3):
        reg.register("ns", f"s{i}", metadata={"type": "w", "tags": ["a"]})
    entries = reg.find_by_metadata("ns", type="w")
    assert {type(e) for e in entries} == {Entry}
    assert all(e.pid == reg.lookup("ns", e.service) for e in entries)
    entries[0].metadata["tags"].append("mutated")  # a caller's change stays its own
    assert all(e.metadata["tags"] == ["a"] for e in reg.find_by_metadata("ns", type="w"))


def _first_of(reg: shmreg.Registry, n: int) -> tuple[Any, int]:
    """Register ``n`` entries of type "w" in "ns"; the table and the index of a used slot."""
    for i in range(n):
        reg.register("ns", f"s{i}", metadata={"type": "w"})
    table = reg.backend._table()  # type: ignore[attr-defined]
    return table, int(table.used_indices()[0])


def test_damage_sends_the_scan_to_python_which_skips_and_counts_it(
    registry: shmreg.Registry,
) -> None:
    reg = registry
    table, index = _first_of(reg, 20)
    words = table.read_slot(index)
    key, _ = table.record_bytes(words)
    table.buf[table.arena_off + L.slot_offset(words) + len(key)] ^= 0xFF
    fast = reg.backend._fast  # type: ignore[attr-defined]
    declined = fast.counts()["declined"]
    assert len(reg.find_by_metadata("ns", type="w")) == 19
    assert fast.counts()["declined"] == declined + 1
    assert reg.backend.damaged_skipped >= 1  # type: ignore[attr-defined]


def test_a_damaged_key_length_is_left_to_the_python_scan(registry: shmreg.Registry) -> None:
    reg = registry
    table, index = _first_of(reg, 3)
    word = table.slot_word0 + index * L.SLOT_WORDS + L.S_REC
    key_len = L.F_KEY_LEN
    table.q[word] = (int(table.q[word]) & ~(key_len.mask << key_len.shift)) | (1 << key_len.shift)
    compiled = (reg.count("ns"), sorted(map(repr, reg.backend.list_entries("ns"))))
    with _python_scans(reg):
        assert compiled == (reg.count("ns"), sorted(map(repr, reg.backend.list_entries("ns"))))


def test_a_slot_left_odd_sends_the_scan_to_python_which_repairs_it(
    registry: shmreg.Registry,
) -> None:
    reg = registry
    table, index = _first_of(reg, 10)
    seq_word = table.slot_word0 + index * L.SLOT_WORDS + L.S_SEQ
    table.q[seq_word] = int(table.q[seq_word]) | 1  # a writer that died mid-write
    fast = reg.backend._fast  # type: ignore[attr-defined]
    declined = fast.counts()["declined"]
    found = reg.find_by_metadata("ns", type="w")
    assert fast.counts()["declined"] > declined
    assert len(found) in (9, 10)  # recovery tombstones or keeps the slot; either way no hang
    assert len(reg.find_by_metadata("ns", type="w")) == len(found)


def test_scans_follow_the_table_through_growth(reg_name: str) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=64)
    try:
        for i in range(500):  # grows several times
            reg.register("ns", i, metadata={"type": "w" if i % 2 else "v"})
        assert len(reg.find_by_metadata("ns", type="w")) == 250
        assert reg.count("ns") == 500
        assert sorted(reg.list_services("ns")) == list(range(500))
    finally:
        reg.destroy()


def test_misuse_of_the_scan_is_a_type_error(registry: shmreg.Registry) -> None:
    fast = registry.backend._fast  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        fast.scan(b"ns\x00", None, 0, 0, dict)
    with pytest.raises(TypeError):
        fast.scan("ns", None, 0, 0, Entry)
    with pytest.raises(ValueError):
        fast.scan(b"ns\x00", None, 0, 7, Entry)
    with pytest.raises(ValueError):
        fast.scan(b"ns", None, 0, 0, Entry)
    assert _codec.check_namespace("ns") == b"ns"
