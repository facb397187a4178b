# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The three hot paths in Cython over raw pointers into the registry's segments.

Atomic loads and stores are not expressible in Cython: the few lines of C below supply them.
"""

from libc.stdint cimport uint64_t, int64_t
from libc.string cimport memcpy, memcmp
from libc.errno cimport errno, EPERM
from posix.signal cimport kill
from posix.types cimport pid_t

import msgpack

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    #include <zlib.h>
    static inline uint64_t spike_load(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void spike_store(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void spike_fence(void) { __atomic_thread_fence(__ATOMIC_ACQ_REL); }
    static inline uint64_t spike_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    }
    """
    uint64_t spike_load(const uint64_t *p) nogil
    void spike_store(uint64_t *p, uint64_t v) nogil
    void spike_fence() nogil
    uint64_t spike_now() nogil
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int n) nogil

DEF SLOT_WORD0 = 512
DEF RING_WORD0 = 512
DEF RING_EVENTS = 4096
DEF EVENT_WORDS = 32
DEF KEY_ROOM = 216
DEF R_EVENT_SEQ = 17
DEF D_ALLOCATED = 11
DEF J_STATE = 16
DEF J_SLOT = 17
DEF J_CRC = 34
DEF LO32 = 0xFFFFFFFF
DEF COUNTER_LIMIT = 1 << 48

_unpackb = msgpack.unpackb


class SpikeError(Exception):
    """A branch the spike leaves out (growth, takeover, corrupt counters)."""


cdef inline bint _alive(uint64_t pid) noexcept:
    if pid == 0 or pid > 0x7FFFFFFF:
        return False
    if kill(<pid_t>pid, 0) == 0:
        return True
    return errno == EPERM


