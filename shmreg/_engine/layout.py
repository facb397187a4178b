"""Byte layout of a registry's shared memory, drawn once and used everywhere.

A registry ``NAME`` is two kinds of POSIX shared-memory segment:

``shmreg-NAME`` (the root: 4 KiB of words, then the 1 MiB event ring of
``shmreg._engine.events``; it lives as long as the registry)::

    word  0 magic "SHMREG\\x00R"     8 pid namespace inode of the creator
          1 layout version          9 created at (ns since epoch)
          2 data generation         10-11 boot id of the creator (16 bytes)
            (DESTROYED when gone)   12 sweeps run        13 last sweep (ns)
          3 writer owner pid        14 dead entries found
          4 writer owner start      15 recoveries run
          5 generation being built  16 incarnation (random; names data segments)
          6 capacity setting        17 last event sequence number
          7 max metadata bytes      18 segment permission bits

          2048-2111 the writer lock: a robust, process-shared pthread mutex (layout 2;
                    see R_MUTEX_OFFSET below), so it never moves when the table grows.

``shmreg-NAME.<incarnation>.g<generation>`` (the data: header, slots, arena)::

    +-------------------- 4 KiB header --------------------+
    | 0 magic  1 generation  2 slots  3 arena offset       |
    | 4 arena size  5 arena top  6 live  7 tombstones      |
    | 8 garbage bytes  9 ops committed  10 owner changes   |
    | 11 arena bytes allocated (fallocate'd)               |
    | 16.. redo journal: state, slot, image[8], top, live, |
    |      tombs, garbage, ops, owner changes, event word, |
    |      event time, crc32                               |
    +-------------------- slots, 64 B each ----------------+
    | w0 seq (odd while being written)                     |
    | w1 key crc32 (lo 32) | namespace crc32 (hi 32)       |
    | w2 record offset / 8 (lo 32) | key length (16) |     |
    |    state (8: empty / used / tombstone)               |
    | w3 metadata length (lo 32) | type tag (hi 32)        |
    | w4 owner pid (lo 32) | record crc32 (hi 32)          |
    | w5 owner start ticks                                 |
    | w6 owner generation (fencing token)                  |
    | w7 capabilities mask (64-bit Bloom)                  |
    +-------------------- arena (page aligned) ------------+
    | records: key bytes | msgpack metadata, 8-aligned;   |
    | append-only, never rewritten in place               |
    +------------------------------------------------------+

Every 8-byte field is 8-aligned, so no single word straddles a cache line; slots are 64 bytes
so each sits in one line once the slot area is 64-aligned (it starts at 4096).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from shmreg import _limits

ROOT_MAGIC = int.from_bytes(b"SHMREG\x00R", "little")
DATA_MAGIC = int.from_bytes(b"SHMREG\x00D", "little")
LAYOUT_VERSION = 2
# Older layout versions ``shmreg upgrade`` can bring to LAYOUT_VERSION (``upgrade``): those
# whose slots and records this table reads, so the growth swap re-lays out the rest. 0 is
# the unversioned layout of builds before the version word was checked; 1 locked with flock.
UPGRADABLE_VERSIONS = frozenset({0, 1})

PAGE = 4096
RING_OFFSET = PAGE  # the event ring (see shmreg._engine.events) follows the root words
RING_EVENTS = _limits.RING_EVENTS
EVENT_SIZE = 256
# The liveness table (see the block at the end) follows the ring.
LIFE_OFFSET = RING_OFFSET + RING_EVENTS * EVENT_SIZE
LIFE_SLOTS = 1024
LIFE_SLOT_SIZE = 128
ROOT_SIZE = LIFE_OFFSET + LIFE_SLOTS * LIFE_SLOT_SIZE
HEADER_SIZE = PAGE
SLOT_SIZE = 64
SLOT_WORDS = SLOT_SIZE // 8
RECORD_ALIGN = 8

DESTROYED = 2**64 - 1  # root generation word once ``destroy()`` ran

# Root words.
R_MAGIC = 0
R_VERSION = 1
R_GEN = 2
R_OWNER_PID = 3
R_OWNER_START = 4
R_BUILDING = 5
R_CAPACITY = 6
R_MAX_META = 7
R_PIDNS = 8
R_CREATED_NS = 9
R_BOOT_ID = 10  # two words
R_SWEEPS = 12
R_LAST_SWEEP_NS = 13
R_DEAD_FOUND = 14
R_RECOVERIES = 15
R_INCARNATION = 16
R_EVENT_SEQ = 17
R_MODE = 18  # permission bits every segment of the registry is created with
R_LIFE_SLOTS = 19  # slots in the liveness table; 0 in a registry upgraded from layout 1

# Data header words.
D_MAGIC = 0
D_GEN = 1
D_NSLOTS = 2
D_ARENA_OFF = 3
D_ARENA_SIZE = 4
D_TOP = 5
D_LIVE = 6
D_TOMBS = 7
D_GARBAGE = 8
D_OPS = 9
D_NAMEGEN = 10
D_ALLOCATED = 11
COUNTER_WORDS = (D_TOP, D_LIVE, D_TOMBS, D_GARBAGE, D_OPS, D_NAMEGEN)

# Redo journal (in the data header).
J_STATE = 16
J_SLOT = 17
J_IMG = 18  # eight words: the slot image, word 0 the even seq to publish
J_COUNTERS = 26  # six words, in COUNTER_WORDS order
J_EVENT = 32  # kind | reason << 8 | event sequence << 16 (shmreg._engine.events)
J_EVENT_TIME = 33
J_CRC = 34
J_VALID = 1
JOURNAL_BODY = struct.Struct("<17Q")  # slot, image[8], counters[6], event, time: words 17..33
JOURNAL_WORDS = JOURNAL_BODY.size // 8

# Slot words and states.
S_SEQ = 0
S_HASH = 1
S_REC = 2
S_META = 3
S_OWNER = 4
S_START = 5
S_NAMEGEN = 6
S_CAPS = 7
EMPTY = 0
USED = 1
TOMB = 2

SLOT = struct.Struct("<8Q")
SLOT_BODY = struct.Struct("<7Q")  # words 1..7

LO32 = 0xFFFFFFFF
MASK64 = 2**64 - 1

# Growth policy: rebuild once live + tombstones pass this share of slots.
MAX_LOAD = 0.75
ARENA_CHUNK = 256 * 1024  # arena bytes are fallocate'd in steps of this size


def root_name(name: str) -> str:
    return f"shmreg-{name}"


def data_name(name: str, incarnation: int, generation: int) -> str:
    return f"shmreg-{name}.{incarnation:016x}.g{generation}"


def slots_for(capacity: int) -> int:
    """Fewest slots that hold ``capacity`` live entries within the load limit."""
    return max(8, -(-capacity * 4 // 3))


def arena_offset(nslots: int) -> int:
    end = HEADER_SIZE + nslots * SLOT_SIZE
    return -(-end // PAGE) * PAGE


def align_record(length: int) -> int:
    return -(-length // RECORD_ALIGN) * RECORD_ALIGN


# ------------------------------------------------------------------ packed fields
#
# Every field narrower than a word is declared once here, as (word, shift, bits). The
# accessors, packers and numpy column helpers below, and the C header (``cheader.py``), are
# all derived from these declarations, so a compiled reader and this one cannot disagree.


class Field(NamedTuple):
    """A bit field: ``bits`` wide, ``shift`` bits up word ``word`` of its structure."""

    word: int
    shift: int
    bits: int

    @property
    def mask(self) -> int:
        """The field's value mask, before shifting."""
        return (1 << self.bits) - 1


