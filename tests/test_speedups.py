"""The compiled fast path: same bytes, same answers, same crash behaviour as pure Python.

``shmreg._engine._speedups`` answers point reads and registrations of new names in C and
hands everything else to the Python path; both read and write one layout under one lock,
so processes with and without it share registries. These tests check the pieces it
reimplements (crc32, the msgpack encoder, the rules it copies), that it is really the path
taken, that mixed processes agree, that crash points fire inside it, and the liveness words
it adds: a death is seen from memory, at once, zombie or not.

The whole suite also runs on each path (CI sets ``SHMREG_PUREPYTHON=1`` for a second run of
the engine proofs), so this file is about what only the compiled path has.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
from helpers import (
    DEADLINE_S,
    finish_ok,
    read_line,
    run_py,
    send_line,
    wait_until,
    wait_zombie,
)

import shmreg
from shmreg import _codec
from shmreg._engine import events as _ev
from shmreg._engine import fastpath
from shmreg._engine import fsck as _fsck
from shmreg._engine import layout as L
from shmreg._engine.crashpoints import POINTS
from shmreg.backends import _shm_base

pytestmark = pytest.mark.skipif(not fastpath.ACTIVE, reason=fastpath.describe())

if fastpath.ACTIVE:
    from shmreg._engine import _speedups
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


def _fast(reg: shmreg.Registry) -> Any:
    fast = reg.backend._fast  # type: ignore[attr-defined]
    assert fast is not None
    return fast


def _spawn(code: str, *, pure: bool = False) -> subprocess.Popen[str]:
    """A child interpreter with CHILD_PRELUDE, stdin a pipe; ``pure``: no compiled path."""
    return run_py(code, stdin=subprocess.PIPE, env={"SHMREG_PUREPYTHON": "1"} if pure else None)


# ------------------------------------------------------------------ copied rules


def test_the_rules_it_copies_match_their_python_originals() -> None:
    assert _speedups.LAYOUT_VERSION == L.LAYOUT_VERSION
    assert _speedups.TYPE_ABSENT == _codec.TYPE_ABSENT
    assert _speedups.TYPE_ANY == _codec.TYPE_ANY
    assert _speedups.MAX_METADATA_DEPTH == _codec.MAX_METADATA_DEPTH
    assert _speedups.MAX_KEY_BYTES == _codec.MAX_KEY_BYTES
    assert _speedups.KEY_CACHE_LIMIT == _shm_base._KEY_CACHE_LIMIT
    assert _speedups.EVENT_REGISTERED == _ev.REGISTERED


@hypothesis.given(st.binary(max_size=600), st.integers(0, 2**32 - 1))
def test_crc32_is_zlibs(data: bytes, seed: int) -> None:
    assert _speedups.crc32(data, seed) == zlib.crc32(data, seed)


_ints = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([-(2**63), -(2**31) - 1, -(2**31), -32769, -32768, -129, -128, -33, -32,
                     -1, 0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]),
)
_scalars = st.one_of(
    st.none(), st.booleans(), _ints, st.floats(allow_nan=False), st.text(max_size=300),
    st.binary(max_size=300),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=20), inner,
                                                                   max_size=20),
    max_leaves=60,
)


@hypothesis.given(st.dictionaries(st.text(max_size=40), _values, max_size=20))
def test_its_msgpack_bytes_are_msgpack_pythons(metadata: dict[str, Any]) -> None:
    assert _speedups.pack(metadata) == msgpack.packb(metadata, use_bin_type=True)


@pytest.mark.parametrize(
    "value",
    [
        {"nan": math.nan},
        {1: "int key"},
        {"big": 2**64},
        {"small": -(2**63) - 1},
        {"tuple": (1, 2)},
        {"surrogate": "\ud800"},
        {"nested": _nested(40)},
        {"object": object()},
    ],
    ids=["nan", "int-key", "2**64", "below-int64", "tuple", "surrogate", "too-deep", "object"],
)
def test_what_it_cannot_store_it_hands_to_python(value: dict[str, Any], registry: Any) -> None:
    assert _speedups.pack(value) is None
    registry.register("warm", "up")  # the namespace is known: only the metadata declines
    with pytest.raises(shmreg.InvalidMetadata):
        registry.register("warm", "x", metadata=value)
    assert registry.lookup("warm", "x") is None


# ------------------------------------------------------------------ the path taken


def test_reads_and_new_names_take_the_compiled_path(registry: shmreg.Registry) -> None:
    fast = _fast(registry)
    registry.register("jobs", "first", metadata={"type": "w"})  # a new namespace: Python
    before = fast.counts()
    for i in range(200):
        registry.register("jobs", f"w{i}", metadata={"type": "w", "capabilities": ["x"], "i": i})
    for i in range(200):
        assert registry.lookup("jobs", f"w{i}") == os.getpid()
        assert registry.lookup_with_metadata("jobs", f"w{i}") == (
            os.getpid(),
            {"type": "w", "capabilities": ["x"], "i": i},
        )
    after = fast.counts()
    assert after["commits"] - before["commits"] == 200
    assert after["reads"] - before["reads"] == 400
    # The query columns it wrote are the codec's: find uses them to skip decoding.
    assert len(registry.find_by_metadata("jobs", type="w")) == 201
    assert len(registry.find_by_metadata("jobs", capabilities="x")) == 200
    assert _fsck.check(registry.name).problems == []


def test_a_held_name_or_a_full_table_goes_to_python(reg_name: str) -> None:
    with shmreg.Registry.create(reg_name, capacity=8) as reg:
        fast = _fast(reg)
        reg.register("n", "a")
        declined = fast.counts()["declined"]
        reg.register("n", "a", metadata={"again": True})  # same owner: an update
        for i in range(40):  # past the load limit: growth
            reg.register("n", f"g{i}")
        assert fast.counts()["declined"] > declined
        assert reg.get_metadata("n", "a") == {"again": True}
        assert len(reg.list_services("n")) == 41
        assert _fsck.check(reg_name).problems == []
        reg.destroy()


# ------------------------------------------------------------------ mixed processes

_WRITER = r"""
from shmreg._engine import fastpath
name, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
reg = shmreg.Registry.attach(name)
report({"compiled": fastpath.ACTIVE})
for i in range(n):
    reg.register("mix", f"{tag}{i}", metadata={"by": tag, "i": i, "capabilities": [tag]})
    other = "c" if tag == "p" else "p"
    found = reg.lookup_with_metadata("mix", f"{other}{i // 2}")
    if found is not None:
        assert found[1]["by"] == other, found
