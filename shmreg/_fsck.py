"""``shmreg fsck``: check a registry's segments, and with ``repair`` fix what can be fixed.

Reading needs no lock, so a check works on a registry whose writers are all dead. A
repair takes the writer lock (which first runs the ordinary crash recovery: journal replay,
half-written slots tombstoned), then drops every entry that fails a check and rebuilds the
table into a fresh generation, which resets probe chains, counters and the arena. What it
dropped is listed in the report.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from shmreg import _codec, _identity
from shmreg import _layout as L
from shmreg._errors import ShmregError
from shmreg._segment import list_segments
from shmreg._store import Store
from shmreg._table import Table
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
    if zlib.crc32(raw) != words[4] >> 32:
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
    found, _ = table.find(key, words[1] & 0xFFFFFFFF)
    if found != index:
        return f"slot {index}: not reachable by probing (found at {found})"
    return None


def check(name: str, *, repair: bool = False) -> FsckReport:
    report = FsckReport(name)
    try:
        store = Store.open(name, create=False, capacity=None, max_metadata_bytes=None)
    except ShmregError as exc:
        report.problem(f"cannot open: {type(exc).__name__}: {exc}")
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
    top = table.counter(L.D_TOP)
    if top > table.arena_size:
        report.problem(f"arena top {top} exceeds the arena ({table.arena_size})")
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


def _repair(store: Store, report: FsckReport) -> None:
    table = store.begin()  # recovery runs here if a writer died inside
    try:
        report.repaired.extend(store.last_recovery)
        store.last_recovery = []
        for index in range(table.nslots):
            words = table.read_slot(index)
            if (words[2] >> 48) & 0xFF != L.USED:
                continue
            problem = _slot_problem(table, index, words)
            if problem:
                w = table.slot_word0 + index * L.SLOT_WORDS
                table.q[w] = words[0] + 1
                table.q[w + L.S_REC] = (words[2] & ~(0xFF << 48)) | (L.TOMB << 48)
                table.q[w] = words[0] + 2
                report.repaired.append(f"dropped {problem}")
        table.recover()  # recount
        store.rebuild(table.counter(L.D_LIVE), 0)
        report.repaired.append(f"rebuilt into generation {store.gen}")
        for seg in list_segments(f"shmreg-{store.name}."):
            if seg != L.data_name(store.name, store.incarnation, store.gen):
                from shmreg._segment import unlink_segment

                unlink_segment(seg)
                report.repaired.append(f"removed stray segment {seg}")
    finally:
        store.end()