# Slot fields (word numbers S_*).
F_SEQ = Field(S_SEQ, 0, 64)  # odd while being written
F_KEY_HASH = Field(S_HASH, 0, 32)  # crc32 of the key
F_NS_HASH = Field(S_HASH, 32, 32)  # crc32 of the namespace
F_REC_OFFSET = Field(S_REC, 0, 32)  # record offset in the arena, in RECORD_ALIGN units
F_KEY_LEN = Field(S_REC, 32, 16)
F_STATE = Field(S_REC, 48, 8)  # EMPTY / USED / TOMB
F_META_LEN = Field(S_META, 0, 32)
F_TYPE_TAG = Field(S_META, 32, 32)
F_OWNER_PID = Field(S_OWNER, 0, 32)
F_RECORD_CRC = Field(S_OWNER, 32, 32)  # crc32 of key + metadata, seeded by record_seed
F_START = Field(S_START, 0, 64)  # owner start ticks
F_GENERATION = Field(S_NAMEGEN, 0, 64)  # owner generation (fencing token)
F_CAPS = Field(S_CAPS, 0, 64)  # capabilities mask
SLOT_FIELDS = {
    "SEQ": F_SEQ,
    "KEY_HASH": F_KEY_HASH,
    "NS_HASH": F_NS_HASH,
    "REC_OFFSET": F_REC_OFFSET,
    "KEY_LEN": F_KEY_LEN,
    "STATE": F_STATE,
    "META_LEN": F_META_LEN,
    "TYPE_TAG": F_TYPE_TAG,
    "OWNER_PID": F_OWNER_PID,
    "RECORD_CRC": F_RECORD_CRC,
    "START": F_START,
    "GENERATION": F_GENERATION,
    "CAPS": F_CAPS,
}