cdef class Fast:
    """Lookups and the locked part of a registration over one data and one root buffer."""

    cdef unsigned char[::1] _data
    cdef unsigned char[::1] _root
    cdef unsigned char *p
    cdef uint64_t *q
    cdef uint64_t *rq
    cdef uint64_t nslots, arena_off, arena_size
    cdef double fill_limit

    def __init__(self, data, root):
        self._data = data
        self._root = root
        self.p = &self._data[0]
        self.q = <uint64_t *>self.p
        self.rq = <uint64_t *>&self._root[0]
        self.nslots = self.q[2]
        self.arena_off = self.q[3]
        self.arena_size = self.q[4]
        self.fill_limit = 0.75 * self.nslots

    cdef bint _find(self, const unsigned char *key, Py_ssize_t klen, uint64_t key_hash,
                    uint64_t *out) noexcept:
        """Copy the validated slot holding ``key`` into ``out``; False when absent."""
        cdef uint64_t n = self.nslots, i = key_hash % n, probes, s1, state, off
        cdef uint64_t *slot
        cdef int k
        for probes in range(n):
            slot = self.q + SLOT_WORD0 + i * 8
            while True:
                s1 = spike_load(slot)
                for k in range(1, 8):
                    out[k] = (<volatile uint64_t *>slot)[k]
                spike_fence()
                if not s1 & 1 and spike_load(slot) == s1:
                    break
            state = out[2] >> 48
            if state == 0:
                return False
            if (state == 1 and (out[1] & LO32) == key_hash
                    and ((out[2] >> 32) & 0xFFFF) == <uint64_t>klen):
                off = self.arena_off + (out[2] & LO32) * 8
                if memcmp(self.p + off, key, klen) == 0:
                    return True
            i += 1
            if i == n:
                i = 0
        return False

    def lookup(self, bytes key, uint64_t key_hash):
        cdef uint64_t w[8]
        if not self._find(key, len(key), key_hash, w):
            return None
        cdef uint64_t pid = w[4] & LO32
        return pid if _alive(pid) else None

    def lookup_meta(self, bytes key, uint64_t key_hash):
        cdef uint64_t w[8]
        cdef Py_ssize_t klen = len(key)
        if not self._find(key, klen, key_hash, w):
            return None
        cdef uint64_t pid = w[4] & LO32
        if not _alive(pid):
            return None
        cdef uint64_t off = self.arena_off + (w[2] & LO32) * 8
        cdef uint64_t mlen = w[3] & LO32
        if off + klen + mlen > self.arena_off + self.arena_size:
            raise SpikeError("record runs past the arena")
        # Checksum the copy, not shared memory: the key half is the caller's equal key.
        meta = (<char *>self.p)[off + klen : off + klen + mlen]
        cdef unsigned long crc = crc32((pid ^ w[5] ^ (w[5] >> 32)) & LO32, key, klen)
        crc = crc32(crc, <const unsigned char *><char *>meta, mlen)
        if crc != w[4] >> 32:
            raise SpikeError("record fails its checksum")
        return pid, _unpackb(meta, raw=False, strict_map_key=True)

    def register_locked(self, tuple item):
        """A new key's registration as ``_register_locked`` does it, lock already held."""
        cdef bytes key = item[0]
        cdef uint64_t key_hash = item[1]
        cdef bytes record = item[2]
        cdef tuple head = item[3]
        cdef uint64_t caps = item[4]
        cdef uint64_t *q = self.q
        cdef uint64_t *rq = self.rq
        cdef uint64_t top = q[5], live = q[6], tombs = q[7], garbage = q[8]
        cdef uint64_t ops = q[9], owners = q[10]
        if (top > self.arena_size or top % 8 or live + tombs > self.nslots or garbage > top
                or ops >= COUNTER_LIMIT or owners >= COUNTER_LIMIT):
            raise SpikeError("counters out of range")
        cdef Py_ssize_t padded = len(record), klen = len(key)
        if live + tombs + 1 > self.fill_limit or top + padded > self.arena_size:
            raise SpikeError("growth is not part of the spike")
        cdef uint64_t n = self.nslots, i = key_hash % n, probes, state, w2, off
        cdef int64_t first_free = -1, index = -1
        cdef uint64_t *slot
        for probes in range(n):
            slot = q + SLOT_WORD0 + i * 8
            w2 = slot[2]
            state = (w2 >> 48) & 0xFF
            if state == 0:
                index = i if first_free < 0 else first_free
                break
            if state == 2:
                if first_free < 0:
                    first_free = i
            elif (slot[1] & LO32) == key_hash and ((w2 >> 32) & 0xFFFF) == <uint64_t>klen:
                off = self.arena_off + (w2 & LO32) * 8
                if memcmp(self.p + off, <const char *>key, klen) == 0:
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
        if top + padded > q[D_ALLOCATED]:
            raise SpikeError("arena allocation is not part of the spike")
        memcpy(self.p + self.arena_off + top, <const char *>record, padded)
        cdef uint64_t j[17]
        slot = q + SLOT_WORD0 + index * 8
        j[0] = index
        j[1] = (slot[0] | 1) + 1
        j[2] = head[0]
        j[3] = <uint64_t>head[1] | (top >> 3)
        j[4] = head[2]
        j[5] = head[3]
        j[6] = head[4]
        j[7] = owners
        j[8] = caps
        j[9] = top + padded
        j[10] = live
        j[11] = tombs
        j[12] = garbage
        j[13] = ops + 1
        j[14] = owners
        cdef uint64_t seq = rq[R_EVENT_SEQ] + 1
        if seq >= COUNTER_LIMIT:
            raise SpikeError("event sequence out of range")
        j[15] = 1 | (seq << 16)
        j[16] = spike_now()
        cdef int k
        for k in range(17):
            q[J_SLOT + k] = j[k]
        q[J_CRC] = crc32(0, <const unsigned char *>j, sizeof(j))
        spike_store(q + J_STATE, 1)
        spike_store(slot, j[1] - 1)  # odd: readers retry
        spike_fence()
        for k in range(7):
            slot[1 + k] = j[2 + k]
        for k in range(6):
            spike_store(q + 5 + k, j[9 + k])
        spike_store(slot, j[1])
        # the event
        cdef uint64_t *ev = rq + RING_WORD0 + (seq % RING_EVENTS) * EVENT_WORDS
        cdef Py_ssize_t ekey = klen if klen < KEY_ROOM else KEY_ROOM
        spike_store(ev, 0)
        ev[1] = 1 | (<uint64_t>ekey << 16) | ((j[5] & LO32) << 32)
        ev[2] = owners
        ev[3] = j[16]
        ev[4] = j[6]
        memcpy(ev + 5, <const char *>key, ekey)
        spike_store(ev, seq)
        if rq[R_EVENT_SEQ] < seq:
            rq[R_EVENT_SEQ] = seq
        spike_store(q + J_STATE, 0)
        return owners
