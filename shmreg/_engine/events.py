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

from dataclasses import dataclass
from typing import Any

from shmreg import _codec
from shmreg._engine import layout as L
from shmreg._engine.layout import (
    EVENT_SIZE,
    EVENT_WORDS,
    KEY_ROOM,
    RING_EVENTS,
)
from shmreg._engine.layout import (
    pack_event_word as pack_event_word,  # re-exported: the journal's event word
)
from shmreg._engine.layout import (
    unpack_event_word as unpack_event_word,
)

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
        self.q[w + L.E_SEQ] = 0
        L.EVENT_BODY.pack_into(
            self.buf,
            base + L.E_HEAD * 8,
            L.pack_event_head(kind, reason, len(key), pid),
            generation,
            time_ns,
            start_ticks,
        )
        self.buf[base + L.EVENT_KEY_OFFSET : base + L.EVENT_KEY_OFFSET + len(key)] = key
        self.q[w + L.E_SEQ] = seq

    def read(self, seq: int) -> RawEvent | None:
        """Event ``seq`` as (kind, reason, key, pid, generation, time_ns, start), or None."""
        w = self.word0 + (seq % RING_EVENTS) * EVENT_WORDS + L.E_SEQ
        # Zero while being (re)written: either our event is landing or a newer one is
        # overwriting it; the stable copy's own sequence word tells which.
        raw = L.seqlock_read(self.q, w, _copy_entry, self.buf, busy=0)
        if raw is None or int.from_bytes(raw[:8], "little") != seq:
            return None
        head, generation, time_ns, start = L.EVENT_BODY.unpack_from(raw, L.E_HEAD * 8)
        kind, reason, key_len, pid = L.unpack_event_head(head)
        key = raw[L.EVENT_KEY_OFFSET : L.EVENT_KEY_OFFSET + min(key_len, KEY_ROOM)]
        return kind, reason, key, pid, generation, time_ns, start


def _copy_entry(buf: memoryview, offset: int) -> bytes:
    return bytes(buf[offset : offset + EVENT_SIZE])


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