# The journal's event word (J_EVENT): which event a commit appends, and its number.
F_EV_KIND = Field(0, 0, 8)
F_EV_REASON = Field(0, 8, 8)
F_EV_SEQ = Field(0, 16, 48)
EVENT_WORD_FIELDS = {"KIND": F_EV_KIND, "REASON": F_EV_REASON, "SEQ": F_EV_SEQ}
# Counters and event numbers stay below this: the event word keeps 48 bits of sequence.
COUNTER_LIMIT = 1 << F_EV_SEQ.bits

# Event ring entries (EVENT_SIZE bytes each; see shmreg._engine.events).
E_SEQ = 0  # 0 while being written
E_HEAD = 1
E_GEN = 2
E_TIME = 3
E_START = 4
E_KEY = 5  # key bytes from this word on
EVENT_WORDS = EVENT_SIZE // 8
EVENT_KEY_OFFSET = E_KEY * 8
KEY_ROOM = EVENT_SIZE - EVENT_KEY_OFFSET
EVENT_BODY = struct.Struct("<4Q")  # words E_HEAD..E_START
F_EH_KIND = Field(E_HEAD, 0, 8)
F_EH_REASON = Field(E_HEAD, 8, 8)
F_EH_KEY_LEN = Field(E_HEAD, 16, 16)
F_EH_PID = Field(E_HEAD, 32, 32)
EVENT_HEAD_FIELDS = {
    "KIND": F_EH_KIND,
    "REASON": F_EH_REASON,
    "KEY_LEN": F_EH_KEY_LEN,
    "PID": F_EH_PID,
}

# Shifts and masks by name, for the innermost probe loops, where a function call per field
# would cost more than the probe itself (``w2 >> STATE_SHIFT == USED``).
HASH_MASK = F_KEY_HASH.mask
NS_HASH_SHIFT = F_NS_HASH.shift
OFFSET_MASK = F_REC_OFFSET.mask
KEY_LEN_SHIFT = F_KEY_LEN.shift
KEY_LEN_MASK = F_KEY_LEN.mask
STATE_SHIFT = F_STATE.shift
STATE_MASK = F_STATE.mask
META_LEN_MASK = F_META_LEN.mask
TYPE_TAG_SHIFT = F_TYPE_TAG.shift
PID_MASK = F_OWNER_PID.mask
CRC_SHIFT = F_RECORD_CRC.shift
SEED_FOLD_SHIFT = 32  # record_seed folds the start ticks' high half onto the low
OFFSET_UNIT_SHIFT = RECORD_ALIGN.bit_length() - 1  # offset // RECORD_ALIGN == offset >> this

# Header counters: six consecutive words, read and written as one struct.
COUNTERS = struct.Struct("<6Q")
COUNTERS_OFFSET = D_TOP * 8
assert tuple(range(D_TOP, D_TOP + 6)) == COUNTER_WORDS
assert J_COUNTERS == J_IMG + SLOT_WORDS and J_COUNTERS + len(COUNTER_WORDS) == J_EVENT


