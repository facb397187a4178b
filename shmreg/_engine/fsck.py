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
from shmreg._engine import liveness
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
    off = table.arena_off + L.slot_offset(words)
    key_len = L.slot_key_len(words)
    meta_len = L.slot_meta_len(words)
    if off + key_len + meta_len > table.arena_off + table.counter(L.D_TOP):
        return f"slot {index}: record at {off}+{key_len + meta_len} is beyond arena top"
    raw = bytes(table.buf[off : off + key_len + meta_len])
    if zlib.crc32(raw, L.record_seed(*L.slot_owner(words))) != L.slot_crc(words):
        return f"slot {index}: record checksum mismatch"
    key = raw[:key_len]
    if zlib.crc32(key) != L.slot_key_hash(words):
        return f"slot {index}: key hash mismatch"
    try:
        namespace, _ = _codec.decode_key(key)
        _codec.unpack_metadata(raw[key_len:])
    except Exception as exc:
        return f"slot {index}: does not decode ({exc!r})"
    if zlib.crc32(namespace.encode()) != L.slot_ns_hash(words):
        return f"slot {index}: namespace hash mismatch"
    meta = _codec.unpack_metadata(raw[key_len:])
    if L.slot_type_tag(words) != _codec.type_tag(meta) or (
        L.slot_caps(words) != _codec.capability_mask(meta)
    ):
        return f"slot {index}: query tags disagree with its metadata"
    try:
        found, _ = table.find(key, L.slot_key_hash(words))
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
        words = L.SLOT.unpack_from(table.buf, L.slot_word(index) * 8)
        report.checked_slots += 1
        state = L.slot_state(words)
        if L.slot_seq(words) & 1:
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
    assert store._root.buf is not None
    for slot in liveness.slots(store._root.buf):
        problem = liveness.problem(slot)
        if problem:
            report.problem(problem)
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
    from shmreg._engine.lock import WriterLock
    from shmreg._engine.segment import close_segment, open_segment, segment_path

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
        nslots, salvaged = Table.salvage_header(segment_path(data_name), gen)
        fixed += salvaged
        fixed += Store.salvage_settings(rq, nslots)
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
    seqs = [q[first + i * L.EVENT_WORDS + L.E_SEQ] for i in range(L.RING_EVENTS)]
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
            store.set_event_seq(newest)
            report.repaired.append(f"event sequence reset to {newest}")
        for index in range(table.nslots):
            words = table.read_slot(index)
            if L.slot_state(words) != L.USED:
                continue
            problem = _slot_problem(table, index, words)
            if problem:
                table.drop_damaged(index, words)  # journaled: a killed repair is replayed
                report.repaired.append(f"dropped {problem}")
        assert store._root.buf is not None
        for slot in list(liveness.slots(store._root.buf)):
            problem = liveness.problem(slot)
            if problem:
                store.clear_life_slot(slot.slot)
                report.repaired.append(f"cleared {problem}")
        store.rebuild(0, 0)  # recounts from the slots; restarts damaged counters
        report.repaired.append(f"rebuilt into generation {store.gen}")
        for seg in list_segments(f"shmreg-{store.name}."):
            if seg != L.data_name(store.name, store.incarnation, store.gen):
                from shmreg._engine.segment import unlink_segment

                unlink_segment(seg)
                report.repaired.append(f"removed stray segment {seg}")
    finally:
        store.end()
