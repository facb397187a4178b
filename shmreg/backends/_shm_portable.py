"""Migration's primitives on shared memory: namespaces, export, and one atomic swap.

See ``shmreg.backends._portable`` for what they promise. The swap runs under the writer lock
through the same journaled commit as a registration, so a process killed midway leaves the
slot either as it was or swapped, never half-written; a record that does not fit makes the
table grow (or compact) first, as a registration does.
"""

from __future__ import annotations

import zlib

from shmreg import _codec
from shmreg._engine import events as _ev
from shmreg._engine import layout as L
from shmreg._engine.table import SlotWords, Table, record_size
from shmreg._types import ProcessIdentity, Service
from shmreg.backends._portable import (
    StoredEntry,
    imported_generation,
    local_owner,
    require_local,
    same_entry,
)
from shmreg.backends._shm_scans import ShmScans

_crc32 = zlib.crc32


class ShmPortable(ShmScans):
    def namespaces(self) -> list[str]:
        def scan(table: Table) -> set[bytes]:
            found = set()
            for _, words in table.iter_used():
                key, _ = table.record_bytes(words)
                found.add(key[: key.index(b"\x00")])
            return found

        return sorted(ns.decode() for ns in self._read(scan))

    def export_entries(self, namespace: str) -> list[StoredEntry]:
        ns_len = len(_codec.check_namespace(namespace))
        rows = self._scan(namespace)
        entries = self._entries(rows, ns_len)
        return [
            StoredEntry(namespace, e.service, ProcessIdentity(e.pid, start), gen, e.metadata)
            for e, start, gen in zip(entries, rows.starts, rows.generations, strict=True)
        ]

    def _current(self, table: Table, namespace: str, words: SlotWords | None) -> StoredEntry | None:
        """The live entry a slot holds, as ``export_entries`` would give it, or None."""
        if words is None or not self._alive(L.slot_pid(words)):
            return None
        key, meta = table.record_bytes(words)
        _, service = _codec.decode_key(key)
        owner = ProcessIdentity(*L.slot_owner(words))
        generation = L.slot_generation(words)
        return StoredEntry(namespace, service, owner, generation, _codec.unpack_metadata(meta))

    def swap_entry(
        self,
        namespace: str,
        service: Service,
        expect: StoredEntry | None,
        new: StoredEntry | None,
    ) -> tuple[bool, StoredEntry | None]:
        self._refuse_if_foreign()
        key, key_hash, ns_hash, _, _ = self._key(namespace, service)
        record = packed = b""
        meta: dict[str, object] = {}
        if new is not None:
            require_local(new.owner, "shared memory")
            meta = _codec.as_metadata(new.metadata)
            packed = _codec.pack_metadata(meta, self._max_meta)
            record = key + packed
        padded = L.align_record(len(record))
        # A lock-free look first: a swap that will not match (and read_entry, which never
        # does) answers without the writer lock. A match is judged again under it.
        seen = self._read(lambda t: self._current(t, namespace, t.find(key, key_hash)[1]))
        if not same_entry(seen, expect):
            return False, seen

        def write(table: Table) -> tuple[bool, StoredEntry | None]:
            index, words, free, free_is_tomb = table.probe_for_write(key, key_hash)
            current = self._current(table, namespace, words)
            if not same_entry(current, expect):
                return False, current
            if new is None:
                if words is not None:
                    table.tombstone(index, words)
                return True, None
            top, live, tombs, garbage, ops, owners = table.counters()
            grow = words is None and live + tombs + 1 > table.fill_limit
            if grow or top + padded > table.arena_size:
                table = self._store.rebuild(live + 1, padded)
                index, words, free, free_is_tomb = table.probe_for_write(key, key_hash)
                top, live, tombs, garbage, ops, owners = table.counters()
            owner = local_owner(new.owner)
            same = words is not None and L.slot_owner(words) == owner[:2]
            held_generation = None if words is None else L.slot_generation(words)
            generation, owners = imported_generation(
                new.generation, held_generation, owners, same_owner=same
            )
            if words is None:
                index = free
                tombs -= free_is_tomb
                live += 1
            else:
                garbage += record_size(words)
            offset = table.stage(record + b"\0" * (padded - len(record)), top)
            seed = L.record_seed(owner.pid, owner.start_ticks)
            body = L.slot_body(
                key_hash,
                ns_hash,
                offset,
                len(key),
                L.USED,
                len(packed),
                _codec.type_tag(meta),
                owner.pid,
                _crc32(record, seed),
                owner.start_ticks,
                generation,
                _codec.capability_mask(meta),
            )
            table.commit(
                index,
                body,
                (top + padded, live, tombs, garbage, ops + 1, owners),
                _ev.UPDATED if same else _ev.REGISTERED,
                _ev.NO_REASON,
                key,
            )
            return True, StoredEntry(namespace, service, owner, generation, meta)

        return self._write(write)