report({"done": n})
sys.stdin.readline()
"""


def test_processes_with_and_without_it_share_one_registry(registry: shmreg.Registry) -> None:
    n = 400
    kids = {
        "p": _spawn(_WRITER.replace("sys.argv[1], sys.argv[2], int(sys.argv[3])",
                                    f"{registry.name!r}, 'p', {n}"), pure=True),
        "c": _spawn(_WRITER.replace("sys.argv[1], sys.argv[2], int(sys.argv[3])",
                                    f"{registry.name!r}, 'c', {n}")),
    }
    try:
        assert read_line(kids["p"]) == {"compiled": False}
        assert read_line(kids["c"]) == {"compiled": True}
        for kid in kids.values():
            assert read_line(kid) == {"done": n}
        for tag, kid in kids.items():
            for i in range(n):
                assert registry.lookup_with_metadata("mix", f"{tag}{i}") == (
                    kid.pid,
                    {"by": tag, "i": i, "capabilities": [tag]},
                )
            assert len(registry.find_by_metadata("mix", capabilities=tag)) == n
        assert _fsck.check(registry.name).problems == []
        events = [e for e in registry.backend.read_events(0, 10_000)[0] if e.namespace == "mix"]
        assert len(events) == 2 * n  # one per registration, whichever path wrote it
    finally:
        for kid in kids.values():
            if kid.poll() is None:
                send_line(kid, {})
            finish_ok(kid)


# ------------------------------------------------------------------ crash points

_CRASHER = r"""
from shmreg._engine import fastpath
reg = shmreg.Registry.attach(sys.argv[1])
owner = int(sys.argv[2])  # a process that outlives this one: the entry stays readable
reg.register("crash", "warm", pid=owner)  # the namespace is now cached: the next is in C
report({"compiled": fastpath.ACTIVE, "commits": reg.backend._fast.counts()["commits"]})
reg.register("crash", "target", pid=owner, metadata={"x": 1})
report({"survived": True})
"""
COMMIT_POINTS = [p for p in POINTS if p.startswith("commit.")]


@pytest.mark.parametrize("point", ["lock.owner_set", *COMMIT_POINTS])
def test_crash_points_fire_inside_the_compiled_path(registry: shmreg.Registry, point: str) -> None:
    # Hit 1 is the warm-up registration (the Python path: its namespace is not cached yet);
    # hit 2 is the target, inside the C commit.
    proc = run_py(
        _CRASHER, registry.name, str(os.getpid()), env={"SHMREG_CRASH_AT": f"{point}:2"}
    )
    assert read_line(proc) == {"compiled": True, "commits": 0}
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    registry.register("crash", "after")  # the next writer recovers
    # The redo journal's promise: applied exactly when the kill came after it was valid.
    applied = point not in ("lock.owner_set", "commit.staged")
    assert (registry.lookup_with_metadata("crash", "target") == (os.getpid(), {"x": 1})) is applied
    assert _fsck.check(registry.name).problems == []
    kinds = [e.kind for e in registry.backend.read_events(0)[0] if e.service == "target"]
    assert kinds == (["registered"] if applied else [])


# ------------------------------------------------------------------ liveness words

_HOLDER = r"""
reg = shmreg.Registry.attach(sys.argv[1])
reg.register("live", "warm")
reg.register("live", f"p{os.getpid()}")
report({"pid": os.getpid()})
line = sys.stdin.readline()
if line.strip().strip('"') == "close":
    reg.close()
    report({"closed": True})
    sys.stdin.readline()
