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


# ------------------------------------------------------------------ slot word packing


def pack_rec(offset: int, key_len: int, state: int) -> int:
    return (offset // RECORD_ALIGN) | (key_len << 32) | (state << 48)


def pack_meta(meta_len: int, type_tag: int) -> int:
    return meta_len | (type_tag << 32)


def pack_owner(pid: int, record_crc: int) -> int:
    return pid | (record_crc << 32)


def record_seed(pid: int, start_ticks: int) -> int:
    """Starting value of a record's crc32: the owner is folded into the record checksum,
    so a flipped bit in the slot's pid or start ticks is caught like one in the record."""
    return (pid ^ start_ticks ^ (start_ticks >> 32)) & LO32


def rec_offset(w2: int) -> int:
    return (w2 & LO32) * RECORD_ALIGN


def rec_key_len(w2: int) -> int:
    return (w2 >> 32) & 0xFFFF


def rec_state(w2: int) -> int:
    return (w2 >> 48) & 0xFF


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


def life_home(pid: int, nslots: int) -> int:
    """First slot a process's liveness entry is looked for in."""
    return ((pid * 0x9E3779B1) & LO32) % nslots
