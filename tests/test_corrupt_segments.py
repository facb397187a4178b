"""Corrupted segments, one damage at a time: each test writes one known bad value into a
registry's shared memory and asserts what every call, ``fsck`` and ``fsck --repair`` then do.

The random and table-driven fuzzing lives in ``test_fuzz_segments.py``; every bug it found
has a test here, named for the damage it pins (event sequence overflow, counters at their
maximum, an odd slot with no writer, an unaligned arena top, ...). The one tolerated
limitation, a pid-only ``lookup`` trusting a slot's owner word, is pinned here too.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import children, destroying, segments_of

import shmreg
from shmreg import _codec
from shmreg._engine import layout as L
from shmreg._engine.fsck import check
from shmreg._engine.store import destroy_by_name

CHILD_TIMEOUT_S = 60.0

# ----------------------------------------------------------------- explicit corruptions


def _paths(name: str) -> tuple[str, str]:
    root = "/dev/shm/" + L.root_name(name)
    with open(root, "rb") as f:
        words = struct.unpack_from("<32Q", f.read(L.PAGE))
    return root, "/dev/shm/" + L.data_name(name, words[L.R_INCARNATION], words[L.R_GEN])


def _poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[offset : offset + len(data)] = data


def _word(path: str, index: int) -> int:
    with open(path, "rb") as f:
        f.seek(index * 8)
        value: int = struct.unpack("<Q", f.read(8))[0]
    return value


def _set_word(path: str, index: int, value: int) -> None:
    _poke(path, index * 8, struct.pack("<Q", value))


def _slot_of(name: str, namespace: str, service: Any) -> int:
    """Index of the slot holding a key, found by reading the segment as the layout draws it."""
    key = _codec.encode_key(namespace, service)
    key_hash = zlib.crc32(key)
    with open(_paths(name)[1], "rb") as f:
        buf = f.read()
    nslots = struct.unpack_from("<Q", buf, L.D_NSLOTS * 8)[0]
    arena = struct.unpack_from("<Q", buf, L.D_ARENA_OFF * 8)[0]
    i = key_hash % nslots
    for _ in range(nslots):
        w = L.SLOT.unpack_from(buf, L.HEADER_SIZE + i * L.SLOT_SIZE)
        if L.rec_state(w[2]) == L.USED and w[1] & L.LO32 == key_hash:
            off = arena + L.rec_offset(w[2])
            if buf[off : off + L.rec_key_len(w[2])] == key:
                return int(i)
        i = (i + 1) % nslots
    raise KeyError((namespace, service))


def _slot_word(index: int, word: int) -> int:
    return L.HEADER_SIZE // 8 + index * L.SLOT_WORDS + word


NS = "fz"
ENTRIES = {f"s{i}": {"i": i, "type": "worker" if i % 2 else "db"} for i in range(24)}


@contextmanager
def populated(name: str) -> Iterator[None]:
    """A registry of two dozen entries owned by this process, destroyed on the way out."""
    with destroying(name):
        reg = shmreg.Registry.create(name, capacity=32)
        try:
            for service, meta in ENTRIES.items():
                reg.register(NS, service, metadata=meta)
        finally:
            reg.close()
        yield


def _intact_except(name: str, lost: set[str]) -> None:
    """Every entry but ``lost`` reads back exactly; ``lost`` entries read as absent."""
    with shmreg.Registry.attach(name) as reg:
        for service, meta in ENTRIES.items():
            want = None if service in lost else (os.getpid(), meta)
            assert reg.lookup_with_metadata(NS, service) == want, service
        assert set(reg.list_services(NS)) == set(ENTRIES) - lost


def _attach_fails(name: str, error: type[shmreg.ShmregError]) -> shmreg.ShmregError:
    try:
        shmreg.Registry.attach(name)
    except error as exc:
        # Dropped here, not kept by pytest.raises: a traceback kept in a reference cycle is
        # what turns test_bug_failed_attach_leaves_views_for_gc into stderr noise later.
        exc.__traceback__ = None
        return exc
    raise AssertionError(f"attaching {name!r} did not raise {error.__name__}")


def test_bad_root_magic_is_corrupt_and_destroy_by_name_removes_it(reg_name: str) -> None:
    with populated(reg_name):
        root, _ = _paths(reg_name)
        _set_word(root, L.R_MAGIC, int.from_bytes(b"NOTSHMRG", "little"))
        _attach_fails(reg_name, shmreg.CorruptRegistry)
        with pytest.raises(shmreg.CorruptRegistry):
            shmreg.Registry(reg_name)  # attach-or-create must not paper over it either
        report = check(reg_name, repair=True)
        assert not report.ok and report.problems[0].startswith("cannot open")
        assert destroy_by_name(reg_name) is True
        assert segments_of(reg_name) == []


def test_layout_version_change_is_incompatible_naming_both_values(reg_name: str) -> None:
    with populated(reg_name):
        root, _ = _paths(reg_name)
        _set_word(root, L.R_VERSION, 77)
        error = _attach_fails(reg_name, shmreg.IncompatibleRegistry)
        assert (error.expected, error.actual) == (L.LAYOUT_VERSION, 77)
        assert "77" in str(error) and str(L.LAYOUT_VERSION) in str(error)
        assert destroy_by_name(reg_name) is True
        assert segments_of(reg_name) == []


@pytest.mark.parametrize(
    ("word", "value"),
    [
        pytest.param(L.D_NSLOTS, 2**40, id="slot-count-huge"),
        pytest.param(L.D_NSLOTS, 2**64 - 1, id="slot-count-max"),
        pytest.param(L.D_NSLOTS, 0, id="slot-count-zero"),
        pytest.param(L.D_ARENA_OFF, 2**62, id="arena-offset-huge"),
        pytest.param(L.D_ARENA_OFF, 64, id="arena-offset-inside-slots"),
        pytest.param(L.D_ARENA_SIZE, 2**63, id="arena-size-huge"),
        pytest.param(L.D_ARENA_SIZE, 2**64 - 1, id="arena-size-max"),
        pytest.param(L.D_MAGIC, 0, id="data-magic"),
    ],
)
def test_data_header_out_of_bounds_is_corrupt(reg_name: str, word: int, value: int) -> None:
    with populated(reg_name):
        _set_word(_paths(reg_name)[1], word, value)
        _attach_fails(reg_name, shmreg.CorruptRegistry)
        assert not check(reg_name).ok
        assert destroy_by_name(reg_name) is True
        assert segments_of(reg_name) == []


def test_record_checksum_flip_is_corrupt_on_read_and_repaired(reg_name: str) -> None:
    with populated(reg_name):
        index = _slot_of(reg_name, NS, "s5")
        data = _paths(reg_name)[1]
        word = _slot_word(index, L.S_OWNER)
        _set_word(data, word, _word(data, word) ^ (1 << 40))  # a bit of the record crc32
        with shmreg.Registry.attach(reg_name) as reg:
            with pytest.raises(shmreg.CorruptRegistry):
                reg.lookup_with_metadata(NS, "s5")
            with pytest.raises(shmreg.CorruptRegistry):
                reg.get_metadata(NS, "s5")
            assert reg.lookup_with_metadata(NS, "s6") == (os.getpid(), ENTRIES["s6"])
        report = check(reg_name)
        assert not report.ok
        assert any("checksum" in p for p in report.problems), report.problems
        repaired = check(reg_name, repair=True)
        assert any("s5" in r or "checksum" in r for r in repaired.repaired), repaired
        assert check(reg_name).ok
        _intact_except(reg_name, {"s5"})


def test_metadata_bytes_flipped_in_the_arena_are_corrupt_not_torn(reg_name: str) -> None:
    with populated(reg_name):
        index = _slot_of(reg_name, NS, "s7")
        data = _paths(reg_name)[1]
        w2 = _word(data, _slot_word(index, L.S_REC))
        arena = _word(data, L.D_ARENA_OFF)
        last = (
            arena
            + L.rec_offset(w2)
            + L.rec_key_len(w2)
            + (_word(data, _slot_word(index, L.S_META)) & L.LO32)
            - 1
        )
        with open(data, "rb") as f:
            f.seek(last)
            byte = f.read(1)[0]
        _poke(data, last, bytes([byte ^ 0x01]))  # the metadata's last byte: "i": 7 -> 6
        with shmreg.Registry.attach(reg_name) as reg:
            with pytest.raises(shmreg.CorruptRegistry):
                reg.lookup_with_metadata(NS, "s7")
            # Scans degrade: the damaged entry is left out, the others are returned.
            intact = {k: v for k, v in ENTRIES.items() if k != "s7"}
            assert reg.list_services_with_metadata(NS) == intact
        check(reg_name, repair=True)
        assert check(reg_name).ok
        _intact_except(reg_name, {"s7"})


def test_odd_slot_sequence_with_no_writer_does_not_hang_reads(reg_name: str) -> None:
    with populated(reg_name):
        data = _paths(reg_name)[1]
        index = _slot_of(reg_name, NS, "s3")
        seq = _slot_word(index, L.S_SEQ)
        _set_word(data, seq, _word(data, seq) | 1)  # "being written", by nobody
        with shmreg.Registry.attach(reg_name) as reg:
            # The read finds the slot stuck, takes the lock and tombstones it: no hang.
            assert reg.lookup(NS, "s3") is None
            assert reg.lookup_with_metadata(NS, "s4") == (os.getpid(), ENTRIES["s4"])
            assert reg.count(NS) == len(ENTRIES) - 1
        assert _word(data, seq) & 1 == 0
        report = check(reg_name)
        assert report.ok, report.problems
        _intact_except(reg_name, {"s3"})


def test_journal_marked_valid_with_bad_checksum_is_discarded(reg_name: str) -> None:
    with populated(reg_name), children() as kids:
        dead = kids.add(subprocess.Popen(["true"]))
        dead.wait()
        root, data = _paths(reg_name)
        # A forged journal for slot 0 (image with a USED state), valid flag, wrong crc,
        # and a dead writer still named as the lock's owner: recovery must run and drop it.
        _set_word(data, L.J_SLOT, _slot_of(reg_name, NS, "s1"))
        _set_word(data, L.J_IMG, 2)
        _set_word(data, L.J_IMG + 2, L.pack_rec(0, 3, L.TOMB))
        _set_word(data, L.J_CRC, 0xDEADBEEF)
        _set_word(data, L.J_STATE, L.J_VALID)
        _set_word(root, L.R_OWNER_PID, dead.pid)
        events = _word(root, L.R_EVENT_SEQ)
        report = check(reg_name)
        assert any("journal" in p for p in report.problems), report.problems
        with shmreg.Registry.attach(reg_name) as reg:
            reg.register(NS, "after", metadata={"n": 1})  # the next writer recovers first
            assert _word(data, L.J_STATE) == 0
            assert _word(root, L.R_OWNER_PID) == 0
            assert _word(root, L.R_EVENT_SEQ) == events + 1  # ours only: nothing replayed
            assert reg.unregister(NS, "after") is True
        assert check(reg_name).ok
        _intact_except(reg_name, set())


def test_ring_corruption_never_reaches_lookups(reg_name: str) -> None:
    with populated(reg_name):
        root, _ = _paths(reg_name)
        _poke(root, L.RING_OFFSET, os.urandom(64 * L.EVENT_SIZE))
        with shmreg.Registry.attach(reg_name) as reg:
            events = list(reg.watch(since=0, timeout=0))
            assert all(isinstance(e.seq, int) for e in events)
        _intact_except(reg_name, set())
        assert check(reg_name).ok


# ------------------------------------------------------------ bugs the fuzzing found


def test_event_sequence_word_overflows_writes(reg_name: str) -> None:
    with populated(reg_name):
        root, _ = _paths(reg_name)
        _set_word(root, L.R_EVENT_SEQ, 2**63)
        with shmreg.Registry.attach(reg_name) as reg:
            _succeeds_or_corrupt(lambda: reg.register(NS, "new"))
            check(reg_name, repair=True)
            reg.register(NS, "after-repair")
            assert reg.lookup(NS, "after-repair") == os.getpid()


@pytest.mark.parametrize(
    ("segment", "word", "call"),
    [
        pytest.param("data", L.D_OPS, "register", id="ops-register"),
        pytest.param("data", L.D_GARBAGE, "update", id="garbage-update"),
        pytest.param("data", L.D_NAMEGEN, "register", id="owner-changes-register"),
        pytest.param("root", L.R_SWEEPS, "sweep", id="sweeps-sweep"),
    ],
)
def test_counter_words_at_max_break_writes_and_sweep(
    reg_name: str, segment: str, word: int, call: str
) -> None:
    with populated(reg_name):
        root, data = _paths(reg_name)
        _set_word(root if segment == "root" else data, word, 2**64 - 1)
        with shmreg.Registry.attach(reg_name) as reg:
            # A clean refusal is CorruptRegistry; a struct.error or ValueError was the bug.
            if call == "register":
                outcome = _succeeds_or_corrupt(lambda: reg.register(NS, "new"))
            elif call == "update":
                outcome = _succeeds_or_corrupt(lambda: reg.update_metadata(NS, "s1", {"x": 1}))
            else:
                outcome = _succeeds_or_corrupt(reg.sweep)
        report = check(reg_name, repair=True)
        assert check(reg_name).ok, report
        with shmreg.Registry.attach(reg_name) as reg:  # writable again, nothing lost
            reg.register(NS, "after-repair")
            assert reg.unregister(NS, "after-repair") is True
            if outcome == "ok" and call == "register":
                assert reg.unregister(NS, "new") is True
            if outcome == "ok" and call == "update":
                reg.update_metadata(NS, "s1", ENTRIES["s1"])
        _intact_except(reg_name, set())


def _succeeds_or_corrupt(call: Any) -> str:
    """Run ``call``: "ok", or "corrupt" if it raised CorruptRegistry (anything else fails)."""
    try:
        call()
    except shmreg.CorruptRegistry:
        return "corrupt"
    return "ok"


@pytest.mark.parametrize(
    ("segment", "word", "value"),
    [
        pytest.param("data", L.D_TOP, 2**63, id="arena-top-overflow"),
        pytest.param("data", L.D_TOP, 2**40 + 3, id="arena-top-unaligned"),
        pytest.param("data", L.D_LIVE, 2**63, id="live-overflow"),
        pytest.param("root", L.R_CAPACITY, 2**62, id="root-capacity-overflow"),
    ],
)
def test_huge_counters_make_rebuild_and_repair_crash(
    reg_name: str, segment: str, word: int, value: int
) -> None:
    with populated(reg_name):
        root, data = _paths(reg_name)
        _set_word(root if segment == "root" else data, word, value)
        def grow() -> None:
            with shmreg.Registry.attach(reg_name) as reg:
                # enough new names that the table must grow, whatever the counters say
                reg.register_many(NS, [(f"new-{i}", None, None) for i in range(16)])

        _succeeds_or_corrupt(grow)  # CorruptRegistry on attach or write: detected
        try:
            check(reg_name, repair=True)
        except shmreg.CorruptRegistry:
            return  # "beyond repair", said cleanly, would be acceptable
        assert check(reg_name).ok


@pytest.mark.parametrize("repair", [False, True], ids=["check", "repair"])
def test_fsck_on_odd_slot_raises_stuckslot(reg_name: str, repair: bool) -> None:
    with populated(reg_name):
        data = _paths(reg_name)[1]
        with open(data, "rb") as f:
            nslots = struct.unpack("<Q", f.read(24)[16:24])[0]
        # A key that sits past its home slot: its probe path crosses the home slot, which
        # is made odd (the keys are fixed, so so is the choice).
        for service in ENTRIES:
            home = zlib.crc32(_codec.encode_key(NS, service)) % nslots
            if _slot_of(reg_name, NS, service) != home:
                break
        else:
            pytest.fail("no key sits past its home slot")
        seq = _slot_word(home, L.S_SEQ)
        _set_word(data, seq, _word(data, seq) | 1)
        report = check(reg_name, repair=repair)
        assert repair or not report.ok
        if repair:
            assert check(reg_name).ok


def test_destroy_by_name_leaves_a_registry_marked_destroyed(reg_name: str) -> None:
    with populated(reg_name):
        root, _ = _paths(reg_name)
        _set_word(root, L.R_GEN, L.DESTROYED)
        _attach_fails(reg_name, shmreg.RegistryDestroyed)
        destroy_by_name(reg_name)
        assert segments_of(reg_name) == []


@pytest.mark.parametrize("call", ["lookup", "register"])
def test_slot_sequence_word_at_max_breaks_recovery(reg_name: str, call: str) -> None:
    with populated(reg_name):
        data = _paths(reg_name)[1]
        _set_word(data, _slot_word(_slot_of(reg_name, NS, "s3"), L.S_SEQ), 2**64 - 1)
        with shmreg.Registry.attach(reg_name) as reg:
            if call == "lookup":
                _succeeds_or_corrupt(lambda: reg.lookup(NS, "s3"))
                assert reg.lookup(NS, "s3") is None  # recovered: the stuck slot is gone
            else:
                _succeeds_or_corrupt(lambda: reg.register(NS, "s3"))
        check(reg_name, repair=True)
        assert check(reg_name).ok


ATTACH_CORRUPT = r"""
import gc, sys, shmreg