"""


@contextmanager
def _holder(registry: shmreg.Registry) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """A compiled-path child that registered itself and holds its liveness claim:
    ``(process, pid, start ticks)``, the claim checked as alive; killed at the end."""
    child = _spawn(_HOLDER.replace("sys.argv[1]", repr(registry.name)))
    try:
        pid = read_line(child)["pid"]
        start = shmreg._identity.identity_of(pid).start_ticks  # type: ignore[attr-defined]
        assert _fast(registry).life_verdict(pid, start) == 1
        yield child, pid, start
    finally:
        child.kill()
        child.communicate()


def test_a_death_is_read_from_memory_even_before_the_reaping(registry: shmreg.Registry) -> None:
    fast = _fast(registry)
    with _holder(registry) as (_, pid, start):
        assert registry.lookup("live", f"p{pid}") == pid
        assert registry.count("live") == 2 and len(registry.backend.list_entries("live")) == 2
        os.kill(pid, signal.SIGKILL)
        # Each thread hands its robust mutexes to the kernel as it exits, the holder among
        # the last: the mark lands a moment after the kill, and a moment before the exit
        # ends in a zombie (the child can still read "R" when the mark is seen). It is
        # never reaped here, so it stays a zombie, which kill(pid, 0) would call alive.
        wait_until(lambda: fast.life_verdict(pid, start) == 0, what="the death mark")
        wait_zombie(pid)
        assert fast.life_verdict(pid, start) == 0
        os.kill(pid, 0)  # the kernel's answer for a zombie: it exists
        assert registry.lookup("live", f"p{pid}") is None
        assert registry.lookup_with_metadata("live", f"p{pid}") is None
        # The compiled scans judge owners the same way.
        assert registry.count("live") == 0 and registry.list_services("live") == []
        assert registry.find_by_metadata("live") == []


def test_closing_gives_the_claim_back(registry: shmreg.Registry) -> None:
    with _holder(registry) as (child, pid, start):
        send_line(child, "close")  # a JSON string: the child strips the quotes below
        assert read_line(child) == {"closed": True}
        assert _fast(registry).life_verdict(pid, start) == -1  # unknown: ask the kernel
        assert registry.lookup("live", f"p{pid}") == pid


def test_a_forked_child_claims_its_own_slot(registry: shmreg.Registry) -> None:
    fast = _fast(registry)
    registry.register("fork", "warm")
    registry.register("fork", "parent")
    me = shmreg._identity.self_identity()  # type: ignore[attr-defined]
    assert fast.life_verdict(me.pid, me.start_ticks) == 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            registry.register("fork", "child")
            os.write(w, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
        child = shmreg._identity.identity_of(pid)  # type: ignore[attr-defined]
        assert fast.life_verdict(pid, child.start_ticks) == 1
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert fast.life_verdict(pid, child.start_ticks) == 0
        assert fast.life_verdict(me.pid, me.start_ticks) == 1  # the parent's hold is its own
        assert registry.lookup("fork", "child") is None
        assert registry.lookup("fork", "parent") == me.pid
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_fsck_clears_a_liveness_slot_that_names_a_stranger(registry: shmreg.Registry) -> None:
    from shmreg._engine import liveness

    fast = _fast(registry)
    registry.register("fsck", "warm")
    registry.register("fsck", "me")
    me = shmreg._identity.self_identity()  # type: ignore[attr-defined]
    assert fast.life_verdict(me.pid, me.start_ticks) == 1
    assert _fsck.check(registry.name).problems == []
    # Damage: a claimed slot for a dead pid whose word names a live thread (pid 1's).
    store = registry.backend.store  # type: ignore[attr-defined]
    mine = next(s for s in liveness.slots(store._root.buf) if s.pid == me.pid)
    fake = L.life_home(999_999, store.rq[L.R_LIFE_SLOTS])  # where a reader looks first
    assert fake != mine.slot
    base = L.LIFE_OFFSET + fake * L.LIFE_SLOT_SIZE
    store.rq[base // 8 + L.LIFE_PID] = 999_999
    store.rq[base // 8 + L.LIFE_START] = 7
    store._root.buf[base + L.LIFE_MUTEX_AT : base + L.LIFE_MUTEX_AT + 4] = (1).to_bytes(4, "little")
    assert fast.life_verdict(999_999, 7) == 1  # the lie a reader would believe
    report = _fsck.check(registry.name)
    assert [p for p in report.problems if "liveness slot" in p] == [
        f"liveness slot {fake}: says pid 999999 is alive through thread 1, which is not a "
        "thread of it"
    ]
    repaired = _fsck.check(registry.name, repair=True)
    assert any("liveness slot" in r for r in repaired.repaired)
    assert fast.life_verdict(999_999, 7) == -1
    assert fast.life_verdict(me.pid, me.start_ticks) == 1  # a true claim is left alone
    assert _fsck.check(registry.name).problems == []


# ------------------------------------------------------------------ found by review


def test_a_close_in_another_thread_never_pulls_memory_from_under_a_read(reg_name: str) -> None:
    owner = shmreg.Registry.create(reg_name)
    owner.register("ns", "svc")
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for _ in range(100):
            reader = shmreg.Registry.attach(reg_name)
            stop = threading.Event()

            def spin(reg: shmreg.Registry = reader, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    try:
                        reg.lookup("ns", "svc")
                    except Exception:  # RegistryClosed, or a view released mid-read: no crash
                        pass

            thread = threading.Thread(target=spin)
            thread.start()
            sum(range(2000))
            reader.close()
            stop.set()
            thread.join()
    finally:
        sys.setswitchinterval(old)
        owner.destroy()


def test_register_many_copes_with_a_list_changed_underneath(registry: shmreg.Registry) -> None:
    registry.register("many", "warm")
    me = shmreg._identity.self_identity()  # type: ignore[attr-defined]
    backend = registry.backend
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    registered = 1
    try:
        for rnd in range(5):
            items = [(rnd * 10_000 + i, me, {"type": f"t{rnd}-{i}"}) for i in range(2000)]
            clearer = threading.Thread(target=items.clear)
            clearer.start()
            out = backend.register_many("many", items)  # the list as it was at the call
            clearer.join()
            assert len(out) in (0, 2000)
            registered += len(out)
    finally:
        sys.setswitchinterval(old)
    assert len(registry.list_services("many")) == registered


@pytest.mark.parametrize("owner", [(1,), (1, 2), (1, 2, "", "extra")], ids=["1", "2", "4"])
def test_an_owner_that_is_not_a_triple_is_refused_as_python_refuses_it(
    registry: shmreg.Registry, owner: tuple[Any, ...]
) -> None:
    registry.register("o", "warm")
    with pytest.raises((ValueError, TypeError)):
        registry.backend.register("o", "x", owner, None)
    assert registry.lookup("o", "x") is None


def test_counted_reads_time_only_calls_that_returned() -> None:
    from shmreg import _opmetrics

    stats = _opmetrics.OpStats(_opmetrics.READ_SAMPLE)

    def fails(namespace: str, service: str) -> None:
        raise KeyError(service)

    read = _opmetrics._wrap_read(fails, stats)
    for _ in range(_opmetrics.READ_SAMPLE):
        with pytest.raises(KeyError):
            read("a", "b")
    assert stats.calls == _opmetrics.READ_SAMPLE
    assert sum(stats.buckets) == 0 and stats.sum_ns[0] == 0
    assert stats.errors == {"KeyError": _opmetrics.READ_SAMPLE}


def test_an_uninitialised_fast_object_raises_instead_of_crashing() -> None:
    fast = _speedups.Fast.__new__(_speedups.Fast)
    with pytest.raises(RuntimeError):
        fast.lookup("a", "b")
