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
from shmreg._engine.table import SlotWords, StuckSlot, Table
from shmreg._errors import (
    NotRegistered,
)
from shmreg._types import (
    Metadata,
    ProcessIdentity,
    Service,
)
from shmreg.backends._base import check_generation, held_by
from shmreg.backends._shm_base import LO32, record_size, tombstone
from shmreg.backends._shm_liveness import ShmLiveness
from shmreg.backends._shm_portable import ShmPortable

_crc32 = zlib.crc32
# key, key hash, padded record, slot words 1-5 (record offset still to add), capabilities mask
_Prepared = tuple[bytes, int, bytes, tuple[int, int, int, int, int], int]
_GEN = L.R_GEN
_PADDING = [bytes(n) for n in range(8)]
_unpack_slot = L.SLOT.unpack_from
_USED = L.USED
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

        The key-cache hit, the generation check and the first probe are written out here
        (most keys sit in their home slot); collisions and busy slots take ``Table.find``.
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
        w = table.slot_word0 + (key_hash % table.nslots) * 8
        q = table.q
        s1 = q[w]
        words: SlotWords = _unpack_slot(table.buf, w * 8)
        w2 = words[2]
        if (
            s1 == q[w]
            and not s1 & 1
            and w2 >> 48 == _USED
            and words[1] & LO32 == key_hash
            and (w2 >> 32) & 0xFFFF == len(key)
        ):
            off = table.arena_off + (w2 & LO32) * 8
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
            return None if found is None else found[1][4] & LO32
        found = self._locate(namespace, service)
        if found is None:
            return None
        pid: int = found[1][4] & LO32
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
        if not self._alive(words[4] & LO32):
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
        return found[0][4] & LO32, found[1]

    def lookup_entry(self, namespace: str, service: Service) -> tuple[int, int, Metadata] | None:
        found = self._entry(namespace, service)
        if found is None:
            return None
        words, meta = found
        return words[4] & LO32, words[6], meta

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
        crc = _crc32(record, (pid ^ start ^ (start >> 32)) & LO32)
        record += _PADDING[-len(record) & 7]
        head = (
            key_hash | (ns_hash << 32),
            len(key) << 32 | _USED << 48,
            len(packed) | (_type_tag(meta) << 32),
            pid | (crc << 32),
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
            if words[4] & LO32 == owner.pid and words[5] == owner.start_ticks:
                generation = words[6]
                kind, reason = _ev.UPDATED, _ev.NO_REASON
            else:
                held = ProcessIdentity(words[4] & LO32, words[5])
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
            (head[0], head[1] | offset >> 3, head[2], head[3], head[4], generation, caps),
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
                body = (
                    words[1],
                    L.pack_rec(offset, len(key), L.USED),
                    L.pack_meta(len(packed), _codec.type_tag(meta)),
                    L.pack_owner(
                        words[4] & LO32,
                        _crc32(record, L.record_seed(words[4] & LO32, words[5])),
                    ),
                    words[5],
                    words[6],
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
        if words is None or not self._alive(words[4] & LO32):
            raise NotRegistered(
                f"{namespace}/{service!r} is not registered", namespace=namespace, service=service
            )
        check_generation(namespace, service, words[6], generation)
        return index, words

    def unregister(
        self, namespace: str, service: Service, *, generation: int | None = None
    ) -> bool:
        key, key_hash, _, _, _ = self._key(namespace, service)

        def write(table: Table) -> bool:
            index, words, _, _ = table.probe_for_write(key, key_hash)
            if words is None:
                return False
            check_generation(namespace, service, words[6], generation)
            alive = self._alive(words[4] & LO32)
            tombstone(table, index, words)
            return alive

        return self._write(write)