def attach():
    try:
        shmreg.Registry.attach(sys.argv[1])
    except shmreg.CorruptRegistry as exc:
        kept = exc  # as a logger or pytest.raises would: the traceback is now in a cycle
        return str(kept)

attach()
gc.collect()
report({"done": True})
"""


def test_failed_attach_leaves_views_for_gc(reg_name: str) -> None:
    with populated(reg_name), children() as kids:
        _set_word(_paths(reg_name)[1], L.D_MAGIC, 0)
        proc = kids.py(ATTACH_CORRUPT, reg_name)
        _, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
        assert proc.returncode == 0, err
        assert "BufferError" not in err, err


def test_data_header_magic_flip_is_not_repairable(reg_name: str) -> None:
    with populated(reg_name):
        data = _paths(reg_name)[1]
        _set_word(data, L.D_MAGIC, L.DATA_MAGIC ^ 1)
        check(reg_name, repair=True)
        assert check(reg_name).ok
        _intact_except(reg_name, set())


def test_owner_pid_word_is_not_checksummed(reg_name: str) -> None:
    with populated(reg_name), children() as kids:
        stranger = kids.sleeper(600)
        data = _paths(reg_name)[1]
        word = _slot_word(_slot_of(reg_name, NS, "s2"), L.S_OWNER)
        _set_word(data, word, (_word(data, word) & ~L.LO32) | stranger.pid)
        with shmreg.Registry.attach(reg_name) as reg:
            # lookup() trusts the owner word (checking it would cost a record copy per
            # lookup); every read that copies the record checks it, owner included.
            with pytest.raises(shmreg.CorruptRegistry):
                reg.lookup_with_metadata(NS, "s2")
            assert "s2" not in reg.list_services_with_metadata(NS)  # scans skip it
            assert reg.health_check().damaged == 1
        assert not check(reg_name).ok


def test_data_generation_word_at_max_breaks_repair(reg_name: str) -> None:
    with populated(reg_name):
        data = _paths(reg_name)[1]
        _set_word(data, L.D_GEN, 2**64 - 1)
        try:
            check(reg_name, repair=True)
        except shmreg.CorruptRegistry:
            return
        with shmreg.Registry.attach(reg_name) as reg:
            reg.register(NS, "after-repair")
        assert check(reg_name).ok


def test_unaligned_arena_top_stops_writes_instead_of_losing_them(reg_name: str) -> None:
    """A flipped low bit of the arena top made the next record overlap the previous one: the
    register was acknowledged, then update_metadata said NotRegistered."""
    with populated(reg_name):
        data = _paths(reg_name)[1]
        _set_word(data, L.D_TOP, _word(data, L.D_TOP) ^ 4)
        with shmreg.Registry.attach(reg_name) as reg, pytest.raises(shmreg.CorruptRegistry):
            reg.register(NS, "new", metadata={"n": 1})
        check(reg_name, repair=True)
        assert check(reg_name).ok
        with shmreg.Registry.attach(reg_name) as reg:
            reg.register(NS, "new", metadata={"n": 1})
            reg.update_metadata(NS, "new", {"n": 2})
            assert reg.get_metadata(NS, "new") == {"n": 2}
            assert reg.unregister(NS, "new") is True
        _intact_except(reg_name, set())
