"""``SharedMemoryBackend``: the registry API over a ``Store`` (the default backend).

Reads are lock-free seqlock reads of the current generation plus one cheap liveness probe
(``kill(pid, 0)``) per returned entry; writes run under the writer lock through the table's
journaled commit. This module holds the point reads and the writes; scans over many slots
are in ``_shm_scans.py``, sweeps and events in ``_shm_liveness.py``, the plumbing they all
share in ``_shm_base.py``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from typing import Any

from shmreg import _codec, _identity
from shmreg._engine import events as _ev
from shmreg._engine import layout as L
from shmreg._engine.table import SlotWords, StuckSlot, Table, record_size
from shmreg._errors import (
    NotRegistered,
)
from shmreg._types import (
    Metadata,
    ProcessIdentity,
    Service,
)
from shmreg.backends._base import check_generation, held_by
from shmreg.backends._shm_liveness import ShmLiveness
from shmreg.backends._shm_portable import ShmPortable

_crc32 = zlib.crc32
# key, key hash, padded record, slot words 1-5 (record offset still to add), capabilities mask
_Prepared = tuple[bytes, int, bytes, tuple[int, int, int, int, int], int]
_GEN = L.R_GEN
_PADDING = [bytes(n) for n in range(8)]
_unpack_slot = L.SLOT.unpack_from
_USED = L.USED
# Slot word numbers and field shifts, bound once for the lookup and register fast paths.
_S_HASH, _S_REC, _S_OWNER = L.S_HASH, L.S_REC, L.S_OWNER
_HASH_MASK, _OFFSET_MASK, _PID_MASK = L.HASH_MASK, L.OFFSET_MASK, L.PID_MASK
_KEY_LEN_SHIFT, _KEY_LEN_MASK, _STATE_SHIFT = L.KEY_LEN_SHIFT, L.KEY_LEN_MASK, L.STATE_SHIFT
_NS_HASH_SHIFT, _TYPE_TAG_SHIFT, _CRC_SHIFT = L.NS_HASH_SHIFT, L.TYPE_TAG_SHIFT, L.CRC_SHIFT
_SLOT_WORDS, _ALIGN, _SEED_FOLD = L.SLOT_WORDS, L.RECORD_ALIGN, L.SEED_FOLD_SHIFT
_kill = os.kill
_unpack_metadata = _codec.unpack_metadata
_pack_metadata = _codec.pack_metadata
_type_tag = _codec.type_tag
_capability_mask = _codec.capability_mask


class SharedMemoryBackend(ShmPortable, ShmLiveness):
    """Registry storage in one host's shared memory; see docs/concepts.md."""

    # ------------------------------------------------------------------ reads

    def _locate(self, namespace: str, service: Service) -> tuple[Table, SlotWords] | None:
        """The validated slot holding the key, or None: the read path every lookup shares.

        The key-cache hit, the generation check and one seqlock attempt at the home slot are
        written out here (most keys sit there); collisions and busy slots take ``Table.find``,
        whose fallback is the one seqlock read loop (``layout.seqlock_read``).
        """
        try:
            info = self._keys.get((namespace, service))
        except TypeError:  # unhashable: let _key raise the proper InvalidKey
            info = None
        if info is None or info[4] is not type(service):
            info = self._key(namespace, service)
        store = self._store
        if store.rq[_GEN] != store.gen:
            store.refresh()
        table = store.table
        key = info[0]
        key_hash = info[1]
        w = table.slot_word0 + (key_hash % table.nslots) * _SLOT_WORDS
        q = table.q
        s1 = q[w]
        words: SlotWords = _unpack_slot(table.buf, w * 8)
        w2 = words[_S_REC]
        if (
            s1 == q[w]
            and not s1 & 1
            and w2 >> _STATE_SHIFT == _USED
            and words[_S_HASH] & _HASH_MASK == key_hash
            and (w2 >> _KEY_LEN_SHIFT) & _KEY_LEN_MASK == len(key)
        ):
            off = table.arena_off + (w2 & _OFFSET_MASK) * _ALIGN
            if table.buf[off : off + len(key)] == key:
                return table, words
        try:
            found = table.find(key, key_hash)[1]
        except StuckSlot:  # a writer died mid-change: repair, then look again
            table, found = self._read(lambda t: (t, t.find(key, key_hash)[1]))
        return None if found is None else (table, found)

    def lookup(self, namespace: str, service: Service) -> int | None:
        if self._foreign_pidns:
            found = self._locate(namespace, service)
            return None if found is None else found[1][_S_OWNER] & _PID_MASK
        found = self._locate(namespace, service)
        if found is None:
            return None
        pid: int = found[1][_S_OWNER] & _PID_MASK
        if not pid:
            return None  # never kill(0, ...): it would probe our own process group
        try:
            _kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # the pid exists, owned by another user
        except OverflowError:
            return None
        return pid

    def _entry(self, namespace: str, service: Service) -> tuple[SlotWords, Metadata] | None:
        found = self._locate(namespace, service)
        if found is None:
            return None
        table, words = found
        if not self._alive(L.slot_pid(words)):
            return None
        _, meta = table.record_bytes(words)  # checksum-verified copy
        try:
            return words, _unpack_metadata(meta)
        except Exception as exc:
            raise self._corrupt(f"metadata of {service!r} does not decode: {exc!r}") from exc

    def lookup_with_metadata(self, namespace: str, service: Service) -> tuple[int, Metadata] | None:
        found = self._entry(namespace, service)
        if found is None:
            return None
        return L.slot_pid(found[0]), found[1]

    def lookup_entry(self, namespace: str, service: Service) -> tuple[int, int, Metadata] | None:
        found = self._entry(namespace, service)
        if found is None:
            return None
        words, meta = found
        return L.slot_pid(words), L.slot_generation(words), meta

    # ------------------------------------------------------------------ writes

    def register(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        metadata: Mapping[str, Any] | None,
    ) -> int:
        item = self._prepare(namespace, service, owner, metadata)
        store = self._store
        store.begin()
        failed = True
        try:
            if self._fast is not None:
                self._fast.claim(owner)
            generation = self._register_locked(namespace, service, owner, item)
            failed = False
            return generation
        finally:
            store.end(failed)

    def register_many(
        self, namespace: str, items: list[tuple[Service, ProcessIdentity, Mapping[str, Any] | None]]
    ) -> list[int]:
        """Register a batch under one lock hold: each item still commits on its own."""
        prepared = [
            (service, owner, self._prepare(namespace, service, owner, metadata))
            for service, owner, metadata in items
        ]
        store = self._store
        store.begin()
        failed = True
        try:
            if self._fast is not None and prepared:
                self._fast.claim(prepared[0][1])
            out = [
                self._register_locked(namespace, service, owner, item)
                for service, owner, item in prepared
            ]
            failed = False
            return out
        finally:
            store.end(failed)

    def _prepare(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        metadata: Mapping[str, Any] | None,
    ) -> _Prepared:
        """Everything a registration needs that does not need the lock."""
        if self._foreign_pidns:
            self._refuse_if_foreign()
        key, key_hash, ns_hash, _, _ = self._key(namespace, service)
        meta = metadata if type(metadata) is dict else _codec.as_metadata(metadata)
        packed = _pack_metadata(meta, self._max_meta)
        record = key + packed
        pid, start, _ = owner  # one host: the engine stores no host (docs/redis.md)
        # L.record_seed, written out: this runs for every registration.
        crc = _crc32(record, (pid ^ start ^ (start >> _SEED_FOLD)) & _PID_MASK)
        record += _PADDING[-len(record) % _ALIGN]
        # L.slot_body, written out likewise; the record offset is or'ed into word S_REC
        # once the record is staged (_register_locked).
        head = (
            key_hash | (ns_hash << _NS_HASH_SHIFT),
            len(key) << _KEY_LEN_SHIFT | _USED << _STATE_SHIFT,
            len(packed) | (_type_tag(meta) << _TYPE_TAG_SHIFT),
            pid | (crc << _CRC_SHIFT),
            start,
        )
        return key, key_hash, record, head, _capability_mask(meta)

    def _register_locked(
        self,
        namespace: str,
        service: Service,
        owner: ProcessIdentity,
        item: _Prepared,
    ) -> int:
        # Always the store's current table: an earlier item of a batch may have grown it.
        table = self._store.table
        key, key_hash, record, head, caps = item
        padded = len(record)
        top, live, tombs, garbage, ops, owners = table.counters()
        if live + tombs + 1 > table.fill_limit or top + padded > table.arena_size:
            table = self._store.rebuild(live + 1, padded)
            top, live, tombs, garbage, ops, owners = table.counters()
        index, words, free, free_is_tomb = table.probe_for_write(key, key_hash)
        if words is not None:
            kind, reason = _ev.REGISTERED, _ev.TAKEOVER
            if L.slot_owner(words) == (owner.pid, owner.start_ticks):
                generation = L.slot_generation(words)
                kind, reason = _ev.UPDATED, _ev.NO_REASON
            else:
                held = ProcessIdentity(*L.slot_owner(words))
                if not _identity.check(held).is_dead:
                    raise held_by(namespace, service, held.pid)
                owners += 1
                generation = owners
            garbage += record_size(words)
        else:
            kind, reason = _ev.REGISTERED, _ev.NO_REASON
            index = free
            tombs -= free_is_tomb
            live += 1
            owners += 1
            generation = owners
        offset = table.stage(record, top)
        table.commit(
            index,
            (head[0], L.with_offset(head[1], offset), head[2], head[3], head[4], generation, caps),
            (top + padded, live, tombs, garbage, ops + 1, owners),
            kind,
            reason,
            key,
        )
        return generation

    def update_metadata(
        self,
        namespace: str,
        service: Service,
        metadata: Mapping[str, Any],
        *,
        merge: bool = False,
        generation: int | None = None,
    ) -> None:
        key, key_hash, _, _, _ = self._key(namespace, service)
        update = _codec.as_metadata(metadata)
        limit = self._store.max_metadata_bytes
        packed_update = _codec.pack_metadata(update, limit) if not merge else b""
        if merge:
            _codec.pack_metadata(update, 2**62)  # validate the update itself up front

        def write(table: Table) -> None:
            for _ in range(2):
                index, words = self._held(table, namespace, service, key, key_hash, generation)
                if merge:
                    meta = _codec.unpack_metadata(table.meta_bytes(words))
                    meta.update(update)
                    packed = _codec.pack_metadata(meta, limit)
                else:
                    meta, packed = update, packed_update
                record = key + packed
                padded = L.align_record(len(record))
                if not table.room_for(padded):  # arena full: compact (or grow) first
                    table = self._store.rebuild(0, padded)
                    continue
                top, live, tombs, garbage, ops, owners = table.counters()
                offset = table.stage(record + b"\0" * (padded - len(record)), top)
                pid, start = L.slot_owner(words)
                body = L.slot_body(
                    L.slot_key_hash(words),
                    L.slot_ns_hash(words),
                    offset,
                    len(key),
                    L.USED,
                    len(packed),
                    _codec.type_tag(meta),
                    pid,
                    _crc32(record, L.record_seed(pid, start)),
                    start,
                    L.slot_generation(words),
                    _codec.capability_mask(meta),
                )
                table.commit(
                    index,
                    body,
                    (top + padded, live, tombs, garbage + record_size(words), ops + 1, owners),
                    _ev.UPDATED,
                )
                return

        self._write(write)

    def _held(
        self,
        table: Table,
        namespace: str,
        service: Service,
        key: bytes,
        key_hash: int,
        generation: int | None,
    ) -> tuple[int, SlotWords]:
        index, words, _, _ = table.probe_for_write(key, key_hash)
        if words is None or not self._alive(L.slot_pid(words)):
            raise NotRegistered(
                f"{namespace}/{service!r} is not registered", namespace=namespace, service=service
            )
        check_generation(namespace, service, L.slot_generation(words), generation)
        return index, words

    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool:
        key, key_hash, _, _, _ = self._key(namespace, service)

        def write(table: Table) -> bool:
            index, words, _, _ = table.probe_for_write(key, key_hash)
            if words is None:
                return False
            check_generation(namespace, service, L.slot_generation(words), generation)
            alive = self._alive(L.slot_pid(words))
            table.tombstone(index, words)
            return alive

        return self._write(write)
