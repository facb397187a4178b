"""``shmreg fsck``: check a registry's segments, and with ``repair`` fix what can be fixed.

Reading needs no lock, so a check works on a registry whose writers are all dead; it
also looks at the writer mutex (``WriterLock.inspect``), and a repair re-initialises a
damaged one first (``WriterLock.repair`` holds the rule that keeps a live writer safe). A
repair then takes the writer lock (which first runs the ordinary crash recovery: journal replay,
half-written slots tombstoned), then drops every entry that fails a check and rebuilds the
table into a fresh generation, which resets probe chains, counters and the arena. What it
dropped is listed in the report.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from shmreg import _codec, _identity
from shmreg._engine import layout as L
from shmreg._engine.segment import list_segments
from shmreg._engine.store import Store
from shmreg._engine.table import COUNTER_LIMIT, StuckSlot, Table
from shmreg._errors import CorruptRegistry, ShmregError
from shmreg._types import ProcessIdentity


@dataclass
class FsckReport:
    name: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    entries: int = 0
    checked_slots: int = 0

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "problems": self.problems,
            "repaired": self.repaired,
            "entries": self.entries,
            "checked_slots": self.checked_slots,
        }


def _slot_problem(table: Table, index: int, words: tuple[int, ...]) -> str | None:
    """What is wrong with one used slot, or None."""
    w2 = words[2]
    off = table.arena_off + (w2 & 0xFFFFFFFF) * 8
    key_len = (w2 >> 32) & 0xFFFF
    meta_len = words[3] & 0xFFFFFFFF
    if off + key_len + meta_len > table.arena_off + table.counter(L.D_TOP):
        return f"slot {index}: record at {off}+{key_len + meta_len} is beyond arena top"
    raw = bytes(table.buf[off : off + key_len + meta_len])
    if zlib.crc32(raw, L.record_seed(words[4] & 0xFFFFFFFF, words[5])) != words[4] >> 32:
        return f"slot {index}: record checksum mismatch"
    key = raw[:key_len]
    if zlib.crc32(key) != words[1] & 0xFFFFFFFF:
        return f"slot {index}: key hash mismatch"
    try:
        namespace, _ = _codec.decode_key(key)
        _codec.unpack_metadata(raw[key_len:])
    except Exception as exc:
        return f"slot {index}: does not decode ({exc!r})"
    if zlib.crc32(namespace.encode()) != words[1] >> 32:
        return f"slot {index}: namespace hash mismatch"
    meta = _codec.unpack_metadata(raw[key_len:])
    if (words[3] >> 32) != _codec.type_tag(meta) or words[7] != _codec.capability_mask(meta):
        return f"slot {index}: query tags disagree with its metadata"
    try:
        found, _ = table.find(key, words[1] & 0xFFFFFFFF)
    except StuckSlot:
        return f"slot {index}: its probe chain crosses a half-written slot"
    if found != index:
        return f"slot {index}: not reachable by probing (found at {found})"
    return None


def check(name: str, *, repair: bool = False) -> FsckReport:
    report = FsckReport(name)
    try:
        store = Store.open(name, create=False, capacity=None, max_metadata_bytes=None)
    except ShmregError as exc:
        report.problem(f"cannot open: {type(exc).__name__}: {exc}")
        if not (repair and isinstance(exc, CorruptRegistry) and _salvage_headers(name, report)):
            return report
        try:
            store = Store.open(name, create=False, capacity=None, max_metadata_bytes=None)
        except ShmregError as again:
            report.problem(f"still cannot open: {type(again).__name__}: {again}")
            return report
    try:
        _check_store(store, report)
        if repair and not report.ok:
            _repair(store, report)
    finally:
        store.close()
    return report


def _check_store(store: Store, report: FsckReport) -> None:
    rq = store.rq
    lock_problem = store.lock.inspect()
    if lock_problem:
        report.problem(f"writer lock damaged: {lock_problem}")
    owner = int(rq[L.R_OWNER_PID])
    if owner:
        alive = _identity.check(ProcessIdentity(owner, int(rq[L.R_OWNER_START])))
        if alive.is_dead:
            report.problem(f"writer pid {owner} died holding the lock (recovery pending)")
    building = int(rq[L.R_BUILDING])
    if building and building != int(rq[L.R_GEN]):
        report.problem(f"generation {building} was being built when its writer died")
    current = L.data_name(store.name, store.incarnation, store.gen)
    for seg in list_segments(f"shmreg-{store.name}."):
        if seg != current:
            report.problem(f"stray segment {seg}")
    table = store.table
    q = table.q
    if q[L.J_STATE] == L.J_VALID:
        report.problem("the redo journal is valid (a writer died mid-change; recovery pending)")
    try:
        table.counters()
    except CorruptRegistry as exc:
        report.problem(str(exc.detail))
    if rq[L.R_EVENT_SEQ] >= COUNTER_LIMIT:
        report.problem(f"event sequence {int(rq[L.R_EVENT_SEQ])} out of range")
    live = tombs = 0
    for index in range(table.nslots):
        words = L.SLOT.unpack_from(table.buf, L.HEADER_SIZE + index * L.SLOT_SIZE)
        report.checked_slots += 1
        state = (words[2] >> 48) & 0xFF
        if words[0] & 1:
            report.problem(f"slot {index}: half-written (odd sequence)")
            continue
        if state == L.TOMB:
            tombs += 1
        elif state == L.USED:
            live += 1
            problem = _slot_problem(table, index, words)
            if problem:
                report.problem(problem)
        elif state != L.EMPTY:
            report.problem(f"slot {index}: unknown state {state}")
    report.entries = live
    if live != table.counter(L.D_LIVE) or tombs != table.counter(L.D_TOMBS):
        report.problem(
            f"counters say {table.counter(L.D_LIVE)} live / "
            f"{table.counter(L.D_TOMBS)} tombstones, slots say {live} / {tombs}"
        )


def _salvage_headers(name: str, report: FsckReport) -> bool:
    """Rewrite header words whose damage keeps a registry from opening; True if any.

    Only words whose right value is known from the rest are rewritten: the root settings
    (capacity from the table's size, metadata limit and permission bits from the
    defaults), the data magic and generation (the segment's name says whose and which it
    is, when its size fields agree with the segment). The registry's writer lock is held.
    """
    import os

    from shmreg._engine.lock import WriterLock
    from shmreg._engine.segment import close_segment, open_segment, segment_path
    from shmreg._limits import DEFAULT_MAX_METADATA_BYTES, MAX_CAPACITY, MAX_METADATA_LIMIT

    try:
        root = open_segment(L.root_name(name), name)
    except ShmregError:
        return False
    assert root.buf is not None
    rq = root.buf.cast("Q")
    if rq[L.R_MAGIC] != L.ROOT_MAGIC or rq[L.R_VERSION] != L.LAYOUT_VERSION:
        rq.release()
        close_segment(root)
        return False  # not recognisably ours (or no mutex yet): nothing to salvage
    lock = WriterLock(root.buf, name)
    fixed: list[str] = []
    try:
        repaired = lock.repair()
        if repaired:
            fixed.append(repaired)
        lock.acquire(timeout=30.0)
    except BaseException:
        lock.close()
        rq.release()
        close_segment(root)
        raise
    try:
        gen = int(rq[L.R_GEN])
        data_name = L.data_name(name, int(rq[L.R_INCARNATION]), gen)
        path = segment_path(data_name)
        if os.path.exists(path):
            size = os.path.getsize(path)
            with open(path, "r+b") as fh:
                head = memoryview(bytearray(fh.read(L.HEADER_SIZE))).cast("Q")
                nslots, arena_off, arena = (
                    head[L.D_NSLOTS],
                    head[L.D_ARENA_OFF],
                    head[L.D_ARENA_SIZE],
                )
                sane = (
                    nslots > 0 and arena_off == L.arena_offset(nslots) and arena_off + arena == size
                )
                if sane and head[L.D_MAGIC] != L.DATA_MAGIC:
                    fh.seek(L.D_MAGIC * 8)
                    fh.write(L.DATA_MAGIC.to_bytes(8, "little"))
                    fixed.append("data segment magic rewritten")
                if sane and head[L.D_GEN] != gen:
                    fh.seek(L.D_GEN * 8)
                    fh.write(gen.to_bytes(8, "little"))
                    fixed.append(f"data segment generation rewritten to {gen}")
                if sane and not 0 < rq[L.R_CAPACITY] <= MAX_CAPACITY:
                    rq[L.R_CAPACITY] = max(1, min(MAX_CAPACITY, nslots * 3 // 4))
                    fixed.append(f"capacity setting reset to {int(rq[L.R_CAPACITY])}")
        if not 0 < rq[L.R_MAX_META] <= MAX_METADATA_LIMIT:
            rq[L.R_MAX_META] = DEFAULT_MAX_METADATA_BYTES
            fixed.append(f"metadata limit reset to {DEFAULT_MAX_METADATA_BYTES}")
    finally:
        lock.release()
        lock.close()
        rq.release()
        close_segment(root)
    report.repaired.extend(fixed)
    return bool(fixed)


def _newest_event(store: Store) -> int:
    """The highest plausible event number still in the ring (0 if none)."""
    q = store.ring.q
    first = store.ring.word0
    seqs = [q[first + i * (L.EVENT_SIZE // 8)] for i in range(L.RING_EVENTS)]
    return max((s for s in seqs if s < COUNTER_LIMIT), default=0)


def _repair(store: Store, report: FsckReport) -> None:
    fixed = store.lock.repair()  # a damaged mutex is re-initialised (rule: lock.repair)
    if fixed:
        report.repaired.append(fixed)
    table = store.begin()  # recovery runs here if a writer died inside
    try:
        report.repaired.extend(store.last_recovery)
        store.last_recovery = []
        # Holding the lock, no writer is inside: any odd slot is damage. Tombstone it.
        report.repaired.extend(table.recover())
        if store.rq[L.R_EVENT_SEQ] >= COUNTER_LIMIT:
            newest = _newest_event(store)
            store.rq[L.R_EVENT_SEQ] = newest
            report.repaired.append(f"event sequence reset to {newest}")
        for index in range(table.nslots):
            words = table.read_slot(index)
            if (words[2] >> 48) & 0xFF != L.USED:
                continue
            problem = _slot_problem(table, index, words)
            if problem:
                w = table.slot_word0 + index * L.SLOT_WORDS
                table.q[w] = (words[0] + 1) & L.MASK64
                table.q[w + L.S_REC] = (words[2] & ~(0xFF << 48)) | (L.TOMB << 48)
                table.q[w] = (words[0] + 2) & L.MASK64
                report.repaired.append(f"dropped {problem}")
        store.rebuild(0, 0)  # recounts from the slots; restarts damaged counters
        report.repaired.append(f"rebuilt into generation {store.gen}")
        for seg in list_segments(f"shmreg-{store.name}."):
            if seg != L.data_name(store.name, store.incarnation, store.gen):
                from shmreg._engine.segment import unlink_segment

                unlink_segment(seg)
                report.repaired.append(f"removed stray segment {seg}")
    finally:
        store.end()
