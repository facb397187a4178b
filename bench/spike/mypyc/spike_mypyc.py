"""The three hot paths as typed Python, compiled with mypyc (``setup.py`` beside this file).

It mirrors ``Table.find`` / ``Table.commit`` / ``SharedMemoryBackend._register_locked``:
mypyc compiles the control flow and the int arithmetic, but every word read still goes
through the memoryview protocol, as it does in the interpreter.
"""

from __future__ import annotations

import os
import struct
import time
import zlib

import msgpack

LO32 = 0xFFFFFFFF
MASK64 = 2**64 - 1
COUNTER_LIMIT = 2**48
SLOT_WORD0 = 512  # slots start after the 4 KiB header
RING_WORD0 = 512  # the event ring starts 4 KiB into the root segment
RING_EVENTS = 4096
EVENT_WORDS = 32
KEY_ROOM = 216
R_EVENT_SEQ = 17
D_ALLOCATED = 11
J_STATE = 16
J_SLOT = 17
J_CRC = 34
_JOURNAL = struct.Struct("<17Q")
_EVENT = struct.Struct("<4Q")


class SpikeError(Exception):
    """A branch the spike leaves out (growth, takeover, corrupt counters)."""


class Fast:
    """Lookups and the locked part of a registration over one data and one root buffer."""

    def __init__(self, data: memoryview, root: memoryview) -> None:
        self.buf = data
        self.q = data.cast("Q")
        self.root = root
        self.rq = root.cast("Q")
        self.nslots: int = self.q[2]
        self.arena_off: int = self.q[3]
        self.arena_size: int = self.q[4]
        self.fill_limit: float = 0.75 * self.nslots

    def _find(self, key: bytes, key_hash: int) -> tuple[int, int, int, int] | None:
        """Seqlock-validated (w2, w3, w4, w5) of the used slot holding ``key``."""
        q = self.q
        n = self.nslots
        klen = len(key)
        i = key_hash % n
        for _ in range(n):
            w = SLOT_WORD0 + i * 8
            spins = 0
            while True:
                s1: int = q[w]
                w1: int = q[w + 1]
                w2: int = q[w + 2]
                w3: int = q[w + 3]
                w4: int = q[w + 4]
                w5: int = q[w + 5]
                if not s1 & 1 and q[w] == s1:
                    break
                spins += 1
                if spins > 1_000_000:
                    raise SpikeError("slot stuck odd")
            state = w2 >> 48
            if state == 0:
                return None
            if state == 1 and w1 & LO32 == key_hash and (w2 >> 32) & 0xFFFF == klen:
                off = self.arena_off + (w2 & LO32) * 8
                if self.buf[off : off + klen] == key:
                    return w2, w3, w4, w5
            i += 1
            if i == n:
                i = 0
        return None

    def lookup(self, key: bytes, key_hash: int) -> int | None:
        found = self._find(key, key_hash)
        if found is None:
            return None
        pid = found[2] & LO32
        return pid if _alive(pid) else None

    def lookup_meta(self, key: bytes, key_hash: int) -> tuple[int, object] | None:
        found = self._find(key, key_hash)
        if found is None:
            return None
        w2, w3, w4, w5 = found
        pid = w4 & LO32
        if not _alive(pid):
            return None
        off = self.arena_off + (w2 & LO32) * 8
        klen = (w2 >> 32) & 0xFFFF
        end = off + klen + (w3 & LO32)
        if end > self.arena_off + self.arena_size:
            raise SpikeError("record runs past the arena")
        raw = bytes(self.buf[off:end])
        if zlib.crc32(raw, (pid ^ w5 ^ (w5 >> 32)) & LO32) != w4 >> 32:
            raise SpikeError("record fails its checksum")
        return pid, msgpack.unpackb(raw[klen:], raw=False, strict_map_key=True)

    def register_locked(self, item: tuple[bytes, int, bytes, tuple[int, ...], int]) -> int:
        """A new key's registration as ``_register_locked`` does it, lock already held."""
        key, key_hash, record, head, caps = item
        q = self.q
        buf = self.buf
        top: int = q[5]
        live: int = q[6]
        tombs: int = q[7]
        garbage: int = q[8]
        ops: int = q[9]
        owners: int = q[10]
        if (
            top > self.arena_size
            or top % 8
            or live + tombs > self.nslots
            or garbage > top
            or ops >= COUNTER_LIMIT
            or owners >= COUNTER_LIMIT
        ):
            raise SpikeError("counters out of range")
        padded = len(record)
        if live + tombs + 1 > self.fill_limit or top + padded > self.arena_size:
            raise SpikeError("growth is not part of the spike")
        # probe_for_write
        n = self.nslots
        klen = len(key)
        i = key_hash % n
        first_free = -1
        index = -1
        for _ in range(n):
            w = SLOT_WORD0 + i * 8
            w2: int = q[w + 2]
            state = (w2 >> 48) & 0xFF
            if state == 0:
                index = i if first_free < 0 else first_free
                break
            if state == 2:
                if first_free < 0:
                    first_free = i
            elif q[w + 1] & LO32 == key_hash:
                off = self.arena_off + (w2 & LO32) * 8
                if (w2 >> 32) & 0xFFFF == klen and buf[off : off + klen] == key:
                    raise SpikeError("existing keys are not part of the spike")
            i += 1
            if i == n:
                i = 0
        if index < 0:
            index = first_free
        if first_free >= 0:
            tombs -= 1
        live += 1
        owners += 1
        generation = owners
        # stage
        end = top + padded
        if end > q[D_ALLOCATED]:
            raise SpikeError("arena allocation is not part of the spike")
        start = self.arena_off + top
        buf[start : start + padded] = record
        body = (head[0], head[1] | top >> 3, head[2], head[3], head[4], generation, caps)
        counters = (top + padded, live, tombs, garbage, ops + 1, owners)
        # commit: journal, apply, emit, retire
        w = SLOT_WORD0 + index * 8
        target = ((q[w] | 1) + 1) & MASK64
        seq = self.rq[R_EVENT_SEQ] + 1
        if seq >= COUNTER_LIMIT:
            raise SpikeError("event sequence out of range")
        event = 1 | (seq << 16)
        now = time.time_ns()
        journal = _JOURNAL.pack(index, target, *body, *counters, event, now)
        buf[J_SLOT * 8 : J_SLOT * 8 + 136] = journal
        q[J_CRC] = zlib.crc32(journal)
        q[J_STATE] = 1
        q[w] = (target - 1) & MASK64
        for k in range(7):
            q[w + 1 + k] = body[k]
        for k in range(6):
            q[5 + k] = counters[k]
        q[w] = target
        rq = self.rq
        ew = RING_WORD0 + (seq % RING_EVENTS) * EVENT_WORDS
        ekey = key[:KEY_ROOM]
        rq[ew] = 0
        _EVENT.pack_into(
            self.root,
            ew * 8 + 8,
            1 | (len(ekey) << 16) | ((body[3] & LO32) << 32),
            generation,
            now,
            body[4],
        )
        self.root[ew * 8 + 40 : ew * 8 + 40 + len(ekey)] = ekey
        rq[ew] = seq
        if rq[R_EVENT_SEQ] < seq:
            rq[R_EVENT_SEQ] = seq
        q[J_STATE] = 0
        return generation


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True
