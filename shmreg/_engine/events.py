"""The event ring: what changed in a registry, in order, for ``watch`` and ``wait_for``.

It lives in the root segment after the root words, so its sequence numbers run on unbroken
when the table grows into a new generation. Each write operation appends one event as part
of its journaled commit (a writer killed after publishing the slot but before the event
has the event written by recovery, from the same journal record), so the ring never misses a
committed change and never shows one that did not happen.

Entry layout (256 bytes, 32 words)::

    w0  sequence number (0 while being written; readers re-check it, as for slots)
    w1  kind (8) | reason (8) | key length (16) | pid (32)
    w2  owner generation    w3  time (ns since the epoch)    w4  owner start ticks
    w5.. key bytes, at most KEY_ROOM of them (longer keys are cut: ``service`` is None)

Readers keep their own position. When a reader falls more than ``RING_EVENTS`` behind, the
entries it missed have been overwritten: it is told how many, never silently skipped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from shmreg import _codec
from shmreg._engine.layout import EVENT_SIZE, RING_EVENTS

EVENT_WORDS = EVENT_SIZE // 8
KEY_ROOM = EVENT_SIZE - 40
RING_SIZE = RING_EVENTS * EVENT_SIZE

REGISTERED = 1
UPDATED = 2
UNREGISTERED = 3
DIED = 4
KIND_NAMES = {
    REGISTERED: "registered",
    UPDATED: "updated",
    UNREGISTERED: "unregistered",
    DIED: "died",
}

# Reasons (why a registration or removal happened).
NO_REASON = 0
TAKEOVER = 1  # registered over a dead owner
GONE = 2
REUSED = 3
ZOMBIE = 4
SWEPT = 5  # removed by a sweep whose verdict gave no finer reason
REASON_NAMES = {
    NO_REASON: None,
    TAKEOVER: "takeover",
    GONE: "gone",
    REUSED: "reused",
    ZOMBIE: "zombie",
    SWEPT: "dead",
}
REASON_CODES = {"gone": GONE, "reused": REUSED, "zombie": ZOMBIE}

_BODY = struct.Struct("<4Q")  # words 1..4
# kind, reason, key bytes, pid, generation, time_ns, start ticks
RawEvent = tuple[int, int, bytes, int, int, int, int]


@dataclass(frozen=True)
class Event:
    """One change to a registry, as ``Registry.watch`` yields it.

    ``kind`` is ``registered``, ``updated``, ``unregistered``, ``died`` or ``lost`` (the
    reader fell behind the ring; ``lost`` says how many events it will never see).
    """

    seq: int
    kind: str
    namespace: str | None = None
    service: Any = None
    pid: int = 0
    generation: int = 0
    time: float = 0.0
    reason: str | None = None
    lost: int = 0
    start_ticks: int = 0
    host: str = ""  # the owner's host (``ProcessIdentity.host``): "" for this one


def pack_event_word(kind: int, reason: int, seq: int) -> int:
    """The journal's event word: which event the operation appends, and its number."""
    return kind | (reason << 8) | (seq << 16)


def unpack_event_word(word: int) -> tuple[int, int, int]:
    return word & 0xFF, (word >> 8) & 0xFF, word >> 16


class Ring:
    """The event ring over a root segment's buffer, starting at byte ``offset``."""

    def __init__(self, buf: memoryview, offset: int) -> None:
        self.buf = buf
        self.q = buf.cast("Q")
        self.offset = offset
        self.word0 = offset // 8

    def release(self) -> None:
        self.q.release()

    def write(
        self,
        seq: int,
        kind: int,
        reason: int,
        key: bytes,
        pid: int,
        generation: int,
        start_ticks: int,
        time_ns: int,
    ) -> None:
        """Write event ``seq`` (idempotent: recovery may write the same event again)."""
        slot = seq % RING_EVENTS
        w = self.word0 + slot * EVENT_WORDS
        base = w * 8
        key = key[:KEY_ROOM]
        self.q[w] = 0
        _BODY.pack_into(
            self.buf,
            base + 8,
            kind | (reason << 8) | (len(key) << 16) | (pid << 32),
            generation,
            time_ns,
            start_ticks,
        )
        self.buf[base + 40 : base + 40 + len(key)] = key
        self.q[w] = seq

    def read(self, seq: int) -> RawEvent | None:
        """Event ``seq`` as (kind, reason, key, pid, generation, time_ns, start), or None."""
        slot = seq % RING_EVENTS
        w = self.word0 + slot * EVENT_WORDS
        base = w * 8
        for _ in range(100):
            s1 = self.q[w]
            if s1 != seq:
                return None if s1 != 0 else self._wait_written(w, seq)
            head, generation, time_ns, start = _BODY.unpack_from(self.buf, base + 8)
            key_len = (head >> 16) & 0xFFFF
            key = bytes(self.buf[base + 40 : base + 40 + min(key_len, KEY_ROOM)])
            if self.q[w] == seq:
                return (
                    head & 0xFF,
                    (head >> 8) & 0xFF,
                    key,
                    head >> 32,
                    generation,
                    time_ns,
                    start,
                )
        return None

    def _wait_written(self, w: int, seq: int) -> RawEvent | None:
        # Being (re)written right now: either our event is landing, or a newer one is
        # overwriting it. A second look tells which.
        for _ in range(1000):
            s = self.q[w]
            if s:
                return self.read(seq) if s == seq else None
        return None


def decode(seq: int, raw: RawEvent) -> Event:
    kind, reason, key, pid, generation, time_ns, start = raw
    namespace: str | None = None
    service: Any = None
    cut = key.find(b"\x00")
    if cut >= 0:
        namespace = key[:cut].decode("utf-8", "replace")
        try:
            service = _codec.decode_service(key, cut)
        except Exception:
            service = None  # the key was longer than the ring keeps
    return Event(
        seq,
        KIND_NAMES.get(kind, "unknown"),
        namespace,
        service,
        pid,
        generation,
        time_ns / 1e9,
        REASON_NAMES.get(reason),
        0,
        start,
    )