def slot_word(index: int) -> int:
    """Word number (in the data segment) of slot ``index``'s word 0."""
    return (HEADER_SIZE // 8) + index * SLOT_WORDS


# ------------------------------------------------------------------ accessors


def _getter(field: Field) -> Callable[[Sequence[int]], int]:
    word, shift, mask = field.word, field.shift, field.mask
    if field.bits == 64:
        return lambda words: words[word]
    if shift == 0:
        return lambda words: words[word] & mask
    return lambda words: (words[word] >> shift) & mask


# On a slot's words (a SLOT tuple, or any sequence of its eight words).
slot_seq = _getter(F_SEQ)
slot_key_hash = _getter(F_KEY_HASH)
slot_ns_hash = _getter(F_NS_HASH)
slot_key_len = _getter(F_KEY_LEN)
slot_state = _getter(F_STATE)
slot_meta_len = _getter(F_META_LEN)
slot_type_tag = _getter(F_TYPE_TAG)
slot_pid = _getter(F_OWNER_PID)
slot_crc = _getter(F_RECORD_CRC)
slot_start = _getter(F_START)
slot_generation = _getter(F_GENERATION)
slot_caps = _getter(F_CAPS)
_slot_offset_units = _getter(F_REC_OFFSET)


def slot_offset(words: Sequence[int]) -> int:
    """Byte offset of the slot's record within the arena."""
    return _slot_offset_units(words) * RECORD_ALIGN


def slot_record_len(words: Sequence[int]) -> int:
    """Unpadded length of the slot's record (key bytes + metadata bytes)."""
    return slot_key_len(words) + slot_meta_len(words)


def slot_owner(words: Sequence[int]) -> tuple[int, int]:
    """(owner pid, owner start ticks)."""
    return words[S_OWNER] & PID_MASK, words[S_START]


# On word S_REC alone.
def rec_offset(w2: int) -> int:
    return (w2 & OFFSET_MASK) * RECORD_ALIGN


def rec_key_len(w2: int) -> int:
    return (w2 >> KEY_LEN_SHIFT) & KEY_LEN_MASK


def rec_state(w2: int) -> int:
    return (w2 >> STATE_SHIFT) & STATE_MASK


# ------------------------------------------------------------------ packers


def pack_hash(key_hash: int, ns_hash: int) -> int:
    return key_hash | (ns_hash << NS_HASH_SHIFT)


def pack_rec(offset: int, key_len: int, state: int) -> int:
    """Word S_REC; ``offset`` is in bytes (RECORD_ALIGN-aligned)."""
    return (offset >> OFFSET_UNIT_SHIFT) | (key_len << KEY_LEN_SHIFT) | (state << STATE_SHIFT)


def pack_meta(meta_len: int, type_tag: int) -> int:
    return meta_len | (type_tag << TYPE_TAG_SHIFT)


def pack_owner(pid: int, record_crc: int) -> int:
    return pid | (record_crc << CRC_SHIFT)


def with_state(w2: int, state: int) -> int:
    """Word S_REC with its state replaced."""
    return (w2 & ~(STATE_MASK << STATE_SHIFT)) | (state << STATE_SHIFT)


def with_offset(w2: int, offset: int) -> int:
    """Word S_REC with its record offset (bytes) replaced."""
    return (w2 & ~OFFSET_MASK) | (offset >> OFFSET_UNIT_SHIFT)


def record_seed(pid: int, start_ticks: int) -> int:
    """Starting value of a record's crc32: the owner is folded into the record checksum,
    so a flipped bit in the slot's pid or start ticks is caught like one in the record."""
    return (pid ^ start_ticks ^ (start_ticks >> SEED_FOLD_SHIFT)) & PID_MASK


def slot_body(
    key_hash: int,
    ns_hash: int,
    offset: int,
    key_len: int,
    state: int,
    meta_len: int,
    type_tag: int,
    pid: int,
    record_crc: int,
    start_ticks: int,
    generation: int,
    caps: int,
) -> tuple[int, int, int, int, int, int, int]:
    """Slot words 1..7 (SLOT_BODY), as ``Table.commit`` takes them."""
    return (
        pack_hash(key_hash, ns_hash),
        pack_rec(offset, key_len, state),
        pack_meta(meta_len, type_tag),
        pack_owner(pid, record_crc),
        start_ticks,
        generation,
        caps,
    )


def pack_event_word(kind: int, reason: int, seq: int) -> int:
    """The journal's event word: which event the operation appends, and its number."""
    return kind | (reason << F_EV_REASON.shift) | (seq << F_EV_SEQ.shift)


def unpack_event_word(word: int) -> tuple[int, int, int]:
    """(kind, reason, sequence number) of a journal event word."""
    return (
        word & F_EV_KIND.mask,
        (word >> F_EV_REASON.shift) & F_EV_REASON.mask,
        word >> F_EV_SEQ.shift,
    )


def pack_event_head(kind: int, reason: int, key_len: int, pid: int) -> int:
    """Word E_HEAD of a ring entry."""
    return (
        kind
        | (reason << F_EH_REASON.shift)
        | (key_len << F_EH_KEY_LEN.shift)
        | (pid << F_EH_PID.shift)
    )


def unpack_event_head(head: int) -> tuple[int, int, int, int]:
    """(kind, reason, key length, pid) of a ring entry's E_HEAD word."""
    return (
        head & F_EH_KIND.mask,
        (head >> F_EH_REASON.shift) & F_EH_REASON.mask,
        (head >> F_EH_KEY_LEN.shift) & F_EH_KEY_LEN.mask,
        head >> F_EH_PID.shift,
    )


class Journal(NamedTuple):
    """The redo journal's body (words J_SLOT..J_EVENT_TIME), unpacked."""

    slot: int
    image: tuple[int, ...]  # SLOT_WORDS words, word 0 the even sequence to publish
    counters: tuple[int, ...]  # in COUNTER_WORDS order
    event: int  # pack_event_word
    time_ns: int


def pack_journal(
    slot: int, target: int, body: Sequence[int], counters: Sequence[int], event: int, now: int
) -> bytes:
    return JOURNAL_BODY.pack(slot, target, *body, *counters, event, now)


def unpack_journal(raw: bytes) -> Journal:
    f = JOURNAL_BODY.unpack(raw)
    n = 1 + SLOT_WORDS
    return Journal(f[0], f[1:n], f[n : n + len(COUNTER_WORDS)], f[-2], f[-1])


# ------------------------------------------------------------------ the seqlock read

T = TypeVar("T")
SPINS_BEFORE_YIELD = 64
STUCK_AFTER_S = 0.010  # longer than any live writer keeps a slot odd


def seqlock_read(
    q: memoryview,
    w: int,
    copy: Callable[[memoryview, int], T],
    buf: memoryview,
    busy: int = 1,
) -> T | None:
    """The one read protocol for words guarded by a sequence word (slots, ring entries).

    Read word ``w`` of ``q``, copy out with ``copy(buf, w * 8)``, read word ``w`` again; the
    copy is good when the word did not change and ``word & busy`` is 0 (slots: odd while
    written). ``busy=0`` instead treats a zero word as being written (ring entries). Retries,
    yielding after a few spins; None once the word stays busy for ``STUCK_AFTER_S`` (its
    writer may have died). A ring entry's caller compares the copy's sequence itself.
    """
    spins = 0
    started = 0.0
    while True:
        s1 = q[w]
        value = copy(buf, w * 8)
        if q[w] == s1 and ((not s1 & busy) if busy else s1 != 0):
            return value
        spins += 1
        if spins >= SPINS_BEFORE_YIELD:
            now = time.monotonic()
            if not started:
                started = now
            elif now - started > STUCK_AFTER_S:
                return None
            time.sleep(0)


# ------------------------------------------------------------------ numpy columns
#
# ``cols`` is ``Table.columns()``: the slots as an (nslots, SLOT_WORDS) uint64 array. ``rows``
# picks rows (a boolean mask or index array) before the field is cut out.

U64 = npt.NDArray[np.uint64]


def column(cols: U64, field: Field, rows: Any = slice(None)) -> U64:
    """One field of every (selected) slot, as a uint64 array."""
    values: U64 = cols[rows, field.word]
    if field.shift:
        values = values >> np.uint64(field.shift)
    if field.shift + field.bits < 64:
        values = values & np.uint64(field.mask)
    return values


ColumnGetter = Callable[..., U64]  # (cols, rows=all) -> uint64 array


def _column_getter(field: Field, scale: int = 1) -> ColumnGetter:
    def get(cols: U64, rows: Any = slice(None)) -> U64:
        values = column(cols, field, rows)
        return values * np.uint64(scale) if scale != 1 else values

    return get


col_seq = _column_getter(F_SEQ)
col_state = _column_getter(F_STATE)
col_key_hash = _column_getter(F_KEY_HASH)
col_ns_hash = _column_getter(F_NS_HASH)
col_offset = _column_getter(F_REC_OFFSET, RECORD_ALIGN)  # record offsets in the arena, bytes
col_key_len = _column_getter(F_KEY_LEN)
col_meta_len = _column_getter(F_META_LEN)
col_type_tag = _column_getter(F_TYPE_TAG)
col_pid = _column_getter(F_OWNER_PID)
col_crc = _column_getter(F_RECORD_CRC)
col_start = _column_getter(F_START)
col_generation = _column_getter(F_GENERATION)
col_caps = _column_getter(F_CAPS)


def col_unsteady(before: U64, after: U64) -> npt.NDArray[np.bool_]:
    """Rows whose sequence word moved between two reads of it, or was odd (being written):
    ``seqlock_read``'s rule over whole columns. Their other words, read in between, may be
    torn and must be read again."""
    unsteady: npt.NDArray[np.bool_] = (before != after) | ((before & np.uint64(1)) == 1)
    return unsteady


def col_record_seed(cols: U64, rows: Any = slice(None)) -> U64:
    """``record_seed`` of every (selected) slot."""
    pids, starts = col_pid(cols, rows), col_start(cols, rows)
    seeds: U64 = (pids ^ starts ^ (starts >> np.uint64(SEED_FOLD_SHIFT))) & np.uint64(PID_MASK)
    return seeds


# ------------------------------------------------------------ the writer lock (layout 2)
# A pthread_mutex_t in the root page, after the root words and before the event ring:
# bytes R_MUTEX_OFFSET .. R_MUTEX_OFFSET + R_MUTEX_BYTES - 1 (2048..2111), 64-aligned so it
# has a cache line of its own. glibc's pthread_mutex_t is 40 bytes on x86-64 and 48 on
# aarch64; 64 are reserved and shmreg._engine.lock checks the size at import (it measures
# what pthread_mutex_init rewrites). Attributes: PTHREAD_PROCESS_SHARED,
# PTHREAD_MUTEX_ROBUST, type PTHREAD_MUTEX_NORMAL. Layout 1 locked with flock on the root
# file instead; ``shmreg upgrade`` initialises the mutex (see shmreg._engine.upgrade).
R_MUTEX_OFFSET = 2048
R_MUTEX_BYTES = 64
LEGACY_FLOCK_VERSIONS = frozenset({0, 1})  # their writers lock with flock on the root file


# ------------------------------------------------------ the liveness table (layout 2)
# LIFE_SLOTS slots of LIFE_SLOT_SIZE bytes at LIFE_OFFSET of the root segment, one per
# process that registered through the compiled path, found by open addressing from
# life_home(pid). Slot words: 0 sequence (odd while the slot is being claimed), 1 pid,
# 2 start ticks; bytes LIFE_MUTEX_AT.. a robust pthread mutex that a thread of that process
# holds for as long as it lives. When the process dies the kernel marks the mutex's futex
# word FUTEX_OWNER_DIED, so a reader learns of the death from memory, with no system call:
# word with OWNER_DIED -> dead; word naming a thread -> alive; 0 -> unknown (ask the kernel
# with kill(pid, 0), as the pure-Python path always does). Written only by the compiled
# path (shmreg/_engine/_speedups.c, which explains the protocol), under the writer lock.
LIFE_SEQ = 0
LIFE_PID = 1
LIFE_START = 2
LIFE_MUTEX_AT = 64
FUTEX_TID_MASK = 0x3FFFFFFF
FUTEX_OWNER_DIED = 0x40000000


LIFE_HASH_MULT = 0x9E3779B1


def life_home(pid: int, nslots: int) -> int:
    """First slot a process's liveness entry is looked for in."""
    return ((pid * LIFE_HASH_MULT) & LO32) % nslots
