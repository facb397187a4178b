"""The hash table over one data segment: probing, validated reads, journaled writes.

Readers take no lock. A slot is read as: sequence word, the slot copied out, the sequence word
again; an odd or changed word means a writer was inside, so the read is retried. Record
bytes (key and metadata) are only ever appended to the arena and never rewritten in place,
so bytes referenced by a validated slot cannot change underneath the reader.

Writers hold the writer lock and change exactly one slot per operation:

1. stage the new record above ``arena top`` (unreferenced, so a crash here is harmless);
2. write the redo journal (slot index, new slot image, new counters, the event to append),
   its VALID word last with a single store;
3. apply: slot seq odd, slot words, counters, slot seq even (the publish point);
4. append the event to the ring in the root segment;
5. retire the journal.

Every change is journaled, inserts included: the event must appear exactly when the change
does, and only the journal lets recovery finish both or neither.

Recovery, run by the next writer when it finds the previous one died holding the lock,
replays a valid journal (idempotent: image, counters and event are absolute values), then
tombstones any other odd slot and recounts. Sequence words are written with one 8-byte store
(``cast('Q')[i] = v``): ``struct.pack_into`` zero-fills its target first, and a reader could
see that zero as a stable even sequence.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from shmreg._engine import layout as L
from shmreg._engine.crashpoints import ARMED, crash_point
from shmreg._engine.events import Ring
from shmreg._errors import CorruptRegistry

SlotWords = tuple[int, int, int, int, int, int, int, int]
_COUNTERS = struct.Struct("<6Q")  # data header words 5..10, in COUNTER_WORDS order
_crc32 = zlib.crc32
_time_ns = time.time_ns
_MASK64 = 2**64 - 1
# Operation, owner-change and event counters stay below this (the journal packs an event
# number into 48 bits); at a million writes a second it lasts nine years... times 30.
COUNTER_LIMIT = 2**48
_SPINS_BEFORE_YIELD = 64
_STUCK_AFTER_S = 0.010


class StuckSlot(Exception):
    """A slot stayed odd longer than any live writer keeps it: its writer may have died."""


class Table:
    """A view of one data generation. Not thread-safe for writes: callers hold the lock."""

    def __init__(self, shm: SharedMemory, registry: str, events: Ring) -> None:
        self.shm = shm
        self.registry = registry
        self.events = events  # the root's event ring: every commit appends to it
        buf = shm.buf
        if buf is None or len(buf) < L.HEADER_SIZE:
            raise CorruptRegistry(
                f"registry {registry!r}: data segment too small",
                name=registry,
                detail="data segment too small",
            )
        self.buf: memoryview = buf
        self.q: memoryview = buf.cast("Q")
        q = self.q
        if q[L.D_MAGIC] != L.DATA_MAGIC:
            self._corrupt("data segment has a bad magic word")
        self.gen = q[L.D_GEN]
        self.nslots = q[L.D_NSLOTS]
        self.arena_off = q[L.D_ARENA_OFF]
        self.arena_size = q[L.D_ARENA_SIZE]
        if (
            self.nslots < 1
            or self.arena_off < L.arena_offset(self.nslots)
            or self.arena_off + self.arena_size > len(buf)
        ):
            self._corrupt(
                f"data header out of bounds (slots {self.nslots}, arena {self.arena_off}"
                f"+{self.arena_size}, segment {len(buf)})"
            )
        self.slot_word0 = L.HEADER_SIZE // 8
        self.fill_limit = L.MAX_LOAD * self.nslots  # rebuild before passing this
        self._columns: npt.NDArray[np.uint64] | None = None

    def _corrupt(self, detail: str) -> NoReturn:
        raise CorruptRegistry(
            f"registry {self.registry!r}: {detail}", name=self.registry, detail=detail
        )

    @staticmethod
    def initialise(
        shm: SharedMemory,
        gen: int,
        nslots: int,
        arena_size: int,
        counters: tuple[int, ...] = (0, 0, 0, 0, 0, 0),
    ) -> None:
        """Write a fresh header into a new, zero-filled segment (not yet visible to anyone)."""
        assert shm.buf is not None
        q = shm.buf.cast("Q")
        try:
            q[L.D_GEN] = gen
            q[L.D_NSLOTS] = nslots
            q[L.D_ARENA_OFF] = L.arena_offset(nslots)
            q[L.D_ARENA_SIZE] = arena_size
            for word, value in zip(L.COUNTER_WORDS, counters, strict=True):
                q[word] = value
            q[L.D_MAGIC] = L.DATA_MAGIC
        finally:
            q.release()

    def release(self) -> None:
        """Drop every view into the segment so it can be unmapped."""
        self._columns = None
        self.q.release()
        self.buf = memoryview(b"")

    # ------------------------------------------------------------------------ counters

    def counter(self, word: int) -> int:
        value: int = self.q[word]
        return value

    def counters(self) -> tuple[int, int, int, int, int, int]:
        """(arena top, live, tombstones, garbage bytes, ops, owner changes), checked.

        Writers derive the next values from these; a value no writer could have produced
        (a flipped bit) must stop the write with CorruptRegistry, not overflow a field.
        """
        counters: tuple[int, int, int, int, int, int] = _COUNTERS.unpack_from(self.buf, 40)
        top, live, tombs, garbage, ops, owners = counters
        if (
            top > self.arena_size
            or top % 8  # records start on 8-byte boundaries: the slot stores top // 8
            or live + tombs > self.nslots
            or garbage > top
            or ops >= COUNTER_LIMIT
            or owners >= COUNTER_LIMIT
        ):
            self._corrupt(f"counters out of range {counters} (run shmreg fsck --repair)")
        return counters

    # --------------------------------------------------------------------------- reads

    def read_slot(self, index: int) -> SlotWords:
        """Seqlock-validated copy of one slot's words."""
        q = self.q
        w = self.slot_word0 + index * L.SLOT_WORDS
        unpack = L.SLOT.unpack_from
        buf = self.buf
        spins = 0
        started = 0.0
        while True:
            s1 = q[w]
            words: SlotWords = unpack(buf, w * 8)
            if not s1 & 1 and q[w] == s1:
                return words
            spins += 1
            if spins >= _SPINS_BEFORE_YIELD:
                now = time.monotonic()
                if not started:
                    started = now
                elif now - started > _STUCK_AFTER_S:
                    raise StuckSlot(index)
                time.sleep(0)

    def find(self, key: bytes, key_hash: int) -> tuple[int, SlotWords | None]:
        """Lock-free probe: ``(index, words)`` of the used slot holding ``key``, or (-1, None)."""
        # The hottest loop in shmreg: the seqlock read of ``read_slot`` is inlined, and the
        # method is only called when a slot is being written (odd or changed sequence).
        n = self.nslots
        buf = self.buf
        q = self.q
        unpack = L.SLOT.unpack_from
        arena = self.arena_off
        key_len = len(key)
        i = key_hash % n
        w0 = self.slot_word0
        for _ in range(n):
            w = w0 + i * 8
            s1 = q[w]
            words: SlotWords = unpack(buf, w * 8)
            if s1 & 1 or q[w] != s1:
                words = self.read_slot(i)
            w2 = words[2]
            if w2 >> 48 == L.EMPTY:
                return -1, None
            if w2 >> 48 == L.USED and (words[1] & 0xFFFFFFFF) == key_hash:
                off = arena + (w2 & 0xFFFFFFFF) * 8
                if (w2 >> 32) & 0xFFFF == key_len and buf[off : off + key_len] == key:
                    return i, words
            i += 1
            if i == n:
                i = 0
        return -1, None

    def probe_for_write(self, key: bytes, key_hash: int) -> tuple[int, SlotWords | None, int, bool]:
        """Under the lock: ``(index or -1, words, first reusable slot, it is a tombstone)``."""
        n = self.nslots
        buf = self.buf
        arena = self.arena_off
        key_len = len(key)
        i = key_hash % n
        first_free = -1
        unpack = L.SLOT.unpack_from
        base = self.slot_word0 * 8
        for _ in range(n):
            words: SlotWords = unpack(buf, base + i * L.SLOT_SIZE)
            w2 = words[2]
            state = (w2 >> 48) & 0xFF
            if state == L.EMPTY:
                return -1, None, (i if first_free < 0 else first_free), first_free >= 0
            if state == L.TOMB:
                if first_free < 0:
                    first_free = i
            elif (words[1] & 0xFFFFFFFF) == key_hash:
                off = arena + (w2 & 0xFFFFFFFF) * 8
                if (w2 >> 32) & 0xFFFF == key_len and buf[off : off + key_len] == key:
                    return i, words, first_free, first_free >= 0
            i += 1
            if i == n:
                i = 0
        return -1, None, first_free, first_free >= 0

    def record_bytes(self, words: SlotWords) -> tuple[bytes, bytes]:
        """Copies of (key bytes, metadata bytes) of a validated slot, bounds-checked."""
        w2 = words[2]
        off = self.arena_off + (w2 & 0xFFFFFFFF) * 8
        key_len = (w2 >> 32) & 0xFFFF
        meta_len = words[3] & 0xFFFFFFFF
        end = off + key_len + meta_len
        if end > self.arena_off + self.arena_size:
            self._corrupt(f"record at {off} runs past the arena")
        raw = bytes(self.buf[off:end])
        if _crc32(raw, L.record_seed(words[4] & 0xFFFFFFFF, words[5])) != words[4] >> 32:
            self._corrupt(f"record at {off} fails its checksum")
        return raw[:key_len], raw[key_len:]

    def meta_bytes(self, words: SlotWords) -> bytes:
        w2 = words[2]
        off = self.arena_off + (w2 & 0xFFFFFFFF) * 8 + ((w2 >> 32) & 0xFFFF)
        end = off + (words[3] & 0xFFFFFFFF)
        if end > self.arena_off + self.arena_size:
            self._corrupt(f"record at {off} runs past the arena")
        return bytes(self.buf[off:end])

    def columns(self) -> npt.NDArray[np.uint64]:
        """All slots as an ``(nslots, 8)`` uint64 array: a live view, for candidate scans only."""
        if self._columns is None:
            self._columns = np.frombuffer(
                self.buf, dtype=np.uint64, count=self.nslots * L.SLOT_WORDS, offset=L.HEADER_SIZE
            ).reshape(self.nslots, L.SLOT_WORDS)
        return self._columns

    def used_indices(self) -> npt.NDArray[np.intp]:
        states = (self.columns()[:, L.S_REC] >> np.uint64(48)) & np.uint64(0xFF)
        return np.flatnonzero(states == L.USED)

    def iter_used(self) -> Iterator[tuple[int, SlotWords]]:
        """Validated words of every used slot (a slot may change after it is yielded)."""
        for index in self.used_indices().tolist():
            words = self.read_slot(index)
            if (words[2] >> 48) & 0xFF == L.USED:
                yield index, words

    # -------------------------------------------------------------------------- writes

    def stage(self, record: bytes, top: int) -> int:
        """Copy a record above arena ``top``; return its offset. Caller checked the room."""
        end = top + len(record)
        allocated = self.q[L.D_ALLOCATED]
        if end > allocated:
            from shmreg._engine.segment import allocate

            grow_to = min(self.arena_size, max(end, allocated + L.ARENA_CHUNK))
            allocate(self.shm, self.arena_off + allocated, grow_to - allocated, self.registry)
            self.q[L.D_ALLOCATED] = grow_to
        start = self.arena_off + top
        self.buf[start : start + len(record)] = record
        return top

    def room_for(self, nbytes: int) -> bool:
        return bool(self.q[L.D_TOP] + nbytes <= self.arena_size)

    def commit(
        self,
        index: int,
        body: tuple[int, ...],
        counters: tuple[int, ...],
        kind: int,
        reason: int = 0,
        key: bytes | None = None,
    ) -> None:
        """Publish one slot change and its event (see the module docstring).

        ``key`` saves reading the key back from the arena when the caller has it."""
        q = self.q
        w = self.slot_word0 + index * L.SLOT_WORDS
        target = ((q[w] | 1) + 1) & _MASK64
        seq = self.events.q[L.R_EVENT_SEQ] + 1
        if seq >= COUNTER_LIMIT:
            self._corrupt("event sequence out of range (run shmreg fsck --repair)")
        event = kind | (reason << 8) | (seq << 16)
        now = _time_ns()
        record = L.JOURNAL_BODY.pack(index, target, *body, *counters, event, now)
        if ARMED:
            crash_point("commit.staged")
        self.buf[L.J_SLOT * 8 : L.J_SLOT * 8 + L.JOURNAL_BODY.size] = record
        q[L.J_CRC] = _crc32(record)
        q[L.J_STATE] = L.J_VALID
        if ARMED:
            crash_point("commit.journal_valid")
        self._apply(w, target, body, counters)
        if ARMED:
            crash_point("commit.published")
        self._emit(body, event, now, key)
        if ARMED:
            crash_point("commit.event_written")
        q[L.J_STATE] = 0
        if ARMED:
            crash_point("commit.journal_retired")

    def _apply(
        self,
        w: int,
        target: int,
        body: tuple[int, ...] | list[int],
        counters: tuple[int, ...] | list[int],
    ) -> None:
        q = self.q
        q[w] = (target - 1) & _MASK64  # odd: readers retry
        if ARMED:
            crash_point("commit.slot_odd")
        L.SLOT_BODY.pack_into(self.buf, w * 8 + 8, *body)
        if ARMED:
            crash_point("commit.slot_words")
        # One 8-byte store per counter (never pack_into: it zero-fills first, and a
        # concurrent stats() would read the zeros). Unrolled: this runs on every write.
        q[5], q[6], q[7], q[8], q[9], q[10] = counters
        if ARMED:
            crash_point("commit.counters")
        q[w] = target

    def _emit(
        self,
        body: tuple[int, ...] | list[int],
        event: int,
        time_ns: int,
        key: bytes | None = None,
    ) -> None:
        """Append the operation's event to the ring; idempotent, so recovery can redo it."""
        if key is None:
            w2 = body[1]
            off = self.arena_off + (w2 & 0xFFFFFFFF) * 8
            key = bytes(self.buf[off : off + ((w2 >> 32) & 0xFFFF)])
        seq = event >> 16
        events = self.events
        events.write(
            seq,
            event & 0xFF,
            (event >> 8) & 0xFF,
            key,
            body[3] & 0xFFFFFFFF,
            body[5],
            body[4],
            time_ns,
        )
        if events.q[L.R_EVENT_SEQ] < seq:
            events.q[L.R_EVENT_SEQ] = seq

    def recover(self) -> list[str]:
        """Repair after a writer died inside; return what was done, for logs and fsck."""
        q = self.q
        notes: list[str] = []
        if q[L.J_STATE] == L.J_VALID:
            start = L.J_SLOT * 8
            journal = bytes(self.buf[start : start + L.JOURNAL_BODY.size])
            fields = L.JOURNAL_BODY.unpack(journal)
            index, target = fields[0], fields[1]
            if _crc32(journal) == q[L.J_CRC] and index < self.nslots and not target & 1:
                self._apply(
                    self.slot_word0 + index * L.SLOT_WORDS, target, fields[2:9], fields[9:15]
                )
                self._emit(fields[2:9], fields[15], fields[16])
                if ARMED:
                    crash_point("recover.replayed")
                notes.append(f"replayed the journal for slot {index}")
            else:
                notes.append("discarded a journal that failed its checksum")
            q[L.J_STATE] = 0
        cols = self.columns()
        for index in np.flatnonzero(cols[:, L.S_SEQ] & np.uint64(1)).tolist():
            w = self.slot_word0 + index * L.SLOT_WORDS
            words = list(L.SLOT.unpack_from(self.buf, w * 8))
            words[2] = (words[2] & ~(0xFF << 48)) | (L.TOMB << 48)
            q[w + L.S_REC] = words[2]
            q[w] = (words[0] + 1) & _MASK64
            notes.append(f"tombstoned half-written slot {index}")
        if ARMED:
            crash_point("recover.tombstoned")
        states = (cols[:, L.S_REC] >> np.uint64(48)) & np.uint64(0xFF)
        live = int(np.count_nonzero(states == L.USED))
        tombs = int(np.count_nonzero(states == L.TOMB))
        if live != q[L.D_LIVE] or tombs != q[L.D_TOMBS]:
            notes.append(
                f"recounted: live {q[L.D_LIVE]} -> {live}, tombs {q[L.D_TOMBS]} -> {tombs}"
            )
            q[L.D_LIVE] = live
            q[L.D_TOMBS] = tombs
        return notes

    def live_footprint(self) -> tuple[int, int]:
        """(used slots, arena bytes their records need): counted, not read from counters."""
        cols = self.columns()
        used = (cols[:, L.S_REC] >> np.uint64(48)) == L.USED
        lens = ((cols[used, L.S_REC] >> np.uint64(32)) & np.uint64(0xFFFF)) + (
            cols[used, L.S_META] & np.uint64(0xFFFFFFFF)
        )
        padded = (lens + np.uint64(L.RECORD_ALIGN - 1)) // np.uint64(L.RECORD_ALIGN)
        return int(np.count_nonzero(used)), int(padded.sum()) * L.RECORD_ALIGN

    def copy_live_into(self, dest: Table) -> None:
        """Rebuild: every used slot and its record into an empty table (compacts the arena).

        Works from the slots alone, so it also serves ``fsck --repair`` on a table whose
        counters were damaged: counts are recounted, counters out of range restarted.
        """
        top = 0
        n = dest.nslots
        dbuf = dest.buf
        dq = dest.q
        unpack = L.SLOT.unpack_from
        pack = L.SLOT.pack_into
        src = self.buf
        base = self.slot_word0 * 8
        dbase = dest.slot_word0 * 8
        arena, darena = self.arena_off, dest.arena_off
        arena_end = arena + self.arena_size
        taken = np.zeros(n, dtype=bool)
        indices = self.used_indices().tolist()
        _, need = self.live_footprint()
        if need > dest.arena_size or len(indices) >= n:
            raise ValueError("rebuild target too small")
        from shmreg._engine.segment import allocate

        allocate(dest.shm, darena, max(need, 1), dest.registry)
        dq[L.D_ALLOCATED] = max(need, 1)
        newest = 0
        for index in indices:
            w = unpack(src, base + index * L.SLOT_SIZE)
            w2 = w[2]
            off = arena + (w2 & 0xFFFFFFFF) * 8
            length = ((w2 >> 32) & 0xFFFF) + (w[3] & 0xFFFFFFFF)
            if off + length > arena_end:
                self._corrupt(f"slot {index}: record runs past the arena")
            dbuf[darena + top : darena + top + length] = src[off : off + length]
            slot = (w[1] & 0xFFFFFFFF) % n
            while taken[slot]:
                slot += 1
                if slot == n:
                    slot = 0
            taken[slot] = True
            new_w2 = (w2 & ~0xFFFFFFFF) | (top // 8)
            pack(dbuf, dbase + slot * L.SLOT_SIZE, 2, w[1], new_w2, *w[3:])
            top += L.align_record(length)
            if w[6] < COUNTER_LIMIT:
                newest = max(newest, w[6])
        ops, owners = self.q[L.D_OPS], self.q[L.D_NAMEGEN]
        ops = ops if ops < COUNTER_LIMIT else 0
        # Fencing tokens must keep growing: never below a generation already handed out.
        owners = max(owners if owners < COUNTER_LIMIT else 0, newest)
        counters = (top, len(indices), 0, 0, ops, owners)
        for word, value in zip(L.COUNTER_WORDS, counters, strict=True):
            dq[word] = value

    def describe(self) -> dict[str, Any]:
        # Read without the lock (stats): unchecked, a torn mix of counters must not be
        # mistaken for damage. Writers use counters(), which checks.
        top, live, tombs, garbage, ops, namegen = _COUNTERS.unpack_from(self.buf, 40)
        return {
            "generation": self.gen,
            "slots": self.nslots,
            "live": live,
            "tombstones": tombs,
            "arena_size": self.arena_size,
            "arena_top": top,
            "garbage_bytes": garbage,
            "ops": ops,
            "owner_changes": namegen,
            "allocated": self.counter(L.D_ALLOCATED),
        }
