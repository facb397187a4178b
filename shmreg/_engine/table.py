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

import os
import time
import zlib
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from shmreg._engine import layout as L
from shmreg._engine.crashpoints import ARMED, crash_point
from shmreg._engine.events import NO_REASON, UNREGISTERED, Ring
from shmreg._errors import CorruptRegistry

SlotWords = tuple[int, int, int, int, int, int, int, int]
_crc32 = zlib.crc32
_time_ns = time.time_ns
_MASK64 = L.MASK64
# Operation, owner-change and event counters stay below this (the journal packs an event
# number into 48 bits); at a million writes a second it lasts nine years... times 30.
COUNTER_LIMIT = L.COUNTER_LIMIT
# Slot word numbers and field shifts, bound once for the probe loops below.
_S_HASH, _S_REC, _S_OWNER = L.S_HASH, L.S_REC, L.S_OWNER
_HASH_MASK, _OFFSET_MASK = L.HASH_MASK, L.OFFSET_MASK
_KEY_LEN_SHIFT, _KEY_LEN_MASK = L.KEY_LEN_SHIFT, L.KEY_LEN_MASK
_STATE_SHIFT, _STATE_MASK = L.STATE_SHIFT, L.STATE_MASK
_TOP, _LIVE, _TOMBS, _GARBAGE, _OPS, _NAMEGEN = L.COUNTER_WORDS


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

    @staticmethod
    def salvage_header(path: str, gen: int) -> tuple[int, list[str]]:
        """``fsck --repair`` of a data segment too damaged to open: ``(slots, rewrites)``.

        Rewrites the magic and generation words, whose right values are known (the
        segment's name says whose and which it is), only when the size words agree with
        the segment file; ``slots`` is 0 when they do not (or there is no segment)."""
        if not os.path.exists(path):
            return 0, []
        fixed: list[str] = []
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            head = memoryview(bytearray(fh.read(L.HEADER_SIZE))).cast("Q")
            nslots, arena_off = head[L.D_NSLOTS], head[L.D_ARENA_OFF]
            sane = (
                nslots > 0
                and arena_off == L.arena_offset(nslots)
                and arena_off + head[L.D_ARENA_SIZE] == size
            )
            if not sane:
                return 0, []
            if head[L.D_MAGIC] != L.DATA_MAGIC:
                fh.seek(L.D_MAGIC * 8)
                fh.write(L.DATA_MAGIC.to_bytes(8, "little"))
                fixed.append("data segment magic rewritten")
            if head[L.D_GEN] != gen:
                fh.seek(L.D_GEN * 8)
                fh.write(gen.to_bytes(8, "little"))
                fixed.append(f"data segment generation rewritten to {gen}")
        return int(nslots), fixed

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
        counters: tuple[int, int, int, int, int, int] = L.COUNTERS.unpack_from(
            self.buf, L.COUNTERS_OFFSET
        )
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
        """Seqlock-validated copy of one slot's words (``layout.seqlock_read``).

        Raises StuckSlot when the slot stays odd longer than any live writer keeps it."""
        w = self.slot_word0 + index * L.SLOT_WORDS
        words: SlotWords | None = L.seqlock_read(self.q, w, L.SLOT.unpack_from, self.buf)
        if words is None:
            raise StuckSlot(index)
        return words

    def find(self, key: bytes, key_hash: int) -> tuple[int, SlotWords | None]:
        """Lock-free probe: ``(index, words)`` of the used slot holding ``key``, or (-1, None)."""
        # The hottest loop in shmreg: one seqlock attempt is inlined (even and unchanged
        # sequence: done); a slot being written falls back to ``read_slot``, the one
        # seqlock read loop (``layout.seqlock_read``).
        n = self.nslots
        buf = self.buf
        q = self.q
        unpack = L.SLOT.unpack_from
        arena = self.arena_off
        key_len = len(key)
        i = key_hash % n
        w0 = self.slot_word0
        slot_words, align, empty, used = L.SLOT_WORDS, L.RECORD_ALIGN, L.EMPTY, L.USED
        for _ in range(n):
            w = w0 + i * slot_words
            s1 = q[w]
            words: SlotWords = unpack(buf, w * 8)
            if s1 & 1 or q[w] != s1:
                words = self.read_slot(i)
            w2 = words[_S_REC]
            if w2 >> _STATE_SHIFT == empty:
                return -1, None
            if w2 >> _STATE_SHIFT == used and (words[_S_HASH] & _HASH_MASK) == key_hash:
                off = arena + (w2 & _OFFSET_MASK) * align
                if (w2 >> _KEY_LEN_SHIFT) & _KEY_LEN_MASK == key_len and (
                    buf[off : off + key_len] == key
                ):
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
        size, align = L.SLOT_SIZE, L.RECORD_ALIGN
        for _ in range(n):
            words: SlotWords = unpack(buf, base + i * size)
            w2 = words[_S_REC]
            state = (w2 >> _STATE_SHIFT) & _STATE_MASK
            if state == L.EMPTY:
                return -1, None, (i if first_free < 0 else first_free), first_free >= 0
            if state == L.TOMB:
                if first_free < 0:
                    first_free = i
            elif (words[_S_HASH] & _HASH_MASK) == key_hash:
                off = arena + (w2 & _OFFSET_MASK) * align
                if (w2 >> _KEY_LEN_SHIFT) & _KEY_LEN_MASK == key_len and (
                    buf[off : off + key_len] == key
                ):
                    return i, words, first_free, first_free >= 0
            i += 1
            if i == n:
                i = 0
        return -1, None, first_free, first_free >= 0

    def record_bytes(self, words: SlotWords) -> tuple[bytes, bytes]:
        """Copies of (key bytes, metadata bytes) of a validated slot, bounds-checked."""
        off = self.arena_off + L.slot_offset(words)
        key_len = L.slot_key_len(words)
        end = off + key_len + L.slot_meta_len(words)
        if end > self.arena_off + self.arena_size:
            self._corrupt(f"record at {off} runs past the arena")
        raw = bytes(self.buf[off:end])
        if _crc32(raw, L.record_seed(*L.slot_owner(words))) != L.slot_crc(words):
            self._corrupt(f"record at {off} fails its checksum")
        return raw[:key_len], raw[key_len:]

    def meta_bytes(self, words: SlotWords) -> bytes:
        off = self.arena_off + L.slot_offset(words) + L.slot_key_len(words)
        end = off + L.slot_meta_len(words)
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
        return np.flatnonzero(L.col_state(self.columns()) == L.USED)

    def iter_used(self) -> Iterator[tuple[int, SlotWords]]:
        """Validated words of every used slot (a slot may change after it is yielded)."""
        for index in self.used_indices().tolist():
            words = self.read_slot(index)
            if L.slot_state(words) == L.USED:
                yield index, words

    # -------------------------------------------------------------------------- writes

    def stage(self, record: bytes, top: int) -> int:
        """Copy a record above arena ``top``; return its offset. Caller checked the room."""
        self.allocate_to(top + len(record))
        start = self.arena_off + top
        self.buf[start : start + len(record)] = record
        return top

    def allocate_to(self, end: int) -> None:
        """Under the lock: make arena bytes up to ``end`` real memory (fallocate'd in
        ARENA_CHUNK steps, so a full /dev/shm fails here, cleanly, not as SIGBUS later)."""
        allocated = self.q[L.D_ALLOCATED]
        if end > allocated:
            from shmreg._engine.segment import allocate

            grow_to = min(self.arena_size, max(end, allocated + L.ARENA_CHUNK))
            allocate(self.shm, self.arena_off + allocated, grow_to - allocated, self.registry)
            self.q[L.D_ALLOCATED] = grow_to

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
        event = L.pack_event_word(kind, reason, seq)
        now = _time_ns()
        record = L.pack_journal(index, target, body, counters, event, now)
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

    def tombstone(
        self, index: int, words: SlotWords, kind: int = UNREGISTERED, reason: int = NO_REASON
    ) -> None:
        """Journaled removal of the entry in used slot ``index`` (``words`` as read)."""
        top, live, tombs, garbage, ops, owners = self.counters()
        self.commit(
            index,
            (*words[1:_S_REC], L.with_state(words[_S_REC], L.TOMB), *words[_S_REC + 1 :]),
            (top, live - 1, tombs + 1, garbage + record_size(words), ops + 1, owners),
            kind,
            reason,
        )

    def drop_damaged(self, index: int, words: SlotWords) -> None:
        """Tombstone a slot that fails its checks (``fsck --repair``), through the journal.

        The counters are carried over as they are, unchecked (they may be the damage): the
        rebuild that follows a repair recounts them. A repair killed here is replayed by the
        next writer like any other commit."""
        counters = L.COUNTERS.unpack_from(self.buf, L.COUNTERS_OFFSET)
        body = (*words[1:_S_REC], L.with_state(words[_S_REC], L.TOMB), *words[_S_REC + 1 :])
        self.commit(index, body, counters, UNREGISTERED, NO_REASON, key=b"")

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
        q[_TOP], q[_LIVE], q[_TOMBS], q[_GARBAGE], q[_OPS], q[_NAMEGEN] = counters
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
        words = (0, *body)  # body is slot words 1..7
        if key is None:
            off = self.arena_off + L.slot_offset(words)
            key = bytes(self.buf[off : off + L.slot_key_len(words)])
        kind, reason, seq = L.unpack_event_word(event)
        events = self.events
        events.write(
            seq,
            kind,
            reason,
            key,
            L.slot_pid(words),
            L.slot_generation(words),
            L.slot_start(words),
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
            entry = L.unpack_journal(journal)
            index, target, body = entry.slot, entry.image[0], entry.image[1:]
            if _crc32(journal) == q[L.J_CRC] and index < self.nslots and not target & 1:
                self._apply(self.slot_word0 + index * L.SLOT_WORDS, target, body, entry.counters)
                self._emit(body, entry.event, entry.time_ns)
                if ARMED:
                    crash_point("recover.replayed")
                notes.append(f"replayed the journal for slot {index}")
            else:
                notes.append("discarded a journal that failed its checksum")
            q[L.J_STATE] = 0
        cols = self.columns()
        for index in np.flatnonzero(L.col_seq(cols) & np.uint64(1)).tolist():
            w = self.slot_word0 + index * L.SLOT_WORDS
            words = L.SLOT.unpack_from(self.buf, w * 8)
            q[w + L.S_REC] = L.with_state(words[L.S_REC], L.TOMB)
            q[w] = (L.slot_seq(words) + 1) & _MASK64
            notes.append(f"tombstoned half-written slot {index}")
        if ARMED:
            crash_point("recover.tombstoned")
        states = L.col_state(cols)
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
        used = L.col_state(cols) == L.USED
        lens = L.col_key_len(cols, used) + L.col_meta_len(cols, used)
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
            off = arena + L.slot_offset(w)
            length = L.slot_record_len(w)
            if off + length > arena_end:
                self._corrupt(f"slot {index}: record runs past the arena")
            dbuf[darena + top : darena + top + length] = src[off : off + length]
            slot = L.slot_key_hash(w) % n
            while taken[slot]:
                slot += 1
                if slot == n:
                    slot = 0
            taken[slot] = True
            image = list(w)
            image[L.S_SEQ] = 2  # even: published
            image[L.S_REC] = L.with_offset(w[L.S_REC], top)
            pack(dbuf, dbase + slot * L.SLOT_SIZE, *image)
            top += L.align_record(length)
            if L.slot_generation(w) < COUNTER_LIMIT:
                newest = max(newest, L.slot_generation(w))
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
        top, live, tombs, garbage, ops, namegen = L.COUNTERS.unpack_from(
            self.buf, L.COUNTERS_OFFSET
        )
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


def record_size(words: SlotWords) -> int:
    """Arena bytes the slot's record takes, padding included."""
    return L.align_record(L.slot_record_len(words))
